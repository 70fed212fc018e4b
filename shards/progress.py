"""Progress of long commands: a tqdm bar in a terminal, plain periodic lines otherwise.

Logs of ``make demo``, CI and cluster jobs are not terminals, so a bar would print nothing useful
there; instead one line such as ``train: 120/300 step (40%), 2.10 step/s, eta 1m26s, loss=0.81``
is printed every ``SCD_PROGRESS_EVERY`` seconds (default 30; 0 prints every update) and at the end.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["ENV_INTERVAL", "Progress", "progress_interval"]

ENV_INTERVAL = "SCD_PROGRESS_EVERY"


def progress_interval(default: float = 30.0) -> float:
    """Seconds between plain progress lines, from ``$SCD_PROGRESS_EVERY`` (a bad value is an error)."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{ENV_INTERVAL}={raw!r}: expected a number of seconds >= 0")
    return value


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts work done; a tqdm bar when ``stream`` is a terminal, else periodic plain lines.

    ``enabled=False`` shows nothing (e.g. on ranks other than 0). Use as a context manager or call
    :meth:`close`, which prints the final line.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "step", *, initial: int = 0,
                 enabled: bool = True, stream: TextIO | None = None, every_s: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = initial
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = progress_interval() if every_s is None else every_s
        self.postfix: dict[str, str] = {}
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1) -> None:
        """Add ``n`` units of work; prints a line when the interval has passed."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the counts (e.g. ``loss``), as given."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix)

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        if self.total:
            parts = [f"{self.desc}: {self.n}/{self.total} {self.unit} ({self.n / self.total:.0%})"]
        else:
            parts = [f"{self.desc}: {self.n} {self.unit}"]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last = time.monotonic()

    def close(self) -> None:
        """End the bar, or print the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._print()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
