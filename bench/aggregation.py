"""Aggregation of site updates at the coordinator vs the memory-bandwidth bound.

Usage: python bench/aggregation.py [--sites 10] [--reps 3]

Ten replies carrying ResNet-50-shaped state dicts (MONAI ``resnet50``, 2-D, 1000 classes:
25.6 M values, 324 tensors incl. BatchNorm buffers) are built as real Flower ``Message``s.
Timed side by side in one process, interleaved, best of ``--reps``:

- ``memcpy bound``: copying every update's bytes once (``np.copyto``), the least any mean of
  them can cost: each byte of each update must be read at least once;
- ``hcc-fl strategy``: ``HccFedAvg.aggregate_train`` as the coordinator runs it (reply checks,
  finite/norm screen against the global model, weighted mean, metrics);
- ``Flower FedAvg``: ``flwr.serverapp.strategy.FedAvg.aggregate_train`` on the same replies;
- ``numpy in place`` and ``torch in place``: a hand-written weighted sum over deserialised arrays
  (``Array.numpy()``), for reference.

Peak extra memory is the rise of the process's peak RSS (``VmHWM``, reset before each method)
over the resident size before it, in model copies (one copy = the fp32 model's bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_reset, rss_bytes, write_result  # noqa: E402

from hcc_fl.server.aggregate import array_view  # noqa: E402
from hcc_fl.server.strategy import build_strategy  # noqa: E402


def resnet50_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from monai.networks.nets import resnet50

    sd = resnet50(spatial_dims=2, n_input_channels=3, num_classes=1000).state_dict()
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def make_state(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
               gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for k, (shape, dt) in shapes.items():
        if dt.is_floating_point:
            out[k] = torch.randn(shape, generator=gen) * scale
        else:
            out[k] = torch.zeros(shape, dtype=dt) + 5
    return out


def make_reply(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    TaskIdentity.node_id = 1
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                   message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
    return Message(content, reply_to=sent)


def measure(fn: Callable[[], Any], model_bytes: int) -> tuple[float, float]:
    gc.collect()
    before = rss_bytes("VmRSS")
    peak_rss_reset()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    extra = (rss_bytes("VmHWM") - before) / model_bytes
    del out
    gc.collect()
    return dt, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--memory-only", action="store_true",
                   help="(internal) measure peak extra memory only, print it as JSON")
    a = p.parse_args()
    TaskIdentity.run_id, TaskIdentity.task_id = 7, 1
    shapes = resnet50_shapes()
    gen = torch.Generator().manual_seed(0)
    global_state = make_state(shapes, gen, 1.0)
    global_rec = ArrayRecord(global_state)
    del global_state
    n_values = sum(int(np.prod(s)) for s, _ in shapes.values())
    model_bytes = sum(int(np.prod(s)) * (4 if dt.is_floating_point else 8)
                      for s, dt in shapes.values())
    sites = {100 + i: f"site_{i:02d}" for i in range(a.sites)}
    replies = []
    for node in sites:
        st = {k: v.numpy().copy() for k, v in global_rec.to_torch_state_dict().items()}
        upd = make_state(shapes, gen, 0.01)
        replies.append(make_reply(node, {k: torch.from_numpy(st[k]) + upd[k] for k in st},
                                  20 + node % 7))
        del st, upd
    gc.collect()
    weights = [float(r.content["metrics"]["num-examples"]) for r in replies]  # type: ignore[arg-type]

    # The memcpy bound: copy every update's arrays once into a preallocated buffer.
    views = [{k: array_view(v) for k, v in r.content["arrays"].items()} for r in replies]
    scratch = {k: np.empty_like(v) for k, v in views[0].items()}

    def memcpy() -> None:
        for upd in views:
            for k, v in upd.items():
                np.copyto(scratch[k], v)

    def hcc_fl() -> Any:
        s = build_strategy("fedavg", a.sites)
        s.setup_sites("bench", sites, list(sites), min_sites=1,  # type: ignore[attr-defined]
                      max_norm_ratio=10.0)
        s.set_global(global_rec)  # type: ignore[attr-defined]
        arrays, _ = s.aggregate_train(1, replies)
        assert arrays is not None and not s.rejections  # type: ignore[attr-defined]
        return arrays

    def flower() -> Any:
        arrays, _ = FedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
        return arrays

    def numpy_inplace() -> Any:
        tot = sum(weights)
        acc: dict[str, np.ndarray] = {}
        for r, w in zip(replies, weights, strict=True):
            for k, v in r.content["arrays"].items():
                x = v.numpy()
                if k in acc:
                    acc[k] += x * (w / tot)
                else:
                    acc[k] = x * (w / tot)
        return acc

    def torch_inplace() -> Any:
        tot = sum(weights)
        acc: dict[str, torch.Tensor] = {}
        for r, w in zip(replies, weights, strict=True):
            for k, v in r.content["arrays"].items():
                x = torch.from_numpy(v.numpy())
                if k in acc:
                    acc[k].add_(x.to(acc[k].dtype), alpha=w / tot)
                else:
                    acc[k] = x.double() * (w / tot) if not x.is_floating_point() else x * (w / tot)
        return acc

    methods: dict[str, Callable[[], Any]] = {
        "memcpy bound": memcpy, "hcc-fl strategy": hcc_fl, "Flower FedAvg": flower,
        "numpy in place": numpy_inplace, "torch in place": torch_inplace}
    # The results agree (checked once, outside the timing).
    ours, ref = hcc_fl(), flower()
    max_diff = max(float(np.max(np.abs(ours[k].numpy() - ref[k].numpy()))) for k in ref)
    del ours, ref
    if a.memory_only:
        print("MEMORY " + json.dumps({m: measure(fn, model_bytes)[1] for m, fn in methods.items()}))
        return
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(a.reps):
        for name, fn in methods.items():
            times[name].append(measure(fn, model_bytes)[0])
    # Memory in a second process whose large blocks come straight from (and go back to) the
    # OS, so that RSS shows live memory only: in this one glibc keeps freed tensor-sized blocks
    # and a later method reuses them unseen. (Timed here, with the normal allocator.)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    mem = subprocess.run([sys.executable, __file__, "--sites", str(a.sites), "--memory-only"],
                         env=env, check=True, capture_output=True, text=True).stdout
    extras = json.loads(next(x for x in mem.splitlines() if x.startswith("MEMORY "))[7:])
    bound = min(times["memcpy bound"])
    rows = []
    for name in methods:
        best = min(times[name])
        rows.append({"method": name, "best_s": round(best, 4),
                     "times_s": [round(t, 4) for t in times[name]],
                     "x_memcpy_bound": round(best / bound, 2),
                     "peak_extra_model_copies": round(extras[name], 2),
                     "goal": "<= 3x bound, <= 2 extra copies" if name == "hcc-fl strategy"
                     else None})
        print(f"{name:16s} {best:7.3f} s  {best / bound:5.2f}x bound  "
              f"extra memory {extras[name]:.2f} model copies")
    gbps = a.sites * model_bytes / bound / 1e9
    path = write_result("aggregation", rows, a.out, sites=a.sites, values_per_model=n_values,
                        model_bytes=model_bytes, tensors=len(shapes),
                        memcpy_gb_per_s=round(gbps, 2), max_abs_diff_vs_flower=max_diff)
    print(f"memcpy {gbps:.2f} GB/s; max |hcc-fl - Flower| = {max_diff:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
