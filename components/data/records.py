"""The flat row every reader produces and the error every reader reports.

Readers never stop at the first bad record: they return the good rows plus one `RecordError` per
problem, each naming the file, the record (id or index) and the field, so that validation can list
every failure and training can refuse to start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Splits of the embedded set. `heldin` = the training task types on images no training split holds
# (never trained on: tells "does not perceive" from "does not transfer"), `align` = image-caption
# pairs, `text` = text-only instructions (no image), `mme` = the MME-format yes/no set (always last).
SPLITS = ("train", "heldout", "heldin", "align", "text", "mme")


@dataclass(frozen=True)
class Row:
    id: str
    task: str
    split: str
    instruction: str  # the human turn with the "<image>" marker removed and stripped
    answer: str  # the gpt turn
    image: str | None  # path relative to the image root; None for text-only rows
    source: str  # the file the record came from
    index: int  # position of the record in that file

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RecordError:
    file: str
    record: str  # record id, or "#<index>" when the id itself is missing/bad, or "line L col C" for JSON syntax
    field: str  # e.g. "conversations[1].value", "image", "id"; "" for whole-file problems
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: record {self.record}" if self.record else self.file
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class DataError(ValueError):
    """Raised when a data source cannot be read at all (missing file, malformed JSON, no records)."""

    def __init__(self, errors: list[RecordError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))
