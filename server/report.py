"""``hcc-fl report RUN_DIR``: a self-contained ``report.html`` (plots embedded, no network).

Reads only the run directory (``metrics.json``, ``history.jsonl``, ``config.json``): aggregate
statistics, never patient-level data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hcc_fl.shared.tasks import TASKS  # noqa: E402

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1100px;color:#1d2733;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0}
h2{border-bottom:2px solid #d8dee6;padding-bottom:4px;margin-top:32px}
.sub{color:#5a6878;margin-top:4px}table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #d8dee6;padding:4px 8px;text-align:right}th{background:#eef2f6}
td:first-child,th:first-child{text-align:left}figure{margin:8px 0 20px}
figcaption{color:#5a6878;font-size:0.85em}img{max-width:100%}.note{color:#5a6878;font-size:0.85em}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
"""
ENDPOINTS = {"pfs": "progression-free survival", "ihr": "intrahepatic recurrence",
             "rfs": "recurrence-free survival (early recurrence)", "os": "overall survival"}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img class="plot" alt="{html.escape(caption)}" src="{src}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def _ci(v: Any, ci: Any) -> str:
    if v is None:
        return "n/a"
    if not ci or None in ci:
        return _f(v)
    return f"{_f(v)} ({_f(ci[0])} to {_f(ci[1])})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- plots
def _roc_plot(ext: dict[str, Any]) -> str | None:
    arms = [(a, e) for a, e in ext.items() if e.get("roc")]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for i, (arm, e) in enumerate(arms):
        ax.plot(e["roc"]["fpr"], e["roc"]["tpr"], color=COLOURS[i % 8],
                label=f"{arm}  AUC {_f(e['auc'])}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, external site",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _calibration_plot(ext: dict[str, Any]) -> str | None:
    arms = [(a, e) for a, e in ext.items() if e.get("calibration")]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for i, (arm, e) in enumerate(arms):
        bins = e["calibration"]["bins"]
        ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", color=COLOURS[i % 8],
                label=f"{arm}  slope {_f(e['calibration']['slope'], 2)}", markersize=4)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean predicted probability", ylabel="observed proportion",
           title="Calibration, external site (quantile bins)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    return _png(fig)


def _decision_plot(ext: dict[str, Any]) -> str | None:
    arms = [(a, e) for a, e in ext.items() if e.get("net_benefit")]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 5))
    nb0 = arms[0][1]["net_benefit"]
    for i, (arm, e) in enumerate(arms):
        ax.plot(e["net_benefit"]["thresholds"], e["net_benefit"]["model"], color=COLOURS[i % 8],
                label=arm)
    ax.plot(nb0["thresholds"], nb0["treat_all"], "--", color="black", label="treat all")
    ax.axhline(0, color="grey", lw=1, label="treat none")
    top = max(max(e["net_benefit"]["model"]) for _, e in arms)
    ax.set(xlabel="threshold probability", ylabel="net benefit",
           title="Decision curves, external site", ylim=(-0.1, max(0.1, top * 1.2)))
    ax.legend(fontsize=7)
    return _png(fig)


def _km_plot(arm: str, endpoint: str, block: dict[str, Any]) -> str | None:
    if "high" not in block:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4))
    for key, colour, label in (("high", "#d62728", "high score"), ("low", "#1f77b4", "low score")):
        c = block[key]
        t = [0.0, *c["t"]]
        s = [1.0, *c["s"]]
        ax.step(t, s, where="post", color=colour,
                label=f"{label} (n={block['n_' + key]})")
        ax.fill_between(t, [1.0, *c["lo"]], [1.0, *c["hi"]], step="post", color=colour,
                        alpha=0.12)
    ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.02),
           title=f"{ENDPOINTS.get(endpoint, endpoint)}\nby {arm} score, "
                 f"log-rank p = {block['p_value']:.3g}")
    ax.legend(fontsize=8)
    return _png(fig)


def _training_plot(history: list[dict[str, Any]]) -> str | None:
    arms = list(dict.fromkeys(h["arm"] for h in history))
    if not arms:
        return None
    fig, axes = plt.subplots(len(arms), 2, figsize=(10, 2.4 * len(arms)), squeeze=False)
    for r, arm in enumerate(arms):
        rows = [h for h in history if h["arm"] == arm]
        sites = sorted({h["site"] for h in rows})
        for i, site in enumerate(sites):
            tr = [(h["round"], h["train_loss"]) for h in rows
                  if h["site"] == site and h["phase"] == "train"]
            va = [(h["round"], h["val_auc"]) for h in rows
                  if h["site"] == site and h["phase"] == "validate" and h["val_auc"] is not None]
            if tr:
                axes[r][0].plot(*zip(*tr, strict=True), "o-", ms=3, color=COLOURS[i % 8],
                                label=site)
            if va:
                axes[r][1].plot(*zip(*va, strict=True), "o-", ms=3, color=COLOURS[i % 8],
                                label=site)
        unit = "epoch" if arm in ("centralized",) or arm.startswith("local:") else "round"
        axes[r][0].set(title=f"{arm}: training loss", xlabel=unit)
        axes[r][1].set(title=f"{arm}: validation AUC per site", xlabel=unit, ylim=(0, 1))
        axes[r][0].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------- page
def build_report(run_dir: Path) -> str:
    """Render the report of ``run_dir`` as one HTML string."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    hist_path = run_dir / "history.jsonl"
    history = ([json.loads(x) for x in hist_path.read_text().splitlines() if x.strip()]
               if hist_path.exists() else [])
    ext: dict[str, Any] = metrics.get("external", {})
    task = TASKS.get(metrics["task"])
    parts: list[str] = [
        f"<h1>hcc-fl study report: {html.escape(metrics['task'])}</h1>",
        f'<p class="sub">run {html.escape(metrics["run_name"])} &middot; '
        f'{html.escape(metrics.get("created", ""))} &middot; hcc-fl '
        f'{html.escape(metrics.get("code_version", ""))}</p>',
    ]
    first: dict[str, Any] = next(iter(ext.values()), {})
    parts.append("<h2>External site</h2>")
    parts.append(
        f"<p>{html.escape(str(metrics['external_site']))}: n = {first.get('n')}, "
        f"{first.get('n_pos')} cases. {html.escape(metrics.get('threshold_rule', ''))}. "
        "AUC with DeLong 95 % CI; sensitivity, specificity and accuracy with percentile-"
        "bootstrap 95 % CIs.</p>"
    )
    rows = []
    for arm, e in ext.items():
        cal = e.get("calibration") or {}
        rows.append([
            html.escape(arm), _ci(e.get("auc"), e.get("auc_ci")), _f(e.get("threshold")),
            _ci(e.get("sensitivity"), e.get("sensitivity_ci")),
            _ci(e.get("specificity"), e.get("specificity_ci")),
            _ci(e.get("accuracy"), e.get("accuracy_ci")), _f(e.get("ppv")), _f(e.get("npv")),
            _f(cal.get("brier")), _f(cal.get("slope"), 2),
        ])
    parts.append(_table(["arm", "AUC (95% CI)", "threshold", "sensitivity", "specificity",
                         "accuracy", "PPV", "NPV", "Brier", "cal. slope"], rows))
    deep = {a: e for a, e in ext.items() if "/" not in a}
    plots = [p for p in (_roc_plot(deep), _calibration_plot(deep), _decision_plot(deep)) if p]
    captions = ["ROC curves of every arm on the external site",
                "Calibration of every arm on the external site",
                "Decision curves (net benefit) on the external site"]
    parts.append('<div class="grid">' + "".join(
        _figure(p, c) for p, c in zip(plots, captions, strict=False)) + "</div>")
    parts.extend(_recalibration_section(metrics, cfg))
    parts.extend(_components_section(metrics))
    parts.extend(_segmentation_and_cox_section(metrics))
    parts.extend(_ssl_and_cam_section(metrics))

    parts.extend(_transport_section(metrics))
    comps = metrics.get("comparisons") or []
    if comps:
        parts.append("<h2>Baseline comparison (paired DeLong tests, external site)</h2>")
        parts.append(_table(
            ["model A", "model B", "AUC A", "AUC B", "difference (95% CI)", "z", "p"],
            [[html.escape(c["a"]), html.escape(c["b"]), _f(c["auc_a"]), _f(c["auc_b"]),
              _ci((c["auc_a"] or 0) - (c["auc_b"] or 0), c.get("ci_diff")), _f(c["z"], 2),
              _f(c["p_value"], 4)] for c in comps]))

    surv_rows, surv_plots = [], []
    primary = metrics.get("model", {}).get("arm")
    for arm, e in ext.items():
        for endpoint, block in (e.get("survival") or {}).items():
            surv_rows.append([html.escape(arm), html.escape(ENDPOINTS.get(endpoint, endpoint)),
                              str(block.get("n_high")),
                              str(block.get("n_low")), _f(block.get("statistic"), 2),
                              _f(block.get("p_value"), 4)])
            if arm == primary:
                src = _km_plot(arm, endpoint, block)
                if src:
                    name = ENDPOINTS.get(endpoint, endpoint)
                    surv_plots.append(_figure(src, f"Kaplan-Meier: {name}, {arm}"))
    if surv_rows:
        parts.append("<h2>Prognosis: survival by risk group (external site)</h2>")
        parts.append("<p>Patients are split at the training Youden threshold of each arm's "
                     "score; Kaplan-Meier with 95 % CIs; log-rank test.</p>")
        parts.append(_table(["arm", "endpoint", "n high", "n low", "log-rank chi2", "p"],
                            surv_rows))
        parts.append('<div class="grid">' + "".join(surv_plots) + "</div>")

    val = metrics.get("validation") or {}
    if val:
        parts.append("<h2>Training sites: validation (per site and pooled)</h2>")
        parts.append('<p class="note">Pooled values come from summed sufficient statistics '
                     "(score histograms, placement sums); no per-patient score left a site.</p>")
        rows = []
        for arm, block in val.items():
            for site, v in block.get("per_site", {}).items():
                rows.append([html.escape(arm), html.escape(site), _ci(v.get("auc"),
                             v.get("auc_ci")), str(v.get("n")), str(v.get("n_pos")), "", ""])
            pooled = block.get("pooled", {})
            rows.append([html.escape(arm), "<b>pooled</b>",
                         _ci(pooled.get("auc"), pooled.get("auc_ci")), str(pooled.get("n")),
                         str(pooled.get("n_pos")), _f(pooled.get("threshold")),
                         _f(pooled.get("brier"))])
        parts.append(_table(["arm", "site", "AUC (95% CI)", "n", "cases", "Youden threshold",
                             "Brier"], rows))

    tp = _training_plot(history)
    if tp:
        parts.append("<h2>Training curves</h2>")
        parts.append(_figure(tp, "Per-round (federated) or per-epoch (baselines) training loss "
                                 "and validation AUC per site"))

    fed = cfg["federation"]
    arms_desc = ", ".join(
        f"{a['name']}" + (f" (mu={a['proximal_mu']})" if a.get("proximal_mu") else "")
        for a in cfg["strategy"]["arms"])
    card = [
        ["task", html.escape(f"{metrics['task']}: {task.description}" if task
                             else metrics["task"])],
        ["seed paper", html.escape(task.seed_paper if task else "")],
        ["model profile", html.escape(cfg["model"]["profile"])],
        ["federated strategies", html.escape(arms_desc)],
        ["rounds x local epochs", f"{fed['rounds']} x {fed['local_epochs']}"],
        ["baselines", html.escape(", ".join(a for a in deep if a not in
                                            [x["name"] for x in cfg["strategy"]["arms"]]))],
        ["privacy", html.escape(_privacy_text(metrics.get("privacy") or {},
                                              _secure_aggregation(metrics)))],
        ["seed", str(cfg["seed"])],
        ["code version", html.escape(metrics.get("code_version", ""))],
    ]
    parts.append("<h2>Model card</h2>")
    parts.append(_table(["", ""], card))
    parts.append(_table(
        ["site", "role", "train", "val", "test", "manifest SHA-256"],
        [[html.escape(s["site"]), html.escape(s["role"]), str(s.get("n_train")),
          str(s.get("n_val")), str(s.get("n_test")),
          html.escape(str(s.get("manifest_sha256", ""))[:16])]
         for s in metrics.get("sites", [])]))
    script = ("<script>window.addEventListener('load',function(){var ok=0;"
              "for(var i of document.images){if(i.complete&&i.naturalWidth>0){ok++;}}"
              "document.body.setAttribute('data-rendered-images',ok);"
              "document.body.setAttribute('data-images',document.images.length);});</script>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>hcc-fl report {html.escape(metrics['run_name'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}{script}</body></html>")


def _transport_section(metrics: dict[str, Any]) -> list[str]:
    """Pooled internal validation against the external site: the unpaired DeLong test of the
    two AUCs and the standardised partial AUCs of both."""
    tests = metrics.get("internal_vs_external") or {}
    validation = metrics.get("validation") or {}
    rows = []
    for arm, e in (metrics.get("external") or {}).items():
        if "/" in arm:
            continue
        pooled = (validation.get(arm) or {}).get("pooled") or {}
        t = tests.get(arm)
        pv, pe = pooled.get("partial_auc") or {}, e.get("partial_auc") or {}
        cells = ([_f(t["auc_internal"]), _f(t["auc_external"]),
                  _ci(t["auc_internal"] - t["auc_external"], t["ci_diff"]), _f(t["statistic"], 2),
                  _f(t["df"], 1), _f(t["p_value"], 4)] if t else
                 [_f(pooled.get("auc")), _f(e.get("auc")), "n/a", "n/a", "n/a", "n/a"])
        rows.append([html.escape(arm), *cells,
                     f"{_f(pv.get('specificity_0.8_1'))} / {_f(pe.get('specificity_0.8_1'))}",
                     f"{_f(pv.get('sensitivity_0.8_1'))} / {_f(pe.get('sensitivity_0.8_1'))}"])
    if not rows:
        return []
    return [
        "<h2>Internal validation against the external site</h2>",
        "<p>Unpaired DeLong test (pROC's <code>roc.test(paired = FALSE)</code>: Student t with "
        "Welch-Satterthwaite df) of the pooled training-site validation AUC, from summed placement "
        "sums, against the external site's AUC, from its own summary. Partial AUCs over "
        "specificity 0.8-1 and sensitivity 0.8-1, McClish-standardised (0.5 = chance, 1 = "
        "perfect), pooled validation / external.</p>",
        _table(["arm", "AUC internal", "AUC external", "difference (95% CI)", "D", "df", "p",
                "pAUC spec. 0.8-1", "pAUC sens. 0.8-1"], rows),
    ]


def _recalibration_section(metrics: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Calibration of every deep arm on the external site before and after the federated
    logistic recalibration, with the fitted coefficients (or why none was applied)."""
    ext = {a: e for a, e in (metrics.get("external") or {}).items() if "/" not in a}
    validation = metrics.get("validation") or {}
    rows = []
    after: dict[str, Any] = {}
    for arm, e in ext.items():
        fit = ((validation.get(arm) or {}).get("pooled") or {}).get("recalibration")
        rec = e.get("recalibrated")
        if not fit and not rec:
            continue
        before = e.get("calibration") or {}
        if rec:
            coef = rec.get("recalibration") or {}
            cal = rec.get("calibration") or {}
            after[arm] = rec
            rows.append([
                html.escape(arm), _f(coef.get("intercept")), _f(coef.get("slope")),
                html.escape(f"{coef.get('method')}, n = {coef.get('n')}, "
                            f"{coef.get('iterations')} evaluations"),
                f"{_f(e.get('auc'))} / {_f(rec.get('auc'))}",
                f"{_f(before.get('slope'), 2)} &rarr; {_f(cal.get('slope'), 2)}",
                f"{_f(before.get('intercept_in_the_large'), 2)} &rarr; "
                f"{_f(cal.get('intercept_in_the_large'), 2)}",
                f"{_f(before.get('brier'))} &rarr; {_f(cal.get('brier'))}",
                f"{_f(e.get('threshold'))} &rarr; {_f(rec.get('threshold'))}",
            ])
        else:
            reason = (fit or {}).get("reason") or "not sent to the external site"
            rows.append([html.escape(arm), _f((fit or {}).get("intercept")),
                         _f((fit or {}).get("slope")),
                         html.escape(f"not applied: {reason}"), _f(e.get("auc")),
                         _f(before.get("slope"), 2), _f(before.get("intercept_in_the_large"), 2),
                         _f(before.get("brier")), _f(e.get("threshold"))])
    if not rows:
        return []
    split = html.escape(str((cfg.get("evaluation") or {}).get("threshold_split", "val")))
    out = [
        "<h2>Recalibration (external site, before &rarr; after)</h2>",
        "<p>Logistic recalibration <i>p</i>' = expit(<i>a</i> + <i>b</i> logit <i>p</i>), fitted "
        f"on the pooled training-site '{split}' predictions by Newton steps on summed site sums "
        "(<code>newton</code>; <code>binned</code>: on the pooled score histograms, under "
        "secure aggregation), then applied by the external site to its own scores. With "
        "<i>b</i> &gt; 0 the ranks are unchanged: the AUC (before / after) and the patients "
        "above the mapped threshold stay the same; calibration slope (ideal 1), "
        "calibration-in-the-large (ideal 0), Brier score and the decision curve change.</p>",
        _table(["arm", "a", "b", "fit", "AUC before / after", "cal. slope",
                "cal.-in-the-large", "Brier", "threshold"], rows),
    ]
    plots = [(p, c) for p, c in (
        (_calibration_plot(after), "Calibration after recalibration, external site"),
        (_decision_plot(after), "Decision curves after recalibration, external site"),
    ) if p]
    if plots:
        out.append('<div class="grid">' + "".join(_figure(p, c) for p, c in plots) + "</div>")
    return out


def _components_section(metrics: dict[str, Any]) -> list[str]:
    """The task's models compared within each arm: paired DeLong tests, the primary arm's ROC,
    calibration and decision curves per model, re-split robustness and selected features."""
    block = metrics.get("components") or {}
    names = block.get("names") or []
    if len(names) < 2:
        return []
    ext = metrics.get("external", {})
    deep = block["deep"]
    primary = metrics.get("model", {}).get("arm")
    parts = ["<h2>The task's models compared (external site)</h2>",
             f"<p>Models: {html.escape(', '.join(names))}. Each has its own Youden threshold "
             "from the pooled training-site validation sums; DeLong tests are paired (same "
             "external patients) and run at the external site.</p>"]
    rows = []
    for arm, comps in (block.get("comparisons") or {}).items():
        for c in comps:
            rows.append([html.escape(arm), html.escape(c["a"]), html.escape(c["b"]),
                         _f(c["auc_a"]), _f(c["auc_b"]),
                         _ci((c["auc_a"] or 0) - (c["auc_b"] or 0), c.get("ci_diff")),
                         _f(c.get("z"), 2), _f(c.get("p_value"), 4)])
    if rows:
        parts.append(_table(["arm", "model A", "model B", "AUC A", "AUC B",
                             "difference (95% CI)", "z", "p"], rows))
    if primary:
        sub = {(deep if n == deep else n): ext.get(primary if n == deep else f"{primary}/{n}")
               for n in names}
        sub = {n: e for n, e in sub.items() if e}
        plots = [(_roc_plot(sub), f"ROC of each model, {primary} arm"),
                 (_calibration_plot(sub), f"Calibration of each model, {primary} arm"),
                 (_decision_plot(sub), f"Decision curves of each model, {primary} arm")]
        parts.append('<div class="grid">' + "".join(
            _figure(p, c) for p, c in plots if p) + "</div>")
    robust = block.get("robustness") or {}
    if robust:
        parts.append(f"<h3>Robustness: {block.get('resplits')} seeded re-splits of the "
                     "training sites' train/validation rows</h3>")
        parts.append('<p class="note">Each re-split refits the tabular models federated; the '
                     "external AUC of every refit is reported.</p>")
        parts.append(_table(
            ["arm", "model", "mean AUC", "SD", "min", "max", "AUCs"],
            [[html.escape(arm), html.escape(name), _f(r.get("mean")), _f(r.get("sd")),
              _f(r.get("min")), _f(r.get("max")),
              ", ".join(_f(a) for a in r.get("auc", []))]
             for arm, per in robust.items() for name, r in per.items()]))
    tab = (block.get("tabular") or {}).get(primary or "", {})
    if tab:
        parts.append(f"<h3>Selected features ({html.escape(str(primary))} arm)</h3>")
        rows = []
        for k, t in tab.items():
            sel = t.get("selected", [])
            shown = ", ".join(f"{html.escape(x['feature'])} ({x['coef']:+.2f})"
                              for x in sel[:12])
            more = f" and {len(sel) - 12} more" if len(sel) > 12 else ""
            rows.append([html.escape(k.split("@")[0]), html.escape(t["spec"]["penalty"]),
                         _f(t["spec"]["alpha"], 3), f"{len(sel)} / {t.get('n_features')}",
                         shown + more])
        parts.append(_table(["model", "penalty", "alpha", "selected", "largest coefficients "
                             "(standardised)"], rows))
    return parts


def _segmentation_and_cox_section(metrics: dict[str, Any]) -> list[str]:
    """Liver segmentation (Dice per time point) and the Cox models (C-index, hazard ratios,
    risk by the horizon) on the external site, when the task has them."""
    ext = {a: e for a, e in metrics.get("external", {}).items() if "/" not in a}
    parts: list[str] = []
    seg = [(a, e["segmentation"]) for a, e in ext.items() if e.get("segmentation")]
    if seg:
        parts.append("<h2>Liver segmentation (external site)</h2>")
        parts.append("<p>Dice of the predicted liver mask (probability &ge; 0.5) per patient; "
                     "mean with percentile-bootstrap 95 % CI over patients.</p>")
        parts.append(_table(
            ["arm", "n", "Dice T0 (95% CI)", "SD T0", "Dice T1 (95% CI)", "SD T1"],
            [[html.escape(a), str(b["n"]), _ci(b["t0"]["mean"], b["t0"]["ci"]),
              _f(b["t0"]["sd"]), _ci(b["t1"]["mean"], b["t1"]["ci"]), _f(b["t1"]["sd"])]
             for a, b in seg]))
    surv = [(a, e["survival_models"]) for a, e in ext.items() if e.get("survival_models")]
    if surv:
        first = surv[0][1]
        parts.append("<h2>Survival models (external site)</h2>")
        parts.append(f"<p>Overall survival of {first['n']} external patients "
                     f"({first['events']} deaths). Harrell's C with percentile-bootstrap "
                     "95 % CI; the Cox models are fitted federated (site-stratified partial "
                     "likelihood, Newton steps on summed site gradients and Hessians) and "
                     f"predict the risk of death by day {_f(first['horizon'], 0)}.</p>")
        rows = []
        for a, b in surv:
            for m, c in b["c_index"].items():
                cal = b.get("calibration", {}).get(m)
                rows.append([html.escape(a), html.escape(m), _ci(c["c"], c["ci"]),
                             _f(cal["predicted_mean"]) if cal else "",
                             _f(b.get("observed_risk_at_horizon")) if cal else ""])
        parts.append(_table(["arm", "model", "C-index (95% CI)", "mean predicted risk",
                             "observed risk (KM)"], rows))
        diffs = [[html.escape(a), html.escape(d["a"]), html.escape(d["b"]),
                  _ci(d["diff"], d["ci"]), _f(d["p_value"], 4)]
                 for a, b in surv for d in b.get("differences", [])]
        if diffs:
            parts.append(_table(["arm", "model A", "model B", "C difference (95% CI)",
                                 "p (bootstrap)"], diffs))
        tab = (metrics.get("components") or {}).get("tabular", {})
        hr_rows = []
        for arm, models in tab.items():
            for k, t in models.items():
                cox = t.get("cox")
                if not cox or not cox.get("coef"):
                    continue
                for f, c, se in zip(cox["features"], cox["coef"], cox["se"], strict=True):
                    hr_rows.append([html.escape(arm), html.escape(k.split("@")[0]),
                                    html.escape(f), _f(c), _f(se), _f(math.exp(c)),
                                    _f(cox["h0"], 4)])
        if hr_rows:
            parts.append("<h3>Federated Cox coefficients</h3>")
            parts.append(_table(["arm", "model", "covariate", "coef", "SE", "hazard ratio",
                                 "baseline H0(horizon)"], hr_rows))
    return parts


def _cam_plot(arm: str, cam: dict[str, Any]) -> str:
    import numpy as np

    fig, ax = plt.subplots(1, 2, figsize=(7.5, 3.6))
    img = np.asarray(cam["mean_image"])
    ax[0].imshow(img, cmap="gray")
    ax[0].contour(np.asarray(cam["mean_mask"]), levels=[0.5], colors="yellow", linewidths=1)
    ax[0].set_title("mean arterial phase, lesion outline", fontsize=9)
    ax[1].imshow(img, cmap="gray")
    ax[1].imshow(np.asarray(cam["mean_cam"]), cmap="jet", alpha=0.45)
    ax[1].contour(np.asarray(cam["mean_mask"]), levels=[0.5], colors="white", linewidths=1)
    ax[1].set_title(f"mean Grad-CAM, {arm}", fontsize=9)
    for a in ax:
        a.axis("off")
    return _png(fig)


def _ssl_and_cam_section(metrics: dict[str, Any]) -> list[str]:
    """The self-supervised pretraining ablation (paired DeLong of each arm against its no-SSL
    twin) and the Grad-CAM localisation on the external site."""
    ext = metrics.get("external", {})
    parts: list[str] = []
    pairs = [c for c in metrics.get("comparisons") or []
             if c["b"] == f"{c['a']}_nossl" or c["a"] == f"{c['b']}_nossl"]
    if pairs:
        parts.append("<h2>Self-supervised pretraining ablation (external site)</h2>")
        parts.append("<p>Each federated strategy trained twice in the same run: after federated "
                     "Barlow Twins pretraining of the encoder, and from scratch "
                     "(<code>_nossl</code>) with the same fine-tuning budget; paired DeLong "
                     "test on the same external patients.</p>")
        parts.append(_table(["with SSL", "without", "AUC with", "AUC without",
                             "difference (95% CI)", "p"],
                            [[html.escape(c["a"]), html.escape(c["b"]), _f(c["auc_a"]),
                              _f(c["auc_b"]),
                              _ci((c["auc_a"] or 0) - (c["auc_b"] or 0), c.get("ci_diff")),
                              _f(c["p_value"], 4)] for c in pairs]))
    cams = [(a, e["cam"]) for a, e in ext.items() if "/" not in a and e.get("cam")]
    if cams:
        parts.append("<h2>Grad-CAM on the external site</h2>")
        parts.append("<p>Share of the top-10 % Grad-CAM mass that falls inside the lesion "
                     "mask, against the share expected if it were spread at random "
                     "(one-sided paired test over patients). The images are means over all "
                     "external patients, lesion-centred: no single patient's pixels leave the "
                     "site.</p>")
        parts.append(_table(["arm", "n", "in-mask share", "chance", "p"],
                            [[html.escape(a), str(c["n"]), _f(c["in_mask_fraction"]),
                              _f(c["chance"]), _f(c["p_value"], 4)] for a, c in cams]))
        primary = metrics.get("model", {}).get("arm")
        chosen = [(a, c) for a, c in cams if a == primary] or cams[:1]
        parts.append('<div class="grid">' + "".join(
            _figure(_cam_plot(a, c), f"Mean Grad-CAM over the external patients, {a}")
            for a, c in chosen) + "</div>")
    return parts


def _secure_aggregation(metrics: dict[str, Any]) -> bool:
    """Whether any federated arm aggregated through SecAgg+."""
    return any((f or {}).get("secure_aggregation")
               for f in (metrics.get("federated") or {}).values())


def _privacy_text(privacy: dict[str, Any], secagg: bool = False) -> str:
    """One line for the model card: the DP mode, the epsilon spent, secure aggregation."""
    text = _dp_text(privacy)
    return text.replace("no secure aggregation", "secure aggregation (SecAgg+)") if secagg \
        else text


def _dp_text(privacy: dict[str, Any]) -> str:
    if privacy.get("mode") == "central-dp":
        return "central DP (server-side clipping, Flower): " + "; ".join(
            f"{arm}: sigma={c['noise_multiplier']}, clip={c['clipping_norm']}, "
            f"{c['releases']} noisy rounds, site-level eps={c['epsilon']:.2f} "
            f"(delta={c['delta']:.1e})"
            + (f", stopped before round {c['stopped_before_round']} (budget)"
               if c.get("stopped_before_round") else "")
            for arm, c in privacy.get("central", {}).items()) + "; no secure aggregation"
    if privacy.get("mode", "none") != "dp":
        return "no differential privacy; no secure aggregation (plain FedAvg sums)"
    spent = "; ".join(
        f"{arm}: " + ", ".join(f"{site} eps={v['epsilon']:.2f} (delta={v['delta']:.1e})"
                              for site, v in sorted(sites.items()))
        for arm, sites in privacy.get("epsilon", {}).items())
    cfg = privacy.get("config", {})
    how = (f"target eps {cfg.get('target_epsilon')} per run" if cfg.get("target_epsilon")
           else f"noise multiplier {cfg.get('noise_multiplier')}")
    return (f"local DP-SGD (Opacus, RDP accountant), {how}, clip {cfg.get('max_grad_norm')}; "
            f"spent: {spent or 'n/a'}; baselines are not private; no secure aggregation")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (atomically) into ``run_dir`` or to ``out``; return its path."""
    target = out or run_dir / "report.html"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(build_report(run_dir), encoding="utf-8")
    tmp.replace(target)
    return target
