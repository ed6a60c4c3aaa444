"""Pairs CSV ``id_image,spot_image[,same]``: the one parser (``eval`` and ``verify-pair`` both read through it).

Extra columns pass through; relative paths resolve against the CSV's folder. A row that cannot
be used carries the reason in ``error`` (the caller decides: verify-pair writes it into that row's
output, eval skips the pair or stops).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lblctl.core.errors import LblError

TRUE_WORDS = {"1", "true", "yes", "same", "y", "t"}
FALSE_WORDS = {"0", "false", "no", "different", "diff", "n", "f"}


@dataclass
class PairRow:
    line: int  # the row's line in the file (1 = the header)
    values: list[str]  # one per header column: short rows padded with "", long rows cut
    header: list[str]
    id_image: str = ""  # resolved paths ("" when the row has an error before them)
    spot_image: str = ""
    same: int | None = None  # 1 / 0, or None without a same column or with an empty value
    error: str = ""  # why the row cannot be scored; "" = usable

    def get(self, column: str, default: str = "") -> str:
        """The raw value of ``column`` in this row."""
        return self.values[self.header.index(column)] if column in self.header else default


class PairsFile:
    """A pairs CSV read as a stream, its header checked when opened."""

    def __init__(self, csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        self.path = Path(csv_path)
        if not self.path.is_file():
            raise LblError(f"--pairs {self.path}: no such file")
        self.root = Path(root) if root is not None else self.path.parent
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise LblError(f"--pairs {self.path}: empty file; expected a header id_image,spot_image[,same]")
        self.fieldnames = [h.strip() for h in header]
        missing = {"id_image", "spot_image"} - set(self.fieldnames)
        if missing:
            raise LblError(
                f"--pairs {self.path}: header lacks {', '.join(sorted(missing))}; "
                f"expected id_image,spot_image[,same], found {','.join(self.fieldnames)}"
            )
        self.col = {c: self.fieldnames.index(c) for c in ("id_image", "spot_image", "same") if c in self.fieldnames}
        self.has_same = "same" in self.col

    def resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else str(self.root / p)

    def parse(self, line: int, values: list[str]) -> PairRow:
        """One CSV row as a :class:`PairRow` (never raises: a bad row gets its ``error``)."""
        n = len(self.fieldnames)
        row = PairRow(line, values + [""] * (n - len(values)) if len(values) < n else values, self.fieldnames)
        if len(values) > n:
            row.error = f"malformed row: {len(values)} values for {n} columns"
            row.values = values[:n]
            return row
        id_img, spot_img = row.values[self.col["id_image"]].strip(), row.values[self.col["spot_image"]].strip()
        if not id_img or not spot_img:
            row.error = "empty id_image" if not id_img else "empty spot_image"
            return row
        row.id_image, row.spot_image = self.resolve(id_img), self.resolve(spot_img)
        if self.has_same:
            raw = row.values[self.col["same"]]
            v = raw.strip().lower()
            if v in TRUE_WORDS:
                row.same = 1
            elif v in FALSE_WORDS:
                row.same = 0
            elif v:
                row.error = f"same='{raw}' is not 1/0 or true/false"
        return row

    def __iter__(self) -> Iterator[PairRow]:
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for values in reader:
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue  # blank line
                yield self.parse(reader.line_num, values)

    def chunks(self, rows: int) -> Iterator[list[PairRow]]:
        """The rows, ``rows`` at a time (streaming: memory does not grow with the file)."""
        chunk: list[PairRow] = []
        for row in self:
            chunk.append(row)
            if len(chunk) == rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
