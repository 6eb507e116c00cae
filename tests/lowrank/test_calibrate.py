"""edkm.lowrank.calibrate.collect_input_stats: the early stop of forward passes."""

from __future__ import annotations

import torch

from edkm.lowrank.calibrate import collect_input_stats


def test_stop_early_skips_the_rest_of_the_forward_and_keeps_the_statistics():
    from edkm.hub.models import tiny_llama

    model = tiny_llama(hidden=32, layers=2, vocab_size=64)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    batches = [torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    heads = []
    model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    full = collect_input_stats(model, batches, names)
    assert len(heads) == 3
    short = collect_input_stats(model, batches, names, stop_early=True)
    assert len(heads) == 3  # the LM head did not run again
    assert short.groups == full.groups
    for leader, moment in full.moments.items():
        assert torch.equal(short.moments[leader].matrix(), moment.matrix())
