"""Progress for long work: a bar on a terminal, a log line every few seconds otherwise.

Rate and ETA count only work actually done in this run (skipped or reused work
advances the position but not the rate), so the ETA of a resumed run is honest.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hpd_tools.progress")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, unit: str, desc: str, interval: float | None = None):
        self.total, self.unit, self.desc = total, unit, desc
        self.done = 0
        self.counted = 0
        self.started = time.time()
        self.work_started: float | None = None
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.last_print = 0.0
        self.last_done = -1

    def note(self, message: str) -> None:
        log.info("%s: %s", self.desc, message)

    def restart_clock(self) -> None:
        """Measure the rate from now (after a model load, say)."""
        self.work_started = time.time()
        self.counted = 0

    def update(self, n: int, count_rate: bool = True) -> None:
        if count_rate and n:
            if self.work_started is None:
                self.work_started = self.started
            self.counted += n
        self.done += n
        now = time.time()
        if now - self.last_print >= self.interval or self.done >= self.total:
            self.last_print = now
            self._print(final=False)
            self.last_done = self.done

    def line(self) -> str:
        elapsed = time.time() - (self.work_started or self.started)
        rate = self.counted / elapsed if self.counted and elapsed > 0 else 0.0
        remaining = self.total - self.done
        eta = _fmt_seconds(remaining / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"
        return f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%) {shown} {self.unit}/s ETA {eta}"

    def _print(self, final: bool) -> None:
        text = self.line()
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        # On a terminal, end the bar's line; in a log, repeat only unprinted progress.
        if self.total and (self.tty or self.last_done != self.done):
            self._print(final=True)
