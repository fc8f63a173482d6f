"""The progress callback the operations report through (the CLI draws it).

Operations never import tqdm; they call ``progress.task(label, total)`` and
``advance(n)`` from any thread. The default does nothing.
"""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, label: str, total: int, *, unit: str = "B") -> ProgressTask: ...

    def message(self, text: str) -> None: ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """Reports nothing: for scripts, tests and ``--json``."""

    def task(self, label: str, total: int, *, unit: str = "B") -> ProgressTask:
        return _NullTask()

    def message(self, text: str) -> None:
        pass


NULL_PROGRESS: Progress = NullProgress()
