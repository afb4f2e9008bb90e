"""The installed hcc-fl version and a hash of its code (carried by every run)."""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    """``<version>+<first 12 hex of the SHA-256 over the package's .py and .yaml files>``."""
    try:
        version = metadata.version("hcc-fl")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for sub in ("server", "client", "shared", "configs"):
        base = root / sub
        for path in sorted(base.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return f"{version}+{h.hexdigest()[:12]}"
