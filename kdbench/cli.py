"""The `kdbench` entry point: signal handlers first, then the commands (`kdbench.commands`).

Ctrl-C and SIGTERM exit 130 with one line from the first instant, also while the commands' imports (torch,
MLflow: seconds) are still loading: that is why the commands are imported inside `main`, the one kdbench
import inside a function that is not an optional backend's.
"""

from __future__ import annotations

import gc
import signal
import sys

from rich.console import Console

from kdbench import Interrupted, KdbenchError, Stopped
from kdbench.run.worker_start import start_early  # the standard library only

err = Console(stderr=True, soft_wrap=True)


def _stop(signum, frame):
    raise Stopped  # Ctrl-C or SIGTERM until the executor installs its own handlers: exit 130, one line


def main() -> None:
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
    except ValueError:  # not the main thread
        pass
    try:  # from here on a signal's Stopped ends the command with 130 and one line, even while the server starts
        start_early(sys.argv[1:])  # the local workers' imports, on another core while this process imports its own
        from kdbench.commands import app

        app()
    except KdbenchError as exc:
        err.print(f"kdbench: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as exc:
        why = f" ({exc})" if str(exc) else ""
        err.print(f"kdbench: interrupted{why}; run the same command again to resume", markup=False)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns a KeyboardInterrupt inside a command into a silent exit 130
            err.print("kdbench: interrupted; run the same command again to resume", markup=False)
        raise
    finally:
        gc.freeze()  # exit then skips collecting torch's, timm's and MLflow's module objects (about 1 s)


if __name__ == "__main__":
    main()
