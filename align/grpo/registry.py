"""A name -> function table for the GRPO maths (advantages, loss aggregations, KL estimators).

Why: a recipe names a variant ("dr_grpo", "k3") and the trainer looks it up here; every entry of
one table shares one signature, so adding a variant is one decorated function and the caller never
branches on a name. Unknown names and double registrations fail loudly, listing what exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from align.errors import AlignError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions registered under unique names; `what` names the table in error messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: `@TABLE.register("name")`. A name can be taken once."""

        def add(fn: F) -> F:
            if name in self._fns:
                raise AlignError(f"{self.what} {name!r} is already registered "
                                 f"(by {self._fns[name].__qualname__}); pick another name")
            self._fns[name] = fn
            return fn

        return add

    def get(self, name: str) -> F:
        """The function registered as `name`; AlignError listing the known names otherwise."""
        try:
            return self._fns[name]
        except KeyError:
            raise AlignError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
