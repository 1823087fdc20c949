"""A process-wide stop request, set by Ctrl-C or SIGTERM, that long loops in worker threads check.

The main thread gets ``KeyboardInterrupt`` as usual; threads it is waiting on (a ``model.generate`` in a
worker, a training step) cannot be interrupted by Python, so they look at ``stop_requested()`` at each
step and end early.
"""

import signal
import threading
from types import FrameType
from typing import Any

_stop = threading.Event()


def request_stop() -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear() -> None:
    """Forget an earlier stop request (tests, or a long-lived process that handled it)."""
    _stop.clear()


def watch_sigint() -> None:
    """Make Ctrl-C also set the stop request (then behave as Python's default: KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigint(signum: int, frame: FrameType | None) -> Any:
        request_stop()
        return signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
