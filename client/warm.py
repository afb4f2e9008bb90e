"""Warm ClientApp launcher of a site: one process per message, without the cold start.

Flower 1.41's SuperNode has its SuperExec start a fresh ``flwr-clientapp`` process for every
message, and ``flwr-clientapp`` exits after one message (also with ``--isolation process``,
whose SuperExec launches processes the same way; only Kubernetes has warm pools, and not for
ClientApps). Each such process imports Python, Flower, torch and hcc-fl and pays torch's first
optimizer construction (which imports ``torch._dynamo``): seconds per message, twice per round.

``hcc-fl-client`` therefore starts this launcher next to the SuperNode. It imports all of that
once (:func:`hcc_fl.client.guard.preload`), then listens on a Unix socket in the site's state
folder (mode 0600, and only peers with this user's uid are served). The ``flwr-clientapp``
shim on the SuperNode's PATH connects, hands over its arguments, environment, working folder
and stdio, and the launcher forks a child that runs the same guarded ClientApp
(:func:`hcc_fl.client.guard.main`: bundle check, then Flower's own ClientApp process code) and
exits after its one message, as before. The shim waits for the child's exit status and passes
signals on. If the launcher is not (yet) listening, the shim runs the cold path itself.

What a message sees is unchanged: a fresh process (a copy of the launcher, which holds no site
data and has run no message), the same code, environment and bundle check; numpy's and
Python's generators are reseeded from the OS in each child and torch's generator is at its
default state, as in a new process.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

log = logging.getLogger("hcc_fl.site.warm")
SOCKET_NAME = "clientapp.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    """One request: a JSON document (length-prefixed) and the shim's stdin/stdout/stderr."""
    fds = array.array("i")
    head, anc, _, _ = conn.recvmsg(4, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def _child(req: dict[str, object], fds: list[int]) -> int:
    """In the forked child: take over the shim's stdio, environment, folder and arguments, and
    run the guarded ClientApp for one message."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.chdir(str(req["cwd"]))
    env = req["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    argv = req["argv"]
    assert isinstance(argv, list)
    sys.argv = [str(a) for a in argv]
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    import random

    import numpy as np

    random.seed()
    np.random.seed()
    from hcc_fl.client import guard

    try:
        guard.main()
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an uncaught error in a new process
        import traceback

        traceback.print_exc()
        return 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    return 0


def serve(sock_path: Path) -> None:
    """Preload, then fork one child per request on ``sock_path`` until SIGTERM."""
    from hcc_fl.client import guard

    guard.preload()
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(sock_path))
    finally:
        os.umask(old)
    server.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stop = [False]

    def on_stop(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    waiting: dict[int, socket.socket] = {}  # child pid -> the shim waiting for its status
    log.info("warm ClientApp launcher ready (%s)", sock_path.name)
    try:
        while not stop[0]:
            ready: list[int] = []
            with contextlib.suppress(InterruptedError):
                ready, _, _ = select.select([server.fileno(), wake_r], [], [], 5.0)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    os.read(wake_r, 512)
            while waiting:  # reap finished children and tell their shims
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = waiting.pop(pid, None)
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
                    conn.close()
            if server.fileno() not in ready or stop[0]:
                continue
            conn, _ = server.accept()
            try:
                if _peer_uid(conn) != os.getuid():
                    conn.close()
                    continue
                req, fds = _recv_request(conn)
            except (OSError, ValueError, ConnectionError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the message's process
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    server.close()
                    conn.close()
                    code = _child(req, fds)
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(struct.pack("!i", pid))
                waiting[pid] = conn
            except OSError:
                conn.close()
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)


SHIM = '''# hcc-fl: Flower's ClientApp behind the site's bundle check, forked by the site's warm
# launcher (hcc_fl.client.warm) when it listens, else started cold with this Python.
import json, os, signal, socket, struct, sys, time
LAUNCH = repr(time.time())
COLD = [{python!r}, "-m", "hcc_fl.client.guard"]

def cold():
    os.execve(COLD[0], COLD + sys.argv[1:], {{**os.environ, "HCC_FL_LAUNCH_T": LAUNCH}})

def recv_int(s):
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            raise ConnectionError
        data += chunk
    return struct.unpack("!i", data)[0]

try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
    body = json.dumps({{"argv": sys.argv, "cwd": os.getcwd(),
                       "env": {{**os.environ, "HCC_FL_LAUNCH_T": LAUNCH}}}}).encode()
    s.sendmsg([struct.pack("!I", len(body))],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))])
    s.sendall(body)
    pid = recv_int(s)
except (OSError, ConnectionError):
    cold()
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda n, _f: os.kill(pid, n))
try:
    code = recv_int(s)
except (OSError, ConnectionError):
    code = 1
sys.exit(code if code >= 0 else 128 - code)
'''


def socket_path(state: Path) -> Path | None:
    """Where the launcher of the site with state folder ``state`` listens (None: the path
    would be too long for a Unix socket, so the site runs cold)."""
    path = (state / SOCKET_NAME).resolve()
    return path if len(str(path)) <= MAX_SOCKET_PATH else None


def write_shim(folder: Path, sock: Path | None) -> Path:
    """The ``flwr-clientapp`` for the SuperNode's PATH (returns ``folder``): with ``sock`` it
    asks the warm launcher first, otherwise (and when the launcher does not answer) it runs
    :mod:`hcc_fl.client.guard` with this Python."""
    import shlex

    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    if sock is None:
        script.write_text("#!/bin/sh\n# hcc-fl: Flower's ClientApp behind the site's bundle "
                          f"check\nexec {shlex.quote(sys.executable)} -m hcc_fl.client.guard "
                          "\"$@\"\n")
    else:  # the client is stdlib-only Python, started without site-packages (-I -S: ~20 ms)
        (folder / "flwr-clientapp.py").write_text(
            SHIM.format(python=sys.executable, sock=str(sock)))
        script.write_text("#!/bin/sh\n# hcc-fl: Flower's ClientApp behind the site's bundle "
                          "check, forked by the site's warm launcher\n"
                          f"exec {shlex.quote(sys.executable)} -I -S "
                          f"{shlex.quote(str(folder / 'flwr-clientapp.py'))} \"$@\"\n")
    script.chmod(0o755)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m hcc_fl.client.warm --socket PATH`` (started by ``hcc-fl-client``)."""
    p = argparse.ArgumentParser(prog="python -m hcc_fl.client.warm", description=__doc__)
    p.add_argument("--socket", required=True, help="Unix socket path (in the site's state)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hcc-fl: %(message)s")
    serve(Path(args.socket))


if __name__ == "__main__":
    main()
