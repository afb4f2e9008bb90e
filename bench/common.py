"""Shared helpers of the benchmark scripts: machine description and the JSON result file.

Every benchmark writes ``bench/results/<name>.json`` with the keys ``benchmark``, ``command``
(the command that reproduces it), ``machine`` (see :func:`machine_info`), ``created`` and
``rows`` (a list of flat dicts), plus free-form ``goals`` and ``notes``. ``bench/table.py``
regenerates the tables of ``bench/README.md`` from these files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU model and count, memory, load, Python/torch versions."""
    info: dict[str, Any] = {
        "device": device, "cpu": _cpu_model(), "cpus": os.cpu_count(),
        "mem_gib": _mem_gib(), "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(name: str, rows: list[dict[str, Any]], out: Path | None = None,
                 device: str = "cpu", **extra: Any) -> Path:
    """Write ``<out>/<name>.json`` (default ``bench/results``) and return its path."""
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv)
    root = RESULTS.parent.parent
    if argv and Path(argv[0]).is_absolute() and Path(argv[0]).is_relative_to(root):
        argv[0] = str(Path(argv[0]).relative_to(root))
    result = {"benchmark": name, "command": "python " + shlex.join(argv),
              "machine": machine_info(device),
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "rows": rows, **extra}
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def peak_rss_reset() -> None:
    """Reset this process's peak-RSS mark (Linux: ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (``VmRSS``) or peak since the last reset (``VmHWM``) resident memory, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
