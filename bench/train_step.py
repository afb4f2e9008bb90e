"""CECMM training-step time per profile, hcc-fl's train_one_round vs a plain PyTorch loop.

Usage: python bench/train_step.py [--profiles tiny full] [--steps 5] [--out bench/results]
Both loops run interleaved in one process on the same model and batch, so the ratio is robust
to machine noise; absolute times are for the machine named in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hcc_fl.client.data import SiteData
from hcc_fl.client.train import TrainConfig, train_one_round
from hcc_fl.shared.models import build_model, input_shape


def plain_step(model: torch.nn.Module, data: SiteData, opt: torch.optim.Optimizer) -> None:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(data.video, data.clinical).squeeze(1), data.label
    )
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench(profile: str, steps: int, batch: int) -> dict[str, object]:
    torch.manual_seed(0)
    frames, size = input_shape("ki67_ceus", profile)
    data = SiteData(torch.randn(batch, 1, frames, size, size), torch.randn(batch, 7),
                    torch.tensor([0.0, 1.0] * (batch // 2)), "bench")
    model = build_model("ki67_ceus", profile)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = TrainConfig(epochs=1, batch_size=batch, augment=False)
    plain_step(model, data, opt)  # warm-up
    train_one_round(model, data, cfg)
    t_plain, t_hcc = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        plain_step(model, data, opt)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        train_one_round(model, data, cfg)
        t_hcc.append(time.perf_counter() - t0)
    best_plain, best_hcc = min(t_plain), min(t_hcc)
    return {"profile": profile, "batch": batch, "input": [1, frames, size, size],
            "plain_step_s": round(best_plain, 4), "hcc_fl_step_s": round(best_hcc, 4),
            "ratio": round(best_hcc / best_plain, 3),
            "samples_per_s_hcc_fl": round(batch / best_hcc, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--profiles", nargs="+", default=["tiny", "full"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [bench(prof, args.steps, 8 if prof == "tiny" else 2) for prof in args.profiles]
    result = {"benchmark": "train_step", "device": device, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
