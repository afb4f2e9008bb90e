"""Phase timestamps of a site's ClientApp process, for finding where a message's time goes.

Off unless ``HCC_FL_TIMINGS`` names a file (a debug setting; ``bench/overhead.py`` sets it).
Each ClientApp process then appends one JSON line at exit: its message kind, site name and the
seconds from the process's launch to each phase (``python-ready``, ``flwr-imported``,
``task-pulled``, ``bundle-installed``, ``handler-start``, ``model-built``, ``data-loaded``,
``first-step``, ``trained``, ``handler-end``, ``exit``). Only durations and names are
written, never data. Stdlib only, so that importing it costs nothing.
"""

from __future__ import annotations

import json
import os
import time

ENV = "HCC_FL_TIMINGS"
LAUNCH_ENV = "HCC_FL_LAUNCH_T"  # set by the warm launcher's shim: when the shim was started

_marks: list[tuple[str, float]] = []
_info: dict[str, object] = {}
_written = False


def enabled() -> bool:
    """Whether phase timestamps are being collected in this process."""
    return bool(os.environ.get(ENV))


def process_start_time() -> float:
    """Wall-clock time at which this process was created (Linux ``/proc``; else now)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
        with open("/proc/stat") as fh:
            btime = next(int(x.split()[1]) for x in fh if x.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def mark(name: str) -> None:
    """Record that phase ``name`` was reached now."""
    if enabled():
        _marks.append((name, time.time()))


def note(**info: object) -> None:
    """Attach labels (message kind, site, mode) to this process's record."""
    if enabled():
        _info.update(info)


def write(exit_mark: bool = True) -> None:
    """Append this process's record to the file named by ``HCC_FL_TIMINGS`` (once)."""
    global _written
    path = os.environ.get(ENV)
    if not path or _written or not _marks:
        return
    _written = True
    if exit_mark:
        mark("exit")
    launch = float(os.environ.get(LAUNCH_ENV) or process_start_time())
    record = {"pid": os.getpid(), **_info,
              "phases": {name: round(t - launch, 4) for name, t in _marks}}
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
