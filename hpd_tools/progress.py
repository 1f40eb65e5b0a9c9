"""Progress for long work, through tqdm: a bar on a terminal, a log line every
ten seconds otherwise (tqdm's own line, sent to the ``hpd_tools.progress``
logger, so it reaches log files and ``-v`` filtering like any other line).

Rate and ETA count only work actually done in this run: skipped or reused work
advances the position but not the rate (``update(n, count_rate=False)``
moves tqdm's ``initial`` with it), so the ETA of a resumed run is honest. The
rate is the run's average (``smoothing=0``), not tqdm's moving average: a cache
run alternates fast reused units with teacher work, and the average is what
predicts the end.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("hpd_tools.progress")


class _ToLog:
    """A file for tqdm that logs each line it writes (tqdm writes '\\r' + line)."""

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            log.info(text)

    def flush(self) -> None:
        pass


class Progress:
    def __init__(self, total: int, unit: str, desc: str, interval: float | None = None):
        # Imported here: tqdm reads its TQDM_* environment defaults when imported,
        # and the CLI sets TQDM_DISABLE (for libraries' bars) once it has parsed -v.
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: the bar is updated from the work itself
        self.tty = sys.stderr.isatty()
        self.desc = desc
        self.bar = tqdm(total=total, disable=False, unit=f" {unit}", desc=desc, file=sys.stderr if self.tty else _ToLog(), ascii=not self.tty,
                        mininterval=interval if interval is not None else (0.5 if self.tty else 10.0), smoothing=0, dynamic_ncols=self.tty,
                        # rates as units per second, never tqdm's inverted seconds per unit
                        bar_format=("{l_bar}{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}]" if self.tty
                                    else "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) {rate_noinv_fmt} ETA {remaining}"))

    def note(self, message: str) -> None:
        log.info("%s: %s", self.desc, message)

    def restart_clock(self) -> None:
        """Measure the rate from now (after a model load, say)."""
        self.bar.start_t = self.bar.last_print_t = time.time()
        self.bar.initial = self.bar.n

    def update(self, n: int, count_rate: bool = True) -> None:
        if not count_rate:
            self.bar.initial += n  # position moves, the rate does not
        self.bar.set_description_str(self.desc, refresh=False)
        self.bar.update(n)
        if self.bar.n >= (self.bar.total or 0) and self.bar.last_print_n != self.bar.n:  # the last update always shows
            self.bar.refresh()
            self.bar.last_print_n = self.bar.n

    def close(self) -> None:
        if not self.tty:  # in a log: the last position once (tqdm's close would repeat a line already logged)
            if self.bar.n != self.bar.last_print_n:
                self.bar.refresh()
            self.bar.leave = False
        self.bar.close()
