"""Tests for edkm.offload: bitwise gradients, dedupe, version checks, byte accounting."""
import contextlib
import gc
import json

import pytest
import torch
from torch import nn

from edkm.offload import offload_saved_tensors

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# "keep": CPU tensors offloaded to CPU are kept by reference (the CPU-only default).
# "copy*": copy_same_device exercises the cross-device copy path on one device.
MODES = {
    "keep": dict(min_bytes=0),
    "copy": dict(min_bytes=0, copy_same_device=True),
    "copy_no_dedupe": dict(min_bytes=0, copy_same_device=True, dedupe=False),
    "copy_threshold": dict(min_bytes=4096, copy_same_device=True),
}


def _assert_equal(got, want, what):
    assert (got.shape, got.dtype) == (want.shape, want.dtype), what
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{what}: not bitwise equal, worst {idx}: {got[idx]} != {want[idx]}")


def _fwd_bwd(module, x, g, offload=None):
    """Forward under offload (None: plain autograd), backward outside it. Returns grads, stats."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    ctx = offload_saved_tensors(**offload) if offload is not None else contextlib.nullcontext()
    with ctx as stats:
        out = module(x)
    out.backward(g)
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return grads, stats


def _check_against_plain(module, x, offload):
    torch.manual_seed(1)
    g = torch.randn_like(module(x))
    want, _ = _fwd_bwd(module, x, g)
    got, stats = _fwd_bwd(module, x, g, offload)
    assert set(got) == set(want)
    for name in want:
        _assert_equal(got[name], want[name], name)
    assert all(v == 0 for v in stats.bytes_held.values()), stats.summary()
    return stats


class _DecoderLayer(nn.Module):
    """A whole LlamaDecoderLayer with its rotary embedding and a causal mask."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=1, vocab_size=32,
                          max_position_embeddings=64, attn_implementation="eager")
        self.layer, self.rope = LlamaDecoderLayer(cfg, layer_idx=0), LlamaRotaryEmbedding(cfg)

    def forward(self, x):  # (B, T, 64)
        b, t, _ = x.shape
        pos = torch.arange(t).unsqueeze(0).expand(b, -1)
        mask = torch.full((t, t), float("-inf")).triu(1).expand(b, 1, t, t)
        out = self.layer(x, attention_mask=mask, position_embeddings=self.rope(x, pos))
        return out[0] if isinstance(out, tuple) else out


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(37, 53), nn.GELU(), nn.Linear(53, 53), nn.SiLU(),
                         nn.Linear(53, 11)).to(dtype)


class _SharedViews(nn.Module):
    """Saves one activation as h, h.t() and an offset slice h[:, 3:11]: one storage."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 24)

    def forward(self, x):  # (N, 24)
        h = torch.tanh(self.lin(x))  # tanh saves its result h
        return (h @ h.t()) @ h[:, 3:11]  # (N, 8); saves h, h.t(), gram, h[:, 3:11]


@pytest.mark.parametrize("mode", MODES)
def test_decoder_layer_bitwise_grads(mode):
    torch.manual_seed(0)
    stats = _check_against_plain(_DecoderLayer(), torch.randn(2, 13, 64), MODES[mode])
    if mode == "keep":
        assert stats.tensors_offloaded == 0 and stats.kept_by_reason["same_device"] > 0
    else:
        assert stats.tensors_offloaded > 0 and stats.bytes_copied["to_offload"] > 0
    # the normed hidden state feeds q, k and v projections: one storage saved three times
    assert (stats.tensors_deduplicated > 0) == (mode in ("copy", "copy_threshold")), stats.summary()
    assert stats.kept_by_reason["parameter"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_mlp_bitwise_grads(mode, dtype):
    torch.manual_seed(0)
    _check_against_plain(_mlp(dtype), torch.randn(3, 37, dtype=dtype), MODES[mode])


def test_dedupe_two_views_one_copy_and_restored_views():
    torch.manual_seed(0)
    module, x = _SharedViews(), torch.randn(6, 24)
    stats = _check_against_plain(module, x, MODES["copy"])
    h_bytes = 6 * 24 * 4
    slice_bytes = (5 * 24 + 8) * 4  # span of h[:, 3:11]: rows 0..5, 8 columns
    assert stats.tensors_deduplicated == 3, stats.summary()  # h (mm), h.t(), h[:, 3:11]
    assert stats.bytes_deduplicated == 2 * h_bytes + slice_bytes
    # copies: x, h (tanh), gram -- each once
    assert stats.bytes_copied["to_offload"] == 6 * 24 * 4 + h_bytes + 6 * 6 * 4

    h_ref = torch.tanh(module.lin(x)).detach()
    with offload_saved_tensors(**MODES["copy"]):
        out = module(x)
    gram_node = out.grad_fn.next_functions[0][0]
    for got, want in [(out.grad_fn._saved_mat2, h_ref[:, 3:11]), (gram_node._saved_self, h_ref),
                      (gram_node._saved_mat2, h_ref.t())]:
        assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
        _assert_equal(got, want, "restored view")


def test_dedupe_off_copies_every_save():
    torch.manual_seed(0)
    module, x = _SharedViews(), torch.randn(6, 24)
    on = _check_against_plain(module, x, MODES["copy"])
    off = _check_against_plain(module, x, MODES["copy_no_dedupe"])
    assert off.tensors_deduplicated == 0 and off.bytes_deduplicated == 0
    assert off.bytes_copied["to_offload"] == on.bytes_copied["to_offload"] + on.bytes_deduplicated


def test_slice_saved_before_whole_is_copied_again():
    w = torch.randn(4, 24, requires_grad=True)
    x = torch.randn(4, 24)
    with offload_saved_tensors(**MODES["copy"]) as stats:
        y = (x[:, 3:11] * w[:, 3:11]).sum() + (x * w).sum()  # slice span first, then whole
    y.backward()
    assert stats.tensors_offloaded == 2 and stats.tensors_deduplicated == 0, stats.summary()
    want = x.clone()
    want[:, 3:11] *= 2
    _assert_equal(w.grad, want, "w.grad")


def test_inplace_between_saves_is_copied_again_not_stale():
    w1, w2 = torch.randn(300, requires_grad=True), torch.randn(300, requires_grad=True)
    x = torch.randn(300, requires_grad=True)
    with offload_saved_tensors(**MODES["copy"]) as stats:
        h = x * 1.5
        y1 = h * w1  # saves h at version 0
        h.mul_(3.0)  # recorded in-place op: plain autograd would refuse y1's backward
        y2 = h * w2  # saves h at version 1: same storage, must not reuse the v0 copy
    (y1.sum() + y2.sum()).backward()
    assert stats.tensors_deduplicated == 0 and stats.bytes_deduplicated == 0, stats.summary()
    h1 = x.detach() * 1.5  # the values each save saw, computed out of place
    _assert_equal(w1.grad, h1, "w1.grad")
    _assert_equal(w2.grad, h1 * 3.0, "w2.grad")


def test_reused_address_of_freed_storage_is_not_served_stale():
    buf = bytearray(4 * 256)  # storages over one buffer: same data_ptr, each at version 0

    def fresh(value):
        torch.frombuffer(buf, dtype=torch.float32).fill_(value)  # writes through a temporary
        return torch.frombuffer(buf, dtype=torch.float32)  # a new storage, version 0

    w1, w2 = torch.randn(256, requires_grad=True), torch.randn(256, requires_grad=True)
    with offload_saved_tensors(**MODES["copy"]) as stats:
        a = fresh(1.0)
        a_key = (a.untyped_storage().data_ptr(), a._version)
        y1 = (a * w1).sum()  # saves a
        del a  # its storage dies; the copy lives on
        b = fresh(2.0)
        assert (b.untyped_storage().data_ptr(), b._version) == a_key  # the dedupe key collides
        y2 = (b * w2).sum()
    (y1 + y2).backward()
    assert stats.tensors_offloaded == 2 and stats.tensors_deduplicated == 0, stats.summary()
    _assert_equal(w1.grad, torch.ones(256), "w1.grad")
    _assert_equal(w2.grad, torch.full((256,), 2.0), "w2.grad")


@pytest.mark.parametrize("case", ["same_device", "small", "parameter"])
def test_inplace_on_tensor_kept_by_reference_raises(case):
    offload = {"same_device": MODES["keep"], "small": dict(min_bytes=2**20, copy_same_device=True),
               "parameter": MODES["copy"]}[case]
    lin = nn.Linear(16, 16)
    for modify in (False, True):  # the unmodified run must pass: the error is the in-place op
        x = torch.randn(8, 16, requires_grad=True)
        with offload_saved_tensors(**offload) as stats:
            h = x * 2
            y = lin(h).sum()  # saves h and lin.weight.t()
        assert stats.kept_by_reason.get(case, 0) > 0, stats.summary()
        if not modify:
            y.backward()
            continue
        with torch.no_grad():
            (lin.weight if case == "parameter" else h).add_(1.0)  # e.g. an optimizer step
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*edkm.offload"):
            y.backward()


def test_copied_tensor_modified_after_save_gives_snapshot_gradient():
    w = torch.randn(300, requires_grad=True)
    x = torch.randn(300, requires_grad=True)
    with offload_saved_tensors(**MODES["copy"]):
        h = x * 1.5
        y = (h * w).sum()
    saved = h.detach().clone()
    with torch.no_grad():
        h.add_(1.0)  # the offloaded copy is a snapshot: backward sees the saved values
    y.backward()
    _assert_equal(w.grad, saved, "w.grad")


@pytest.mark.parametrize("mode", ["keep", "copy"])
def test_bytes_accounting(mode):
    torch.manual_seed(0)
    mlp, x = _mlp(), torch.randn(5, 37, requires_grad=True)
    probe = {}  # distinct non-parameter storages autograd saves, by data_ptr -> nbytes

    def pack(t):
        if not isinstance(t._base if t._base is not None else t, nn.Parameter):
            probe[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    with offload_saved_tensors(**MODES[mode]) as stats:
        out = mlp(x)
    saved = sum(probe.values())
    assert stats.kept_by_reason["parameter"] == 3, stats.summary()  # one weight.t() per Linear
    assert stats.bytes_held == {"cpu": saved} == stats.peak_bytes_held, stats.summary()
    if mode == "copy":
        assert stats.bytes_copied["to_offload"] == saved
    out.backward(torch.ones_like(out), retain_graph=True)
    assert stats.bytes_held["cpu"] == saved  # the retained graph still holds everything
    out.backward(torch.ones_like(out))  # frees the graph and with it every packed handle
    assert stats.bytes_held == {"cpu": 0} and stats.peak_bytes_held == {"cpu": saved}
    if mode == "copy":
        assert stats.tensors_restored >= 2 * stats.tensors_offloaded > 0
    with offload_saved_tensors(**MODES[mode]) as stats:
        out = mlp(x)
    assert stats.bytes_held == {"cpu": saved}
    del out  # dropping a graph that never ran backward releases too
    assert stats.bytes_held == {"cpu": 0}


@pytest.mark.parametrize("mode", ["keep", "copy"])
def test_saved_output_is_freed_without_gc(mode):
    """exp saves its own output; a handle holding it with its grad_fn would be a leaked cycle."""
    x = torch.randn(1000, requires_grad=True)
    with offload_saved_tensors(**MODES[mode]) as stats:
        y = (x * 2).exp()
    assert stats.bytes_held == {"cpu": 4000}
    gc.disable()
    try:
        del y
        assert stats.bytes_held == {"cpu": 0}
    finally:
        gc.enable()


def test_min_bytes_threshold():
    w1, w2 = torch.randn(256, requires_grad=True), torch.randn(255, requires_grad=True)
    a, b = torch.randn(256), torch.randn(255)
    with offload_saved_tensors(min_bytes=1024, copy_same_device=True) as stats:
        loss = (a * w1).sum() + (b * w2).sum()  # saves a (1024 B) and b (1020 B)
    assert stats.tensors_offloaded == 1 and stats.bytes_copied["to_offload"] == 1024
    assert stats.kept_by_reason == {"small": 1} and stats.bytes_kept == 1020
    loss.backward()
    _assert_equal(w1.grad, a, "w1.grad")
    _assert_equal(w2.grad, b, "w2.grad")


def test_summary_and_to_dict():
    w = torch.randn(2048, requires_grad=True)
    with offload_saved_tensors(**MODES["copy"]) as stats:
        y = (torch.randn(2048) * w).sum()
    d = stats.to_dict()
    assert json.loads(json.dumps(d)) == d and "_lock" not in d
    d["bytes_held"]["cpu"] = -1  # a snapshot, not a view of the live stats
    assert stats.bytes_held["cpu"] == 8192
    assert "offload -> cpu" in stats.summary() and "copied 8.0 KiB out" in stats.summary()
    y.backward()


def test_negative_min_bytes_rejected():
    with pytest.raises(ValueError, match="-1"):
        with offload_saved_tensors(min_bytes=-1):
            pass


@requires_cuda
def test_cuda_to_pinned_cpu_bitwise_grads():
    torch.manual_seed(0)
    mlp, x = _mlp().cuda(), torch.randn(64, 37, device="cuda")
    stats = _check_against_plain(mlp, x, dict(min_bytes=0))
    assert stats.bytes_pinned == stats.bytes_copied["to_offload"] > 0, stats.summary()
    assert stats.bytes_copied["back"] > 0 and stats.peak_bytes_held["cpu"] > 0


@requires_cuda
def test_cuda_inplace_between_saves_not_stale():
    w1, w2 = (torch.randn(4096, device="cuda", requires_grad=True) for _ in range(2))
    x = torch.randn(4096, device="cuda", requires_grad=True)
    with offload_saved_tensors(min_bytes=0) as stats:
        h = x * 1.5
        y = (h * w1).sum()
        h.mul_(3.0)
        y = y + (h * w2).sum()
    y.backward()
    assert stats.tensors_deduplicated == 0 and stats.bytes_pinned > 0, stats.summary()
    _assert_equal(w1.grad, x.detach() * 1.5, "w1.grad")
    _assert_equal(w2.grad, x.detach() * 1.5 * 3.0, "w2.grad")
