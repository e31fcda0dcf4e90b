"""The torch configuration a job runs under on its device kind: part of every job's key, set by run_job.
"""

from __future__ import annotations
from typing import Any


# What besides a job's own settings decides its numbers: torch's configuration on the device it runs on. Every job's
# key holds it (`runtime_config`), and run_job sets torch to it before the job trains, whatever the executor: a model
# trained under one configuration is never reused under another. On CPU the intra-op thread count changes how the
# larger layers' sums are split, and so the last bits: one thread by default (jobs run side by side, not wide).
DEFAULT_THREADS = 1
MATMUL_PRECISION = "highest"  # float32 matmuls in float32 (no TF32, no bf16 passes), whatever a library set


def runtime_config(device: str = "cpu", threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """The torch configuration a job on a `device` kind ("cpu", "cuda") with `threads` CPU threads runs under.

    CPU: the thread count and deterministic algorithms; bit for bit the same numbers for the same key on the same
    CPU and torch. CUDA: cuDNN's deterministic kernels, no autotuning; the thread count is left out (the data and
    the models are on the GPU), and bit-identity is not promised there (README, "Same numbers")."""
    if device == "cuda":
        return {"device": "cuda", "cudnn_deterministic": True, "cudnn_benchmark": False,
                "matmul_precision": MATMUL_PRECISION}
    return {"device": "cpu", "threads": int(threads), "deterministic_algorithms": True,
            "matmul_precision": MATMUL_PRECISION}
