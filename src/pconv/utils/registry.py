"""Tiny name registries, so the CLI choices, export metadata and tests all read one list."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def close_matches(name: str, choices: list[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, choices, n=n, cutoff=0.5)


def did_you_mean(name: str, choices: list[str]) -> str:
    close = close_matches(name, choices)
    valid = ", ".join(sorted(choices))
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? Valid: {valid}"
    return f"valid choices: {valid}"


class Registry(Generic[T]):
    """A named collection of implementations (neurons, threshold methods, calibrations)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}", did_you_mean(name, self.names())) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
