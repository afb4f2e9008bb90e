"""Site identity bound to the key: who a node is comes from the coordinator's allow-list.

Flower's SuperLink (SuperNode authentication on) accepts a node's requests only when they are
signed by the private key of a registered public key, and fixes the node id at registration;
the ServerApp's ``Grid.get_nodes()`` reports each node's registered public key. So the
coordinator does not need the site's word for who it is:

- a node's **name and role** are those of the allow-list entry (``authorized/<site>.pub``,
  ``authorized/<site>.role``) holding the key the node authenticated with;
- a node whose key is on no allow-list entry (e.g. revoked, but still registered in an old
  SuperLink database) is refused before it is sent anything;
- a node whose ``site_info`` claim (name, role) disagrees with its key's entry is refused:
  named in the audit log and on the console, and never sent another message;
- the allow-list is re-read whenever nodes are listed, messages are pushed and replies are
  pulled (several times per round), so a key revoked while a run goes on takes its node out
  of the run: nothing more is sent to it, a reply it still sends is refused, and a round stops
  waiting for it.

:class:`SiteGate` wraps the ServerApp's ``Grid`` and is what every query of the ServerApp and
the strategy goes through. This module does not import Flower (``make_refusal`` builds Flower's
error replies for it); it reads the allow-list with :mod:`hcc_fl.server.certs`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcc_fl.server.certs import CertError, public_key_der, site_role
from hcc_fl.shared.audit import AuditLog

log = logging.getLogger("hcc_fl.coordinator")


@dataclass(frozen=True)
class Identity:
    """A site as the coordinator's allow-list declares it."""

    site: str
    role: str
    key: bytes  # DER SubjectPublicKeyInfo


class AllowList:
    """The coordinator's allow-list (``<pki>/authorized``), as it is on disk at every call: the
    folder is listed each time (names, sizes, modification times) and its keys are parsed again
    only when that listing changed."""

    def __init__(self, authorized: Path) -> None:
        self.folder = Path(authorized)
        self._cached: tuple[tuple[tuple[str, int, int], ...], dict[bytes, Identity]] | None = None

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return ()
        out = []
        for e in entries:
            try:
                st = e.stat()
            except OSError:  # moved away meanwhile
                continue
            out.append((e.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))

    def _read(self, folder: Path) -> dict[bytes, str]:
        out: dict[bytes, str] = {}
        for pub in sorted(folder.glob("*.pub")):
            try:
                out[public_key_der(pub.read_bytes())] = pub.stem
            except (OSError, ValueError) as exc:  # moved away meanwhile, or not a key
                log.warning("allow-list: %s skipped (%s)", pub.name, type(exc).__name__)
        return out

    def current(self) -> dict[bytes, Identity]:
        """Key (DER) -> identity of every allow-listed site, as the folder is now."""
        listing = self._listing()
        if self._cached is not None and self._cached[0] == listing:
            return dict(self._cached[1])
        out = {}
        for key, name in self._read(self.folder).items():
            try:
                role = site_role(self.folder.parent, name)
            except (CertError, OSError) as exc:
                log.warning("allow-list: %s skipped (%s)", name, exc)
                continue
            out[key] = Identity(name, role, key)
        self._cached = (listing, out)
        return dict(out)

    def revoked_name(self, key: bytes) -> str | None:
        """The site a revoked key belonged to (``<pki>/revoked``), if any."""
        return self._read(self.folder.parent / "revoked").get(key)

    def lookup(self, public_key: bytes) -> Identity | None:
        """The allow-listed identity of a key (PEM or OpenSSH bytes), or None."""
        try:
            der = public_key_der(public_key)
        except ValueError:
            return None
        return self.current().get(der)


def claim_problem(identity: Identity, claimed_site: str, claimed_role: str,
                  expected_role: str | None) -> str | None:
    """Why a node's own claim cannot be accepted (None if it can).

    ``identity`` comes from the node's key; ``expected_role`` is the role the run's
    configuration gives the site (None: the site is not part of this run)."""
    if claimed_site != identity.site:
        return (f"claims to be {claimed_site} but authenticated with the key of "
                f"{identity.site}")
    if claimed_role != identity.role:
        return (f"claims the role {claimed_role}; the allow-list declares {identity.site} "
                f"{identity.role}")
    if expected_role is not None and expected_role != identity.role:
        return (f"the allow-list declares {identity.site} {identity.role}; the run's "
                f"configuration has it {expected_role}")
    return None


class SiteGate:
    """A ``Grid`` (Flower's ServerApp grid) that only lets allow-listed, unrefused nodes in.

    ``make_refusal(sent_message, reason)`` builds the error reply that stands for a reply
    refused here (or not waited for), so that callers record the refusal, not a timeout.
    ``audit`` gets one ``refused`` entry per node, naming the site whose key it holds.
    """

    # Flower's own send_and_receive sleeps 3 s between pulls; a pull is one local call to the
    # SuperLink, so polling faster costs little and takes up to 2.5 s off every exchange.
    poll_s = 0.5

    def __init__(self, grid: Any, allow: AllowList, audit: AuditLog,
                 make_refusal: Callable[[Any, str], Any]) -> None:
        self.grid = grid
        self.allow = allow
        self.audit = audit
        self.make_refusal = make_refusal
        self.expected: dict[str, str] = {}  # site -> role in the run's configuration
        self.identity: dict[int, Identity] = {}  # node id -> identity of its key
        self.refused: dict[int, str] = {}  # node id -> why
        self._sent: dict[str, Any] = {}  # message id -> message, until its reply came

    def __getattr__(self, name: str) -> Any:  # run, set_run, create_message, ...
        return getattr(self.grid, name)

    # --- who is who -----------------------------------------------------------------------
    def name(self, node: int) -> str:
        """The site a node's key belongs to (for logs), else ``node-<id>``."""
        ident = self.identity.get(node)
        return ident.site if ident else f"node-{node}"

    def refuse(self, node: int, site: str, reason: str) -> None:
        """Take ``node`` out of the run for good: audit log, console, never sent again."""
        if node in self.refused:
            return
        self.refused[node] = reason
        log.error("refused node %d (%s): %s", node, site, reason)
        self.audit.record("refused", peer=site, decision=f"refused: {reason}")

    def _revoked(self, node: int, current: dict[bytes, Identity]) -> bool:
        """True (and the node refused) if the node's key left the allow-list."""
        ident = self.identity.get(node)
        if node in self.refused:
            return True
        if ident is not None and ident.key not in current:
            self.refuse(node, ident.site, "its key was revoked (no longer on the allow-list)")
            return True
        return False

    def _scan(self) -> list[Any]:
        """The SuperLink's online nodes that may take part: each node's registered key is
        looked up in the allow-list as it is now."""
        current = self.allow.current()
        out = []
        for info in self.grid.get_nodes():
            node = int(info.node_id)
            if node in self.refused:
                continue
            try:
                der = public_key_der(bytes(info.public_key))
            except ValueError:
                der = b""
            ident = current.get(der)
            if ident is None:
                known = self.identity.get(node)
                old = known.site if known else self.allow.revoked_name(der)
                self.refuse(node, old or f"node-{node}",
                            "its key was revoked (no longer on the allow-list)" if old
                            else "its key is not on the coordinator's allow-list")
                continue
            self.identity[node] = ident
            out.append(info)
        for node in list(self.identity):
            self._revoked(node, current)
        return out

    def allowed(self, node: int) -> bool:
        """Whether ``node`` may be sent messages now (allow-list re-read)."""
        return not self._revoked(node, self.allow.current()) and node in self.identity

    def refused_sites(self) -> set[str]:
        """Allow-listed sites whose key a refused node holds (they cannot also join)."""
        return {self.identity[n].site for n in self.refused if n in self.identity}

    def check_claim(self, node: int, site: str, role: str) -> str | None:
        """Check a node's ``site_info`` claim against its key; refuse it on a mismatch.
        Returns the reason of a refusal (None: accepted)."""
        ident = self.identity.get(node)
        if ident is None:  # not seen by _scan: look its key up now
            self._scan()
            ident = self.identity.get(node)
        if node in self.refused:
            return self.refused[node]
        if ident is None:
            self.refuse(node, f"node-{node}", "its key is not on the coordinator's allow-list")
            return self.refused[node]
        problem = claim_problem(ident, site, role, self.expected.get(ident.site))
        if problem is not None:
            self.refuse(node, ident.site, problem)
        return problem

    # --- the Grid interface ---------------------------------------------------------------
    def get_nodes(self) -> list[Any]:
        """Flower's node infos of the nodes that may take part."""
        return self._scan()

    def get_node_ids(self) -> list[int]:
        """Ids of the nodes that may take part."""
        return [int(info.node_id) for info in self._scan()]

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        """Push the messages whose destination may take part; the others are not sent.
        Returns the message ids in order, "" for a message not sent (as Flower does for a
        message it did not store)."""
        current = self.allow.current()
        msgs = list(messages)
        ok = []
        for m in msgs:
            node = int(m.metadata.dst_node_id)
            if self._revoked(node, current) or node not in self.identity:
                self.audit.record("not-sent", type=str(m.metadata.message_type),
                                  peer=self.name(node),
                                  decision=f"refused: {self.refused.get(node, 'not identified')}")
                continue
            ok.append(m)
        ids = [str(i) for i in self.grid.push_messages(ok)] if ok else []
        by_msg = {}
        for m, mid in zip(ok, ids, strict=True):
            by_msg[id(m)] = mid
            if mid:
                self._sent[mid] = m
        return [by_msg.get(id(m), "") for m in msgs]

    def _refusal(self, mid: str) -> Any | None:
        sent = self._sent.pop(mid, None)
        if sent is None:
            return None
        node = int(sent.metadata.dst_node_id)
        return self.make_refusal(sent, f"refused by the coordinator: {self.name(node)} "
                                 f"{self.refused.get(node, '')}".strip())

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        """Pull replies; a reply from a node refused meanwhile is replaced by a refusal."""
        ids = list(message_ids)
        replies = list(self.grid.pull_messages(ids))
        current = self.allow.current()
        out = []
        for r in replies:
            mid = str(r.metadata.reply_to_message_id)
            sent = self._sent.get(mid)
            node = int(sent.metadata.dst_node_id) if sent is not None else \
                int(r.metadata.src_node_id)
            if node in self.identity and self._revoked(node, current):
                self.audit.record("received", type=str(r.metadata.message_type),
                                  peer=self.name(node), bytes=0,
                                  decision=f"refused: {self.refused[node]}")
                refusal = self._refusal(mid)
                if refusal is not None:
                    out.append(refusal)
                continue
            self._sent.pop(mid, None)
            out.append(r)
        return out

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        """Flower's ``send_and_receive`` (push, then pull until every reply came or
        ``timeout``), except that it stops waiting for a node as soon as it is refused."""
        pending = set(self.push_messages(messages)) - {""}
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        out: list[Any] = []
        while pending:
            got = self.pull_messages(pending)
            out.extend(got)
            pending -= {str(r.metadata.reply_to_message_id) for r in got}
            current = self.allow.current()
            for mid in list(pending):
                sent = self._sent.get(mid)
                if sent is not None and self._revoked(int(sent.metadata.dst_node_id), current):
                    pending.discard(mid)
                    refusal = self._refusal(mid)
                    if refusal is not None:
                        out.append(refusal)
            if not pending or time.monotonic() >= end:
                break
            time.sleep(min(self.poll_s, max(0.0, end - time.monotonic())))
        for mid in pending:  # timed out: the caller records the timeout
            self._sent.pop(mid, None)
        return out
