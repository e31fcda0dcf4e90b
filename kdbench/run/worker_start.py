"""How the local workers' processes start: forked from a server that has imported their code once.

A spawned worker imports torch, timm, MLflow and kdbench itself (about 5 s of one core each) before its first job,
and tears them down again at exit (about 1 s). The local workers therefore fork from multiprocessing's forkserver,
which imports `PRELOAD` once and never runs torch (no thread pool to break in a fork); a forked worker starts in
milliseconds and leaves by `os._exit`. `kdbench run` starts that server first thing (`start_early`), so its
imports use a core that the command's own imports leave idle. Each worker still gets the driver's working folder
and `sys.path` (multiprocessing sends them) and its environment (`_start_worker` sets it).

Nothing here imports torch: the CLI calls it before its own imports.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

PRELOAD = ["kdbench.run.executors.local", "mlflow.tracking"]  # the worker's entry point (torch, timm, run_job), MLflow


def worker_context():
    """The multiprocessing context the local workers start in."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_early(argv: list[str]) -> None:
    """Start the workers' server now when this command line will use local workers. A guess from the words alone
    (the executor config file may say otherwise): a wrong guess costs a few seconds of another core, or nothing
    saved; the pool starts the server itself when it is not running."""
    if not argv or argv[0] not in ("run", "tune") or any(a in ("--dry-run", "--help") for a in argv):
        return
    words = " ".join(argv).replace("=", " ").split()
    after = {words[i]: words[i + 1] for i in range(len(words) - 1)}
    if after.get("--executor", "local") != "local" or after.get("--workers") == "1":
        return
    worker_context()
    try:
        forkserver.ensure_running()
    except OSError:  # no Unix socket here, say: the pool says so if it needs one; the in-process executor does not
        pass
