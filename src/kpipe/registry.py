"""Registries: one table per choice (metrics, optimisers, schedulers, augmentation presets, TTA views).

Each registry is declared here, in the foundation, and filled by the library module that implements
its entries (``@METRICS.register("accuracy")`` in kpipe.eval.metrics). The config schema validates a
choice against the same registry (`config.Choice`), so adding a metric, an optimiser or a preset is one
decorated function in one file: the schema, the error messages and `kpipe --help`-style listings follow.
A registry loads its home module on first use, so the config can name choices without importing torch.
Usage: ``METRICS.get("macro_f1")``; ``METRICS.names()``; ``METRICS.check("acuracy")`` -> KpipeError with a suggestion
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from kpipe.errors import KpipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, home: str) -> None:
        self.kind, self.home = kind, home  # home: the module whose import fills the registry
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: add `obj` under `name`, with optional metadata (e.g. higher_is_better=True)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name], self._meta[name] = obj, meta
            return obj

        return add

    def _load(self) -> None:
        if not self._entries:
            importlib.import_module(self.home)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def check(self, name: str) -> str:
        """`name` if registered, else a KpipeError naming the closest entry and every choice."""
        names = self.names()
        if name not in self._entries:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise KpipeError(f"unknown {self.kind} '{name}'{hint}; choose one of {', '.join(names)}.")
        return name

    def get(self, name: str) -> T:
        return self._entries[self.check(name)]

    def meta(self, name: str) -> dict[str, Any]:
        self.check(name)
        return self._meta[name]


METRICS: Registry[Callable[..., float]] = Registry("metric", "kpipe.eval.metrics")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", "kpipe.nn.optim")
SCHEDULERS: Registry[Callable[..., Any]] = Registry("scheduler", "kpipe.nn.optim")
AUG_PRESETS: Registry[Any] = Registry("augmentation preset", "kpipe.data.presets")
AUG_OPS: Registry[Any] = Registry("augmentation op", "kpipe.data.presets")  # data.aug's list form
TTA_VIEWS: Registry[Callable[..., Any]] = Registry("TTA view", "kpipe.nn.tta")
