"""Progress display for long CLI commands: a live rich bar on a terminal, plain log
lines otherwise (CI logs, pipes), so output stays readable either way."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .train import StepStats

PLAIN_INTERVAL_S = 10.0  # seconds between plain log lines when not on a terminal


class _Display:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self._last_plain = 0.0

    def __enter__(self) -> Self:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.progress is not None:
            self.progress.__exit__(exc_type, exc, tb)

    def plain(self, line: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = now
            self.console.print(line, highlight=False, soft_wrap=True)


class PrepareProgress(_Display):
    """Stages of `data prepare`: reading, training tokenizer, tokenizing, shuffling (in
    documents)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.tasks: dict[str, TaskID] = {}

    def update(self, stage: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=total, info="documents")
            self.progress.update(self.tasks[stage], completed=done, total=total)
            return
        if done == 0:
            return
        first = stage not in self.tasks
        self.tasks.setdefault(stage, TaskID(len(self.tasks)))
        finished = total is not None and done == total
        of = f"/{total}" if total is not None else ""
        self.plain(f"{stage}: {done}{of} documents", force=first or finished)


class TrainProgress(_Display):
    """Step bar with training loss, latest validation loss and throughput."""

    def __init__(self, console: Console, steps: int) -> None:
        super().__init__(console)
        self.steps = steps
        self.start = time.perf_counter()
        self.val: float | None = None
        self.task: TaskID | None = None

    def update(self, stats: StepStats, tokens: int, val_loss: float | None) -> None:
        if val_loss is not None:
            self.val = val_loss
        rate = tokens / max(1e-9, time.perf_counter() - self.start)
        val = f"{self.val:.4f}" if self.val is not None else "-"
        info = f"loss {stats.loss:.4f}  val {val}  {rate:,.0f} tok/s  lr {stats.lr:.2e}"
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("train", total=self.steps, info=info)
            self.progress.update(self.task, completed=stats.step, info=info)
            if val_loss is not None:
                self.progress.console.print(f"step {stats.step}: validation loss {val_loss:.4f}")
            return
        self.plain(f"step {stats.step}/{self.steps}  {info}", force=val_loss is not None)


class SimProgress(_Display):
    """Steps per worker, with the latest validation loss of the global weights."""

    def __init__(self, console: Console, steps: int) -> None:
        super().__init__(console)
        self.steps = steps
        self.val: float | None = None
        self.task: TaskID | None = None

    def update(self, done: int, total: int, val_loss: float | None) -> None:
        if val_loss is not None:
            self.val = val_loss
        info = f"val {self.val:.4f}" if self.val is not None else ""
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task("simulate", total=total, info=info)
            self.progress.update(self.task, completed=done, info=info)
            return
        self.plain(f"step {done}/{total}  {info}", force=val_loss is not None)
