"""The bench's progress on stderr: a rich progress bar on a terminal, plain lines otherwise (logs, CI).

Either way each finished server run prints one summary line, so a long run shows its figures as they
come and a log keeps them.
"""

from __future__ import annotations

import sys


class BenchProgress:
    def __init__(self, stream=None):
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr, highlight=False)
        self._bar = None
        self._task = None

    def __enter__(self) -> "BenchProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, total: int) -> None:
        if not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("{task.description}"), console=self.console, transient=True,
                             refresh_per_second=2)  # a light redraw: the machine is busy measuring
        self._task = self._bar.add_task("", total=total)
        self._bar.start()

    def label(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)

    def note(self, text: str) -> None:
        self.console.print(f"qatserve bench: {text}", markup=False, soft_wrap=True)
