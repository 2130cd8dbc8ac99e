"""Fixed thread counts for the float arithmetic whose results must not depend on the calling process.

Float sums are split per thread, so the same computation with another thread count rounds
differently: a GPTQ rounding decision can flip (measured: the smoke run's GPTQ candidate and the
same command in a process whose torch had one thread), and the torch-vs-ONNX check of notebook 01
moved (torch float32 against float64, 2.7e-4 with two threads, 1.3e-4 with one). The caller's
thread count is not ours to rely on: importing ultralytics sets ``OMP_NUM_THREADS=1`` in the
environment when it is unset, so a pipeline started from a process that imported it (the test
session) runs its notebooks with one OpenMP thread, and one started from the command line with
two. Fixed here, results are a function of the model, the images and the method alone.
"""

from __future__ import annotations

import contextlib

TORCH_THREADS = 2  # torch's intra-op threads for every torch computation whose result is recorded


@contextlib.contextmanager
def fixed_torch_threads(n: int = TORCH_THREADS):
    import torch  # late: torch costs seconds at import, kept off the command line's start-up

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
