"""Name -> entry tables for the project's registries (backbones, datasets, heads), with one way to say a name is unknown.

Entries register themselves when their module is imported, as timm's models do; a name registered twice is a bug
(ValueError), an unknown name is a user's mistake (MedfmError listing the names there are).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from common.errors import MedfmError

T = TypeVar("T")


def unknown(kind: str, name: str, names: Iterable[str], hint: str = "") -> MedfmError:
    """The one message for an unknown name, whether the registry is loaded or only its list of names is."""
    return MedfmError(f"unknown {kind} '{name}'; choose one of: {', '.join(names)}" + (f" (see `{hint}`)" if hint else ""))


class Registry(Generic[T]):
    """The entries of one kind, in registration order; `hint` is the command that lists them."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind, self.hint = kind, hint
        self.entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self.entries:
            raise ValueError(f"{self.kind} {name} registered twice")
        self.entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise unknown(self.kind, name, self.entries, self.hint)
        return self.entries[name]

    def values(self) -> list[T]:
        return list(self.entries.values())
