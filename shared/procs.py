"""Child-process helpers shared by the coordinator and the site client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def die_with_parent() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: ask Linux to SIGKILL the child when its parent
    dies, so that a coordinator or site killed with SIGKILL leaves no SuperLink, SuperNode or
    nginx holding its port. A no-op where ``prctl`` is not available."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM a child's process group (started with ``start_new_session``) if it still runs,
    SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
