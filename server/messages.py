"""Count the messages an arm sends, by kind, and the wall time spent waiting for their replies.

Every message to a site costs seconds in a deployment (a fresh ClientApp process, Flower's 3 s
pull interval on both sides), so the number of messages per kind is what an arm's deployment
time is made of. :class:`CountingGrid` wraps the coordinator's Grid (outside the identity gate,
so a message the gate does not send is not counted) and records, per message type:

* ``exchanges``: calls that sent a batch of messages (one per round of a step),
* ``messages``: messages pushed, ``replies``: replies pulled (error replies included),
  ``errors``: error replies,
* ``wait_s``: wall time from the push of a batch until its last reply came (or the last pull
  that found none, for a batch that timed out); for ``send_and_receive`` the wall time of the
  call (the wrapped grid's own, pull interval unchanged).

:meth:`CountingGrid.summary` goes into the arm's ``result.json`` and ``metrics.json``
(``federated.<arm>.messages``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Kind:
    exchanges: int = 0
    messages: int = 0
    replies: int = 0
    errors: int = 0
    wait_s: float = 0.0


@dataclass
class _Batch:
    kind: str
    start: float
    pending: set[str] = field(default_factory=set)
    last: float = 0.0


class CountingGrid:
    """A Grid that counts what passes through it; everything else is the wrapped grid's."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.kinds: dict[str, _Kind] = {}
        self._batches: dict[str, _Batch] = {}  # message id -> its batch

    def __getattr__(self, name: str) -> Any:  # run, get_node_ids, create_message, ...
        return getattr(self.grid, name)

    def _kind(self, name: str) -> _Kind:
        return self.kinds.setdefault(name, _Kind())

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        msgs = list(messages)
        start = time.monotonic()
        ids = [str(i) for i in self.grid.push_messages(msgs)]
        by_kind: dict[str, _Batch] = {}
        for m, mid in zip(msgs, ids, strict=False):
            kind = str(m.metadata.message_type)
            batch = by_kind.get(kind)
            if batch is None:
                batch = by_kind[kind] = _Batch(kind, start, last=start)
                self._kind(kind).exchanges += 1
            if mid:
                self._kind(kind).messages += 1
                batch.pending.add(mid)
                self._batches[mid] = batch
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        ids = [str(i) for i in message_ids]
        replies = list(self.grid.pull_messages(ids))
        now = time.monotonic()
        for mid in ids:
            if mid in self._batches:
                self._batches[mid].last = now
        for r in replies:
            batch = self._batches.pop(str(r.metadata.reply_to_message_id), None)
            if batch is None:
                continue
            k = self._kind(batch.kind)
            k.replies += 1
            k.errors += int(bool(r.has_error()))
            batch.pending.discard(str(r.metadata.reply_to_message_id))
            if not batch.pending:
                k.wait_s += now - batch.start
        return replies

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        """The wrapped grid's own ``send_and_receive`` (its pull interval unchanged), counted:
        the call's wall time is the batch's wait (shared by message count between the kinds of
        a mixed batch)."""
        msgs = list(messages)
        start = time.monotonic()
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        elapsed = time.monotonic() - start
        sent: dict[str, int] = {}
        for m in msgs:
            kind = str(m.metadata.message_type)
            sent[kind] = sent.get(kind, 0) + 1
        for kind, count in sent.items():
            k = self._kind(kind)
            k.exchanges += 1
            k.messages += count
            k.wait_s += elapsed * count / len(msgs)
        for r in replies:
            k = self._kind(str(r.metadata.message_type))
            k.replies += 1
            k.errors += int(bool(r.has_error()))
        return replies

    def _close(self, pending: Iterable[str]) -> None:
        """Batches that will not complete (timed out): their wait ends at the last pull."""
        for mid in pending:
            batch = self._batches.pop(mid, None)
            if batch is not None and batch.pending:
                batch.pending.clear()
                self._kind(batch.kind).wait_s += batch.last - batch.start

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{message type: {exchanges, messages, replies, errors, wait_s}}`` and ``total``."""
        self._close(list(self._batches))
        out = {name: {"exchanges": k.exchanges, "messages": k.messages, "replies": k.replies,
                      "errors": k.errors, "wait_s": round(k.wait_s, 3)}
               for name, k in sorted(self.kinds.items())}
        out["total"] = {key: (round(sum(v[key] for v in out.values()), 3) if key == "wait_s"
                              else sum(v[key] for v in out.values()))
                        for key in ("exchanges", "messages", "replies", "errors", "wait_s")}
        return out
