"""Regenerate the measured tables of bench/README.md from bench/results/*.json.

Usage: python bench/table.py [--check]

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in bench/README.md
and is rebuilt from ``bench/results/NAME.json`` (with the machine and the command that made
it); text outside the markers is left alone. ``--check`` exits 1 when the README is stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, dict)):
        return "; ".join(_fmt(x) for x in v) if isinstance(v, list) else json.dumps(v)
    return str(v).replace("|", "/")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def generic(result: dict[str, Any]) -> list[str]:
    """Every scalar column of the rows, in first-seen order."""
    cols: list[str] = []
    for r in result["rows"]:
        for k, v in r.items():
            if k not in cols and not isinstance(v, dict):
                cols.append(k)
    return _table(cols, [[r.get(c) for c in cols] for r in result["rows"]])


def parity(result: dict[str, Any]) -> list[str]:
    def ms(r: dict[str, Any], arm: str) -> str:
        m, s = r.get(f"{arm}_mean"), r.get(f"{arm}_sd")
        return "-" if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")

    rows = [[r["task"], r["model"], r["measure"], ms(r, "centralized"), ms(r, "fedavg"),
             ms(r, "fedprox"), ms(r, "best_local"), f"{r['fed_minus_central']:+.3f}",
             "-" if r["fed_minus_best_local"] is None else f"{r['fed_minus_best_local']:+.3f}",
             "yes" if r["goal_within_0_01_of_central"] else "no",
             "yes" if r["goal_0_05_above_best_local"] else "no"]
            for r in result["rows"]]
    return _table(["task", "model", "measure", "centralized", "FedAvg", "FedProx",
                   "best local (per seed)", "best fed - central", "best fed - best local",
                   "within 0.01 of central", ">= 0.05 above best local"], rows)


def aggregation(result: dict[str, Any]) -> list[str]:
    rows = [[r["method"], f"{r['best_s']:.3f} s", f"{r['x_memcpy_bound']:.2f}x",
             f"{r['peak_extra_model_copies']:.2f}", r.get("goal") or ""]
            for r in result["rows"]]
    return _table(["method", "time (best)", "x memcpy bound", "peak extra memory (model copies)",
                   "goal"], rows)


def wire(result: dict[str, Any]) -> list[str]:
    rows = [[r["model"], r["tensors"], r["transfer"],
             f"{r['bytes_per_site_round'] / 3 / 1e6:.3f} MB", r["objects_per_site_round"],
             f"{r['x_fp32_payload']:.3f}x", f"{r['x_fp32_with_http']:.3f}x", r.get("goal") or ""]
            for r in result["rows"]]
    lines = _table(["model", "tensors", "transfer", "per message", "objects per site-round",
                    "x fp32 (payload)", "x fp32 (with HTTP framing)", "goal"], rows)
    if result.get("auc"):
        lines += ["", "External AUC, ki67_ceus, FedAvg, same seed: " + ", ".join(
            f"{a['transfer']} {a['external_auc']:.3f}" for a in result["auc"]) + "."]
    return lines


def overhead(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    plain = next((r for r in rows if r["mode"] == "plain"), None)
    out = []
    for r in rows:
        extra = (r["wall_R1_s"] - plain["wall_R1_s"]) if plain else None
        out.append([r["mode"], r["local_epochs"], f"{r['wall_R1_s']:.1f} s",
                    "-" if extra is None or r is plain else f"{extra:+.1f} s",
                    f"{r['wall_R3_s']:.1f} s"])
    lines = _table(["mode", "local epochs", "wall, 1 round", "extra over plain, 1 round",
                    "wall, 3 rounds (disturbed, see text)"], out)
    bd = (result.get("deployment_breakdown") or {})
    warm, cold = bd.get("deployment") or {}, bd.get("deployment-cold") or {}
    if warm and cold:
        lines += ["", "Seconds per ClientApp process in deployment (median; Flower's cold start "
                  "-> hcc-fl's warm launcher): " + ", ".join(
                      f"{k} {cold[k]['total_s']:.1f} -> {warm[k]['total_s']:.1f}"
                      for k in warm if k in cold) + "."]
    return lines


def scale(result: dict[str, Any]) -> list[str]:
    rows = []
    for r in result["rows"]:
        kinds = r.get("at_peak_pss_by_kind_mib") or {}
        workers = sum(v["pss"] for k, v in kinds.items() if "worker" in k.lower())
        rounds = r.get("round_s") or []
        later = rounds[1:] or rounds
        per_site = sum(later) / len(later) / r["sites"] if later else None
        rows.append([r["sites"], f"{r['peak_pss_mib']:.0f} MiB ({r['peak_rss_sum_mib']:.0f})",
                     f"{workers:.0f} MiB", f"{r['first_round_start_s']:.0f} s",
                     ", ".join(f"{x:.1f}" for x in rounds) + " s",
                     "-" if per_site is None else f"{per_site:.2f} s",
                     "/".join(str(x) for x in r.get("train_replies_per_round") or []),
                     f"{r['wall_s']:.0f} s"])
    return _table(["sites", "peak PSS of the process tree (RSS sum)", "of which Ray workers",
                   "round 1 starts at", "round times", "per site, later rounds",
                   "training replies per round", "wall"], rows)


FORMATS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "parity": parity, "aggregation": aggregation, "wire": wire, "scale": scale,
    "overhead": overhead}


def render(name: str) -> list[str]:
    path = BENCH / "results" / f"{name}.json"
    if not path.exists():
        return [f"(no `bench/results/{name}.json` yet)"]
    result = json.loads(path.read_text())
    m = result.get("machine", {})
    machine = (f"{m.get('device', '?')}: {m.get('cpu', '?')}, {m.get('cpus', '?')} cores, "
               f"{m.get('mem_gib', '?')} GiB, torch {m.get('torch', '?')}, load at start "
               f"{m.get('load_avg_at_start', '?')}")
    lines = FORMATS.get(name, generic)(result)
    return [*lines, "", f"Machine: {machine}; {result.get('created', '')}.  ",
            f"Command: `{result.get('command', '?')}`"]


def rebuild(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        return f"<!-- table:{name} -->\n" + "\n".join(render(name)) + f"\n<!-- /table:{name} -->"

    return re.sub(r"<!-- table:(\w+) -->.*?<!-- /table:\1 -->", repl, text, flags=re.S)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if bench/README.md is stale")
    a = p.parse_args()
    old = README.read_text()
    new = rebuild(old)
    if a.check:
        sys.exit(0 if new == old else 1)
    README.write_text(new)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
