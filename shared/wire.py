"""How model parameters travel: packed into one array per dtype, optionally as float16.

Flower 1.41 sends every ``Array`` of a record as its own object (one HTTP request each, plus
one per 5 MB chunk), so a model of 60 small tensors costs ~120 requests of ~1 kB of headers
each: for the tiny models that is 25 % on top of the parameters. Packed, a model is one float
array (and one array per other dtype, e.g. BatchNorm counters), whatever its tensor count.

A packed key names its dtype group and a fingerprint of the layout (names, shapes, dtypes in
state-dict order): ``packed.float.<fp>`` / ``packed.int64.<fp>``. The receiver unpacks with its
own model's layout and refuses a record whose fingerprint differs (a different model or code
version), naming both fingerprints.

``transfer`` modes: ``per-tensor`` (Flower's default record, for comparison), ``fp32`` (packed,
exact) and ``fp16`` (packed float parameters as float16: half the bytes; the coordinator keeps
and averages in float32).

Arrays are duck-typed Flower ``Array`` objects (``stype``/``data``/``numpy()``): nothing here
imports Flower.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

NPY_STYPE = "numpy.ndarray"
PACKED = "packed."
TRANSFERS = ("per-tensor", "fp32", "fp16")
Layout = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


@functools.lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` header; cached, since every reply of a
    round repeats the same headers and parsing one costs an ``ast.literal_eval``."""
    bio = io.BytesIO(header)
    version = np.lib.format.read_magic(bio)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return tuple(shape), bool(fortran), dtype


def npy_view(data: bytes) -> np.ndarray:
    """A read-only view of the array serialised in ``data`` (``np.save`` format), no copy."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy data")
    major = data[6]
    if major == 1:
        end = 10 + int.from_bytes(data[8:10], "little")
    elif major == 2:
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    shape, fortran, dtype = _parse_header(bytes(data[:end]))
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end)
    return flat.reshape(shape, order="F" if fortran else "C")


def array_view(arr: Any) -> np.ndarray:
    """Zero-copy view of a Flower ``Array`` when it holds ``.npy`` bytes, else ``numpy()``."""
    if getattr(arr, "stype", None) == NPY_STYPE:
        return npy_view(arr.data)
    return np.asarray(arr.numpy())


def layout_of(state: Mapping[str, Any]) -> Layout:
    """``name -> (shape, numpy dtype)`` of a state dict (torch tensors or numpy arrays)."""
    out: Layout = {}
    for k, v in state.items():
        dt = v.dtype
        np_dt = np.dtype(str(dt).removeprefix("torch.")) if not isinstance(dt, np.dtype) else dt
        out[k] = (tuple(int(s) for s in v.shape), np_dt)
    return out


def fingerprint(layout: Layout) -> str:
    h = hashlib.sha256()
    for k, (shape, dt) in layout.items():
        h.update(f"{k}:{','.join(map(str, shape))}:{dt.str};".encode())
    return h.hexdigest()[:16]


def is_packed(keys: Iterable[str]) -> bool:
    return any(str(k).startswith(PACKED) for k in keys)


def wire_dtype(keys: Iterable[str], views: Mapping[str, np.ndarray] | None = None) -> str:
    """The transfer mode of a record's keys (and the float group's dtype when views given)."""
    keys = list(keys)
    if not is_packed(keys):
        return "per-tensor"
    if views is not None:
        for k in keys:
            if k.startswith(PACKED + "float."):
                return "fp16" if views[k].dtype == np.float16 else "fp32"
    return "fp32"


def _is_float(dt: np.dtype[Any]) -> bool:
    return bool(np.issubdtype(dt, np.floating))


def pack(state: Mapping[str, np.ndarray], transfer: str = "fp32") -> dict[str, np.ndarray]:
    """One flat array of all float parameters (float16 for ``fp16``, else float32) and one
    flat array per other dtype, in state-dict order."""
    if transfer not in ("fp32", "fp16"):
        raise ValueError(f"pack: transfer must be fp32 or fp16, got {transfer!r}")
    layout = layout_of(state)
    fp = fingerprint(layout)
    groups: dict[str, list[np.ndarray]] = {}
    for k, v in state.items():
        dt = layout[k][1]
        groups.setdefault("float" if _is_float(dt) else dt.name, []).append(
            np.asarray(v).reshape(-1))
    fdt = np.float16 if transfer == "fp16" else np.float32
    out = {}
    for group, parts in groups.items():
        dtype = fdt if group == "float" else np.dtype(group)
        flat = np.empty(sum(p.size for p in parts), dtype=dtype)
        i = 0
        for p in parts:
            flat[i:i + p.size] = p
            i += p.size
        out[f"{PACKED}{group}.{fp}"] = flat
    return out


def unpack(packed: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The state dict of ``layout`` from :func:`pack`'s arrays: views where the dtype is the
    layout's, converted copies where not (float16 on the wire)."""
    fp = fingerprint(layout)
    groups = {k[len(PACKED):].rsplit(".", 1)[0]: v for k, v in packed.items()}
    theirs = {k.rsplit(".", 1)[-1] for k in packed}
    if theirs != {fp}:
        raise ValueError(f"packed parameters of layout {', '.join(sorted(theirs))} do not fit "
                         f"this model (layout {fp}): a different model or hcc-fl version")
    offsets: dict[str, int] = dict.fromkeys(groups, 0)
    out = {}
    for k, (shape, dt) in layout.items():
        group = "float" if _is_float(dt) else dt.name
        if group not in groups:
            raise ValueError(f"packed parameters lack the '{group}' group for '{k}'")
        n = math.prod(shape)
        part = groups[group][offsets[group]:offsets[group] + n]
        if part.size != n:
            raise ValueError(f"packed '{group}' array too short for '{k}'")
        offsets[group] += n
        part = part.reshape(shape)
        out[k] = part if part.dtype == dt else part.astype(dt)
    for group, used in offsets.items():
        if used != groups[group].size:
            raise ValueError(f"packed '{group}' array has {groups[group].size - used} values "
                             "more than the model")
    return out
