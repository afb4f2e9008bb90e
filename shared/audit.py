"""Append-only audit logs (JSON Lines) at every site and at the coordinator.

One line per message received or sent and per decision taken: time, who (``actor``), run,
round, message type, peer, payload bytes, the *names* of the metrics it carried and the decision
(``accepted``, ``refused: ...``, ``rejected: ...``). Values, file paths and identifiers are never
written: callers pass only names, counts and fixed reason strings.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_ALLOWED = {"actor", "event", "run", "round", "type", "peer", "bytes", "metrics", "decision",
            "arm", "detail"}


class AuditLog:
    """Appends one JSON object per line; every line is flushed and fsync'ed as written."""

    def __init__(self, path: Path | str | None, actor: str) -> None:
        self.path = Path(path) if path else None
        self.actor = actor
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        """Append ``event`` with ``fields`` (keys from a fixed list; anything else is an error)."""
        if self.path is None:
            return
        unknown = set(fields) - _ALLOWED
        if unknown:
            raise KeyError(f"audit fields not allowed: {sorted(unknown)}")
        line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "actor": self.actor, "event": event,
                **{k: v for k, v in fields.items() if v is not None}}
        data = (json.dumps(line, sort_keys=False, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def metric_names(records: Iterable[Any]) -> list[str]:
    """Sorted metric/config key names of some records (names only, never values)."""
    names: set[str] = set()
    for rec in records:
        names.update(str(k) for k in rec)
    return sorted(names)


def payload_bytes(content: Any) -> int:
    """Bytes of a Flower message payload (a ``RecordDict``, duck-typed so that this module does
    not import Flower): array data plus the text size of metric and config entries."""
    total = 0
    for arrays in content.array_records.values():
        total += sum(len(a.data) for a in arrays.values())
    records: list[Any] = [*content.metric_records.values(), *content.config_records.values()]
    for rec in records:
        total += sum(len(str(k)) + len(str(v)) for k, v in rec.items())
    return total


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All entries of an audit log (for tests and the report)."""
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
