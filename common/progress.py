"""What a long command tells its user while it runs: a time estimate, and plain progress lines where no live bar shows
(a log file, a pipe, a SLURM job). Extraction, probe and finetune all report through `Pace`."""

from __future__ import annotations

import time

from rich.console import Console


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.5 h`: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Pace:
    """The estimated time of a whole run, said once after its first steps, and a plain progress line at most every
    `every` seconds when the console is not a terminal (a log file, a pipe, a batch job), where no live bar shows.

    Extraction (`unit="image"`), `probe` (`fit`) and `finetune` all report through it. Short runs stay quiet: the
    estimate is said only when the run will take at least `quiet_below` seconds.
    """

    clock = staticmethod(time.monotonic)
    eta_after = 20  # steps measured before the estimate
    quiet_below = 30.0

    def __init__(self, console: Console | None, what: str, total_steps: int, every: float = 30.0, unit: str = "step") -> None:
        self.console, self.what, self.total, self.every, self.unit = console, what, max(int(total_steps), 1), every, unit
        self.plain = console is not None and not console.is_terminal
        self.start = self.last = self.clock()
        self.estimated = False

    def step(self, done: int, where: str = "") -> None:
        """`done` steps of the run are finished; `where` says where it is (e.g. `epoch 3/100`)."""
        if self.console is None:
            return
        done, now = min(done, self.total), self.clock()
        elapsed = now - self.start
        left = elapsed / max(done, 1) * (self.total - done)
        if not self.estimated and done >= min(self.eta_after, self.total):
            self.estimated = True
            if elapsed + left >= self.quiet_below:
                self.console.print(f"{self.what}: about {duration(elapsed + left)} for the whole run "
                                   f"(estimated from the first {done} of {self.total} {self.unit}s)", highlight=False, soft_wrap=True)
        if self.plain and now - self.last >= self.every and done < self.total:
            self.last = now
            self.console.print(f"{self.what}: {where + ', ' if where else ''}{self.unit} {done}/{self.total} ({100 * done / self.total:.0f}%), "
                               f"{duration(elapsed)} elapsed, about {duration(left)} left", highlight=False, soft_wrap=True)
