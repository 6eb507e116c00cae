"""OpenMP wait policy for the DKM step on the CPU (imported first by `edkm` and `bench`).

After each parallel region, torch's OpenMP threads spin for a while waiting for the next
one. A DKM step alternates torch regions (the model's matmuls) with the C table kernels,
which run on their own Python thread pool (`edkm.ckernels`), so the spinning threads take
the cores the kernels need. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep at once. Measured
with `python -m bench.step --threads 2` (SmolLM2-135M, the 4-bit preset, this 2-core CPU,
quiet, commit f5ff626): DKM step 8.29 s -> 6.82 s, plain step 3.36 s -> 3.20 s; ratio 2.47x
-> 2.13x. OpenMP reads the variable when torch loads it, so this works only when edkm (or
bench) is imported before torch, as the ``edkm`` command does; a value already in the
environment is kept (set ``OMP_WAIT_POLICY=ACTIVE`` to opt out).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
