"""Child-process helpers shared by the coordinator and the site client."""

from __future__ import annotations

import contextlib
import signal


def die_with_parent() -> None:
    """``preexec_fn`` for ``subprocess.Popen``: ask Linux to SIGKILL the child when its parent
    dies, so that a coordinator or site killed with SIGKILL leaves no SuperLink, SuperNode or
    nginx holding its port. A no-op where ``prctl`` is not available."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
