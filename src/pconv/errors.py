"""Typed errors. Library code raises these; only the CLI turns them into `Error: ...` lines."""

from __future__ import annotations


class PconvError(Exception):
    """Base class: a message saying what went wrong and a hint saying what to do about it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class ConfigError(PconvError, ValueError):
    """An option or argument is out of range or malformed (bad T, unknown method name, ...)."""


class UnsupportedModelError(PconvError):
    """The network contains something that cannot sit between spiking neurons."""

    def __init__(self, message: str, hint: str = "", module_path: str = ""):
        super().__init__(message, hint)
        self.module_path = module_path


class ModelLoadError(PconvError):
    """A model name, factory or checkpoint cannot be resolved or does not fit."""


class DataError(PconvError):
    """A data folder is missing, empty, or holds unreadable images."""


class FormatError(PconvError):
    """A pconv file is corrupt, truncated, of an unknown version, or inconsistent."""


class OutputExistsError(PconvError):
    """Refusing to overwrite an existing file without force=True."""
