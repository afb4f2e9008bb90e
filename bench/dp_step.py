"""DP step time over non-private step time per model: Opacus per-sample hooks vs ghost clipping.

    .venv/bin/python bench/dp_step.py [--reps 3]

One step = one call of hcc-fl's own code on one batch: ``train_one_round`` (non-private,
batch = the whole toy site) and ``dp_train_round`` with sample rate 1 (one DP-SGD step over the
same batch, wrapper set-up included). The three variants are interleaved and the best of
``--reps`` is kept, so the ratios are measured side by side. Writes
``bench/results/dp_step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hcc_fl.client.data import SiteData
from hcc_fl.client.privacy import dp_train_round
from hcc_fl.client.train import TrainConfig, train_one_round
from hcc_fl.shared.models import build_model, input_shape

BATCH = {"tiny": 8, "full": 2}


def _site(profile: str, device: str) -> SiteData:
    frames, size = input_shape("ki67_ceus", profile)
    n = BATCH[profile]
    g = torch.Generator().manual_seed(0)
    return SiteData(video=torch.randn(n, 1, frames, size, size, generator=g),
                    clinical=torch.randn(n, 7, generator=g),
                    label=(torch.arange(n) % 2).float(), survival={},
                    manifest_sha256="bench")


def _time(fn, device: str) -> float:  # type: ignore[no-untyped-def]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(profile: str, device: str, reps: int) -> dict[str, object]:
    """Best-of-``reps`` step times of the three variants for one model profile."""
    data = _site(profile, device)
    n = len(data)

    def plain() -> None:
        model = build_model("ki67_ceus", profile)
        train_one_round(model, data, TrainConfig(epochs=1, batch_size=n, device=device,
                                                 augment=False))

    def batch(idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (data.video[idx], data.clinical[idx]), data.label[idx]

    def private(mode: str) -> None:
        model = build_model("ki67_ceus", profile)
        dp_train_round(model, n, batch, torch.nn.BCEWithLogitsLoss(), epochs=1, lr=1e-3,
                       weight_decay=1e-4, noise_multiplier=1.0, max_grad_norm=1.0,
                       sample_rate=1.0, seed=0, device=device, grad_sample_mode=mode)

    variants = {"plain": plain, "hooks": lambda: private("hooks"),
                "ghost": lambda: private("ghost")}
    for fn in variants.values():  # warm-up (allocations, cuDNN autotune)
        fn()
    best = {k: float("inf") for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            best[k] = min(best[k], _time(fn, device))
    return {"profile": profile, "batch": n, "plain_s": best["plain"], "hooks_s": best["hooks"],
            "ghost_s": best["ghost"], "hooks_ratio": best["hooks"] / best["plain"],
            "ghost_ratio": best["ghost"] / best["plain"],
            "faster": "hooks" if best["hooks"] <= best["ghost"] else "ghost"}


def main() -> int:
    """Measure and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profiles", default="tiny,full")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for profile in args.profiles.split(","):
        row = measure(profile, device, args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = Path(__file__).parent / "results" / f"dp_step_{device}.json"
    out.write_text(json.dumps({"benchmark": "dp_step", "device": name, "torch": torch.__version__,
                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
