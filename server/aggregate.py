"""Weighted averaging of model updates near the memory-bandwidth limit.

Flower's ``aggregate_arrayrecords`` deserialises every array of every reply (``np.load``: a copy),
multiplies it by its weight (a second temporary) and adds it to a float accumulator, then
serialises the result again: several model-sized temporaries and passes per reply. Here:

- a reply's array is read as a zero-copy, read-only view of its ``.npy`` bytes (:func:`npy_view`);
- the screen (finite values, update norm) reads each update once, one tensor at a time;
- the weighted sum is one fused multiply-add pass per update (``torch.add_(alpha=w)``), computed
  key by key directly in the output's ``.npy`` buffer, so the only model-sized allocation is the
  result itself.

Arrays are duck-typed (``stype``, ``data``, ``numpy()``): nothing here imports Flower.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hcc_fl.shared.wire import NPY_STYPE, array_view, npy_view

__all__ = ["NPY_STYPE", "all_finite", "array_view", "coordinatewise", "mean_and_distances",
           "npy_header", "npy_view", "sq_distance", "weighted_mean"]


def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (magic, version 1.0, dict, padding) of a C-ordered array, as
    ``np.save`` writes it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.getvalue()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing ``a``'s memory (read-only views are only ever read here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": we only read
        return torch.from_numpy(np.ascontiguousarray(a))


def sq_distance(update: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray] | None) -> float:
    """``||update - reference||^2`` over all float arrays (``reference`` None: ``||update||^2``);
    NaN or inf when any value is non-finite. One tensor-sized temporary at a time."""
    total = 0.0
    for key, v in update.items():
        if not np.issubdtype(v.dtype, np.floating):
            continue
        tv = _tensor(v).reshape(-1)
        tdt = torch.float64 if tv.dtype == torch.float64 else torch.float32
        tv = tv.to(tdt)  # no copy when already float32/64
        if reference is not None:
            tv = torch.sub(tv, _tensor(reference[key]).reshape(-1).to(tdt))
        total += float(torch.dot(tv, tv))
    return total


def all_finite(update: Mapping[str, np.ndarray]) -> bool:
    """Whether every float value is finite (the exact check, used when a norm is not)."""
    return all(bool(np.all(np.isfinite(v))) for v in update.values()
               if np.issubdtype(v.dtype, np.floating))


def _factors(updates: Sequence[Any], weights: Sequence[float]) -> list[float]:
    """The normalised weights, checked: one per update, summing to a positive number."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    return [float(w) / total for w in weights]


def mean_and_distances(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
    reference: Mapping[str, np.ndarray] | None, dtypes: Mapping[str, np.dtype[Any]] | None = None,
    chunk: int = 1 << 16,
) -> tuple[dict[str, tuple[np.dtype[Any], tuple[int, ...], bytes]], list[float]]:
    """The weighted mean (as :func:`weighted_mean`) and every update's squared distance to
    ``reference`` (as :func:`sq_distance`) in ONE pass over the updates.

    Float arrays are walked in chunks of ``chunk`` values: a chunk of the reference and of the
    accumulator stays in cache while every update's chunk is read once, giving both its
    distance (``d = u - ref`` in a chunk-sized scratch buffer) and its share of the mean. The
    memory traffic is one read of every update plus one read of the reference and one write of
    the result. The caller screens with the distances and, only if it rejects an update,
    recomputes the mean of the rest with :func:`weighted_mean`."""
    factors = _factors(updates, weights)
    sq = [0.0] * len(updates)
    out: dict[str, tuple[np.dtype[Any], tuple[int, ...], bytes]] = {}
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for key, first in updates[0].items():
        views = [first, *(u[key] for u in updates[1:])]
        shape = tuple(first.shape)
        if not all(np.issubdtype(v.dtype, np.floating) for v in views):
            out.update(weighted_mean([{key: v} for v in views], weights,
                                     {key: dtypes[key]} if dtypes and key in dtypes else None))
            continue
        acc_dt = np.dtype(np.float64 if any(v.dtype == np.float64 for v in views)
                          else np.float32)
        dt = np.dtype(dtypes[key]) if dtypes and key in dtypes else acc_dt
        header = npy_header(dt, shape)
        n = math.prod(shape)
        direct = dt == acc_dt
        buf = bytearray(len(header) + (n * acc_dt.itemsize if direct else 0))
        buf[:len(header)] = header
        acc_np = (np.frombuffer(buf, dtype=acc_dt, offset=len(header)) if direct
                  else np.empty(n, dtype=acc_dt))
        acc = torch.from_numpy(acc_np)
        flat = [_tensor(v.reshape(-1)) for v in views]
        tdt = torch.float64 if acc_dt == np.float64 else torch.float32
        ref = _tensor(reference[key].reshape(-1)) if reference is not None else None
        if ref is not None and ref.dtype != tdt:
            ref = ref.to(tdt)  # a copy of one array, only for mixed precision
        if tdt not in scratch:
            scratch[tdt] = torch.empty(chunk, dtype=tdt)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            a, d = acc[s:e], scratch[tdt][:e - s]
            r = ref[s:e] if ref is not None else None
            for i, (u, f) in enumerate(zip(flat, factors, strict=True)):
                uc = u[s:e]
                if r is not None:
                    torch.sub(uc, r, out=d)
                else:
                    d.copy_(uc)
                sq[i] += float(torch.dot(d, d))
                if i == 0:
                    torch.mul(uc, f, out=a)
                else:
                    a.add_(uc, alpha=f)
        out[key] = (dt, shape, bytes(buf) if direct else header + acc_np.astype(dt).tobytes())
    return out, sq


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                  dtypes: Mapping[str, np.dtype[Any]] | None = None,
                  base: Mapping[str, np.ndarray] | None = None) -> dict[str, tuple[np.dtype[Any],
                                                                              tuple[int, ...],
                                                                              bytes]]:
    """``sum_i w_i u_i / sum_i w_i`` per key (plus ``base`` when the updates are deltas), as
    ``key -> (dtype, shape, .npy bytes)``.

    Float keys are accumulated in float32 (float64 if an input is float64) in the output buffer
    itself, in the order given (fixed order: the result is reproducible); the output dtype is
    ``dtypes[key]`` when given (the global model's), else the accumulator's. Other dtypes
    (integer counters) give the float64 weighted mean, as Flower's aggregation does, or, when
    ``dtypes[key]`` is an integer dtype, the mean rounded to it (the global model's dtype)."""
    factors = _factors(updates, weights)
    out: dict[str, tuple[np.dtype[Any], tuple[int, ...], bytes]] = {}
    for key, first in updates[0].items():
        views = [first, *(u[key] for u in updates[1:])]
        shape = tuple(first.shape)
        if not all(np.issubdtype(v.dtype, np.floating) for v in views):
            mean = sum(np.asarray(v, dtype=np.float64) * f for v, f in
                       zip(views, factors, strict=True))
            arr = np.asarray(mean, dtype=np.float64)
            dt: np.dtype[Any] = np.dtype(np.float64)
            if dtypes and key in dtypes and not np.issubdtype(dtypes[key], np.floating):
                dt = np.dtype(dtypes[key])
                arr = np.rint(arr).astype(dt)
        else:
            acc_dt = np.dtype(np.float64 if any(v.dtype == np.float64 for v in views)
                              else np.float32)
            dt = np.dtype(dtypes[key]) if dtypes and key in dtypes else acc_dt
            header = npy_header(dt, shape)
            # Accumulate in the output's own .npy buffer when no cast follows.
            buf = bytearray(len(header) + (math.prod(shape) * acc_dt.itemsize
                                           if dt == acc_dt else 0))
            buf[:len(header)] = header
            acc = (np.frombuffer(buf, dtype=acc_dt, offset=len(header)).reshape(shape)
                   if dt == acc_dt else np.empty(shape, dtype=acc_dt))
            rest = list(zip(views, factors, strict=True))
            if base is not None and key in base:
                np.copyto(acc, base[key], casting="unsafe")
            else:
                (v0, f0), rest = rest[0], rest[1:]
                np.multiply(v0, f0, out=acc, casting="unsafe")
            tacc = torch.from_numpy(acc)
            for v, f in rest:
                tacc.add_(_tensor(v), alpha=f)
            if dt == acc_dt:
                out[key] = (dt, shape, bytes(buf))
            else:
                out[key] = (dt, shape, header + acc.astype(dt).tobytes())
            continue
        out[key] = (dt, shape, npy_header(dt, shape) + arr.tobytes())
    return out


def coordinatewise(
    updates: Sequence[Mapping[str, np.ndarray]], method: str, trim_fraction: float = 0.0,
    dtypes: Mapping[str, np.dtype[Any]] | None = None, chunk: int = 1 << 16,
) -> dict[str, tuple[np.dtype[Any], tuple[int, ...], bytes]]:
    """Coordinate-wise ``median`` or ``trimmed_mean`` of the updates (each site one vote: the
    robust rules ignore example counts), as ``key -> (dtype, shape, .npy bytes)``.

    ``trimmed_mean`` drops the ``floor(trim_fraction * k)`` largest and smallest values of each
    coordinate over the ``k`` updates and averages the rest. One pass: each key is walked in
    chunks of ``chunk`` values, the updates' chunks copied into one ``k x chunk`` buffer and
    reduced along the first axis with numpy (``np.median``; ``np.sort`` then the mean of the
    kept rows), so the only model-sized allocation is the result. Accumulates in float32
    (float64 if an input is); the output dtype is ``dtypes[key]`` when given (integer
    counters rounded), else the accumulator's."""
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown coordinate-wise rule {method!r}")
    k = len(updates)
    if k == 0:
        raise ValueError("need at least one update")
    cut = int(trim_fraction * k) if method == "trimmed_mean" else 0
    if cut < 0 or k - 2 * cut < 1:
        raise ValueError(f"trim_fraction {trim_fraction} leaves no update of {k}")
    out: dict[str, tuple[np.dtype[Any], tuple[int, ...], bytes]] = {}
    for key, first in updates[0].items():
        views = [first.reshape(-1), *(u[key].reshape(-1) for u in updates[1:])]
        shape = tuple(first.shape)
        floats = all(np.issubdtype(v.dtype, np.floating) for v in views)
        acc_dt = np.dtype(np.float32 if floats and not any(v.dtype == np.float64 for v in views)
                          else np.float64)
        dt = np.dtype(dtypes[key]) if dtypes and key in dtypes else acc_dt
        n = math.prod(shape)
        res = np.empty(n, dtype=acc_dt)
        stack = np.empty((k, min(chunk, max(n, 1))), dtype=acc_dt)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            block = stack[:, :e - s]
            for i, v in enumerate(views):
                block[i] = v[s:e]
            if method == "median":
                np.median(block, axis=0, out=res[s:e])
            else:
                block.sort(axis=0)
                np.mean(block[cut:k - cut], axis=0, out=res[s:e])
        arr = res.reshape(shape)
        if not np.issubdtype(dt, np.floating):
            arr = np.rint(arr)
        out[key] = (dt, shape, npy_header(dt, shape) + arr.astype(dt, copy=False).tobytes())
    return out
