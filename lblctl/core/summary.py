"""What every stage's ``run(cfg, device)`` returns: one type, so that callers and commands treat all alike.

``figures`` are the JSON-able results (``--json`` prints exactly them). ``table``, ``notes`` and
``warnings`` are what a command shows a person instead; ``exit_code`` is the process status a
command should end with. A Summary reads like its figures (``s["steps"]``), so that library
callers need not know the difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Summary(Mapping[str, Any]):
    stage: str
    figures: dict[str, Any]
    table: Any = None  # a rich renderable; None = the figures as a key/value table
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exit_code: int = 0

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.figures)

    def __len__(self) -> int:
        return len(self.figures)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Summary):
            return (self.stage, self.figures, self.exit_code) == (other.stage, other.figures, other.exit_code)
        return isinstance(other, Mapping) and dict(self.figures) == dict(other)

    __hash__ = None  # type: ignore[assignment]
