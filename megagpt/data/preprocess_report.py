"""What a preprocessing run reports: counts, timings, and the bad input lines it skipped (named by file and line).

Kept apart from the pipeline so tools that read corpora another way (tools/train_tokenizer.py) report bad lines
the same way.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

MAX_REPORTED_BAD_LINES = 10  # bad lines named in a report (all are counted)


@dataclass(frozen=True)
class BadLine:
    """One skipped input line: where it is and why it was skipped."""

    path: str
    line: int  # 1-based line number within `path` (Parquet: row number)
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PreprocessSummary:
    """Counts and timings of one run; `report()` is the closing log line."""

    documents: int = 0  # documents written (per key; all keys get the same count)
    tokens: int = 0  # tokens written, summed over keys, eod included
    bytes_read: int = 0  # input bytes consumed (decompressed)
    lines: int = 0  # non-blank input lines (records) seen
    skipped: int = 0  # bad lines skipped
    empty: int = 0  # good lines whose text tokenized to nothing
    skipped_by_reason: dict = field(default_factory=dict)
    first_bad: list = field(default_factory=list)  # first 10 BadLine
    seconds: float = 0.0  # wall time of the whole call
    first_write_seconds: float = 0.0  # call start -> first document written (start-up cost)
    outputs: dict = field(default_factory=dict)  # label (json key, or input stem/key) -> output prefix
    backend: str = ""  # which tokenizer backend ran, and why
    inputs: int = 0  # input files
    resumed_inputs: int = 0  # inputs a previous run had finished (their counts are included above)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def report(self) -> str:
        text = (f"Done: {self.documents} documents, {self.tokens} tokens, {self.bytes_read / 1e6:.2f} MB in "
                f"{self.seconds:.2f} s ({self.mb_per_s:.2f} MB/s, {self.tokens_per_s:.0f} tokens/s); "
                f"skipped {self.skipped} bad lines, {self.empty} empty documents")
        if self.resumed_inputs:
            text += f"; {self.resumed_inputs} of {self.inputs} inputs finished by an earlier run (counted here)"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped_by_reason.items()))
            text += f" ({reasons}); first {len(self.first_bad)}:\n" + "\n".join(f"  {b}" for b in self.first_bad)
        return text

    def add(self, documents: int, tokens: int, nbytes: int, lines: int, empty: int, reasons: dict,
            bad: Sequence[BadLine]) -> None:
        """Count one chunk (or one input a previous run finished) in."""
        self.documents += documents
        self.tokens += tokens
        self.bytes_read += nbytes
        self.lines += lines
        self.empty += empty
        total = Counter(self.skipped_by_reason)
        total.update(reasons)
        self.skipped_by_reason, self.skipped = dict(total), sum(total.values())
        self.first_bad.extend(bad[: max(0, MAX_REPORTED_BAD_LINES - len(self.first_bad))])

    def ledger_entry(self) -> dict:
        """The counts a finished input leaves in the progress ledger (see `add`)."""
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes_read, "lines": self.lines,
                "empty": self.empty, "reasons": self.skipped_by_reason,
                "first_bad": [[b.line, b.reason] for b in self.first_bad]}
