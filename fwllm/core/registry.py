"""An explicit registry of data-informed methods (the built-in set is in `fwllm.methods.registry`)."""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List

from fwllm.core.errors import FwllmError
from fwllm.core.method import DataMethod


class Registry:
    def __init__(self, methods: Iterable[DataMethod] = ()):
        self._methods: Dict[str, DataMethod] = {}
        for method in methods:
            self.register(method)

    def register(self, method: DataMethod) -> DataMethod:
        if not method.name:
            raise ValueError(f"{type(method).__name__} has no name")
        if method.name in self._methods:
            raise ValueError(f"merge method {method.name!r} is already registered")
        self._methods[method.name] = method
        return method

    def get(self, name: str) -> DataMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise FwllmError(f"unknown fwllm method {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> List[str]:
        return sorted(self._methods)

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[DataMethod]:
        return iter(self._methods.values())
