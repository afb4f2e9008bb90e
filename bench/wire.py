"""Bytes on the wire per site per round, per transfer mode, vs the fp32 model size.

Usage: python bench/wire.py [--auc --data data/phantom --rounds 10]

A round sends each site the global model twice (training, then validation) and receives one
update. For each task's tiny model and for ResNet-50 shapes (25.6 M values), the three messages
are built as the coordinator and the site build them and serialised by Flower itself: the bytes
are the sum of the deflated objects Flower 1.41 transfers (one HTTP request per object). The
HTTP framing per object (request and response headers; ~1 kB measured in the nginx access log
of a TLS deployment) is added as ``objects x --per-object-bytes``.

``--auc`` also runs ``hcc-fl simulate`` (ki67_ceus, FedAvg, no baselines) with ``fp32`` and
``fp16`` transfer and records the external AUC of both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from hcc_fl.shared.models import build_model  # noqa: E402
from hcc_fl.shared.wire import pack  # noqa: E402

TASKS = ["ki67_ceus", "tace_ceus", "er_ceus", "aclf_us", "phcc_mri"]


def record(state: dict[str, np.ndarray], transfer: str) -> ArrayRecord:
    if transfer == "per-tensor":
        return ArrayRecord({k: Array(v) for k, v in state.items()})
    return ArrayRecord({k: Array(v) for k, v in pack(state, transfer).items()})


def message_cost(content: RecordDict) -> tuple[int, int]:
    """(bytes, objects) Flower transfers for one message with this content."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    msg = Message(content, dst_node_id=2, message_type="train")
    objs = get_all_nested_objects(msg)
    return sum(len(o.deflate()) for o in objs.values()), len(objs)


def round_cost(state: dict[str, np.ndarray], transfer: str) -> tuple[int, int]:
    rec = record(state, transfer)
    cfg = ConfigRecord({"server-round": 1, "local-epochs": 1, "batch-size": 8, "lr": 1e-3,
                        "weight-decay": 1e-4, "proximal-mu": 0.0})
    train = message_cost(RecordDict({"arrays": rec, "config": cfg}))
    evaluate = message_cost(RecordDict({"arrays": rec, "config": cfg}))
    reply = message_cost(RecordDict({"arrays": rec, "metrics": MetricRecord(
        {"num-examples": 40, "train-loss": 0.5})}))
    return (train[0] + evaluate[0] + reply[0], train[1] + evaluate[1] + reply[1])


def resnet50_state() -> dict[str, np.ndarray]:
    from monai.networks.nets import resnet50

    sd = resnet50(spatial_dims=2, n_input_channels=3, num_classes=1000).state_dict()
    return {k: v.numpy() for k, v in sd.items()}


def auc_run(data: Path, rounds: int, transfer: str) -> dict[str, Any]:
    exe = str(Path(sys.executable).parent / "hcc-fl")
    name = f"wire-{transfer}"
    t0 = time.monotonic()
    subprocess.run([exe, "simulate", "task=ki67_ceus", f"data_root={data}", "runs_dir=bench/runs",
                    f"run_name={name}", "strategy=fedavg", f"federation.rounds={rounds}",
                    "baselines.centralized=false", "baselines.local=false", "report=false",
                    "overwrite=true", f"federation.transfer={transfer}", "--quiet"], check=True,
                   stdout=subprocess.DEVNULL)
    m = json.loads(Path(f"bench/runs/{name}/metrics.json").read_text())
    return {"transfer": transfer, "external_auc": m["external"]["fedavg"]["auc"],
            "wall_s": round(time.monotonic() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-object-bytes", type=int, default=1000,
                   help="HTTP request+response framing per object (default %(default)s)")
    p.add_argument("--auc", action="store_true", help="also measure the external AUC effect")
    p.add_argument("--data", type=Path, default=Path("data/phantom"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    models: dict[str, dict[str, np.ndarray]] = {}
    for task in TASKS:
        models[f"{task} (tiny)"] = {k: v.numpy() for k, v in
                                    build_model(task, "tiny").state_dict().items()}
    models["ResNet-50 shapes"] = resnet50_state()
    rows = []
    for name, state in models.items():
        fp32 = sum(v.size * 4 if np.issubdtype(v.dtype, np.floating) else v.nbytes
                   for v in state.values())
        for transfer in ("per-tensor", "fp32", "fp16"):
            payload, objects = round_cost(state, transfer)
            with_http = payload + objects * a.per_object_bytes
            rows.append({"model": name, "tensors": len(state), "fp32_model_bytes": fp32,
                         "transfer": transfer, "bytes_per_site_round": payload,
                         "objects_per_site_round": objects,
                         "x_fp32_payload": round(payload / (3 * fp32), 4),
                         "x_fp32_with_http": round(with_http / (3 * fp32), 4),
                         "goal": {"fp32": "<= 1.02x", "fp16": "<= 0.52x"}.get(transfer)})
            print(f"{name:20s} {transfer:10s} {payload / 3 / 1e6:8.3f} MB/message "
                  f"{payload / (3 * fp32):6.3f}x payload {with_http / (3 * fp32):6.3f}x with "
                  f"HTTP ({objects} objects)")
    extra: dict[str, Any] = {"per_object_bytes": a.per_object_bytes,
                             "messages_per_site_round": 3}
    if a.auc:
        torch.set_num_threads(1)
        extra["auc"] = [auc_run(a.data, a.rounds, t) for t in ("fp32", "fp16")]
        print(extra["auc"])
    print(f"wrote {write_result('wire', rows, a.out, **extra)}")


if __name__ == "__main__":
    main()
