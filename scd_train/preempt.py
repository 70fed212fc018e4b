"""Preemption: SIGTERM or SIGUSR1 asks the training loop to stop after its current step with a checkpoint.

Slurm (``--signal``, preemption, ``scancel``), Kubernetes (pod deletion) and torchrun (forwarding its own
SIGTERM) all signal the training processes; the handler only records the signal, the loop decides when to
stop, and the process then exits with ``128 + signal`` so the launcher sees "ended by that signal" and
requeues or restarts it.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal received while the ``with`` block runs (handlers restored on exit).

    Signal handlers can only be installed from the main thread; elsewhere nothing is installed and
    ``signum`` stays ``None``.
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def exit_status(signum: int | None) -> int:
    """0 for a run that ended normally, else ``128 + signum`` (143 for SIGTERM, 138 for SIGUSR1)."""
    return 0 if signum is None else 128 + signum
