"""The progress bar of a bench run (rich, on stderr): cases done, the case and the stage running."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as _Progress, TextColumn, TimeElapsedColumn


class Progress:
    def __init__(self, total: int):
        self._bar = _Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              TextColumn("{task.description} [dim]{task.fields[stage]}"),
                              console=Console(file=sys.__stderr__), transient=False)
        self._bar.start()
        self._task = self._bar.add_task("", total=total, stage="")
        self._started = 0

    def start_case(self, name: str) -> None:
        if self._started:
            self._bar.advance(self._task)
        self._started += 1
        self._bar.update(self._task, description=name, stage="")

    def stage(self, text: str) -> None:
        self._bar.update(self._task, stage=text)

    def close(self) -> None:
        if self._started:
            self._bar.advance(self._task)
        self._bar.update(self._task, description="done", stage="")
        self._bar.stop()
