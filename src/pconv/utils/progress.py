"""A minimal progress protocol so library code can report work without printing anything."""

from __future__ import annotations

from typing import Callable, Protocol


class Progress(Protocol):
    def stage(self, description: str, total: int | None) -> Callable[[], None]:
        """Begin a stage of `total` steps; returns the function to call after each step."""


class NoProgress:
    def stage(self, description: str, total: int | None) -> Callable[[], None]:
        return lambda: None
