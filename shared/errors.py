"""Errors that name the file, row and column of bad input (messages stay at the site)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataIssue:
    """One problem found in site data.

    ``row`` is the 1-based line number in the CSV file (the header is line 1), or None for a
    problem with the file as a whole.
    """

    file: str
    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"line {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.message}"


class DataError(ValueError):
    """Input data that cannot be used; ``issues`` lists every problem found."""

    def __init__(self, issues: list[DataIssue]) -> None:
        self.issues = issues
        head = "; ".join(str(i) for i in issues[:5])
        more = f" (and {len(issues) - 5} more)" if len(issues) > 5 else ""
        super().__init__(head + more)

    def summary(self) -> str:
        """A reason without file names, lines or values, for the coordinator and audit logs:
        the number of problems and the columns (schema names) they are in."""
        by_column: dict[str, int] = {}
        for issue in self.issues:
            key = issue.column or ("the file" if issue.row is None else "the row")
            by_column[key] = by_column.get(key, 0) + 1
        where = ", ".join(f"{k} ({n})" for k, n in sorted(by_column.items()))
        return f"{len(self.issues)} data problem(s) in {where}"

    @classmethod
    def single(
        cls, file: str | Path, message: str, row: int | None = None, column: str | None = None
    ) -> DataError:
        """Build an error with one issue."""
        return cls([DataIssue(str(file), message, row, column)])
