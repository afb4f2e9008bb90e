"""``hcc-fl report RUN_DIR``: a self-contained ``report.html`` (plots embedded, no network).

Reads only the run directory (``metrics.json``, ``history.jsonl``, ``config.json``): aggregate
statistics, never patient-level data.

Every value read is treated as data, never as markup: the page is rendered by Jinja2 with
autoescaping, and every HTML fragment built here is a ``markupsafe.Markup`` template whose
arguments are escaped when interpolated (:func:`_h`); numbers go through :func:`_f`, which
formats a real number as a number and escapes anything else (a string where a number was
expected shows as text). A plot whose data are not numbers is left out with a note.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import numpy as np
from markupsafe import Markup, escape

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hcc_fl.shared.tasks import TASKS  # noqa: E402

log = logging.getLogger(__name__)
_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_TABLE = _ENV.from_string(
    "<table><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>"
    "{% for r in rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}"
    "</tbody></table>")
_FIGURE = _ENV.from_string('<figure><img class="plot" alt="{{ caption }}" src="{{ src }}">'
                           "<figcaption>{{ caption }}</figcaption></figure>")
_PAGE = _ENV.from_string(
    "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
    "<title>hcc-fl report {{ run_name }}</title><style>{{ css }}</style></head>"
    "<body>{{ body }}{{ script }}</body></html>")
# Our own script (the only one on the page): counts the decoded images for the tests.
_SCRIPT = Markup(
    "<script>window.addEventListener('load',function(){var ok=0;"
    "for(var i of document.images){if(i.complete&&i.naturalWidth>0){ok++;}}"
    "document.body.setAttribute('data-rendered-images',ok);"
    "document.body.setAttribute('data-images',document.images.length);});</script>")


def _h(template: str, *args: Any, **kwargs: Any) -> Markup:
    """An HTML fragment: ``template`` is trusted markup written here, every argument is
    escaped unless it is already a fragment (``Markup``)."""
    return Markup(template).format(*args, **kwargs)


def _join(parts: Any, sep: str = "") -> Markup:
    """Fragments joined (plain strings among them are escaped)."""
    return Markup(sep).join(parts)

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


def _figure(src: str, caption: Any) -> Markup:
    if not src.startswith("data:image/png;base64,"):
        raise ValueError("a figure's source must be an embedded PNG")
    return Markup(_FIGURE.render(src=src, caption=str(caption)))


def _f(x: Any, digits: int = 3) -> Markup:
    """A number formatted as a number (floats to ``digits`` places, integers as they are);
    None as n/a; anything else (a string where a number was expected) escaped as text."""
    if x is None:
        return Markup("n/a")
    if isinstance(x, float):
        return Markup(f"{x:.{digits}f}")
    if isinstance(x, int) and not isinstance(x, bool):
        return Markup(str(x))
    return escape(str(x))


def _num(x: Any) -> float | None:
    """``x`` as a float when it is a real number, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _ci(v: Any, ci: Any) -> Markup:
    if v is None:
        return Markup("n/a")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in ci:
        return _f(v)
    return _h("{} ({} to {})", _f(v), _f(ci[0]), _f(ci[1]))


def _diff(a: Any, b: Any) -> Any:
    """``a - b`` of two AUCs (None read as 0), or n/a when either is not a number."""
    x, y = _num(a if a is not None else 0.0), _num(b if b is not None else 0.0)
    return None if x is None or y is None else x - y


def _table(header: list[Any], rows: list[list[Any]]) -> Markup:
    """A table; every cell is escaped unless it is a fragment (``Markup``)."""
    return Markup(_TABLE.render(header=header, rows=rows))


def _plot(make: Callable[..., str | None], *args: Any) -> str | None:
    """A plot, or None when its data are not what a plot needs (e.g. strings for numbers)."""
    try:
        return make(*args)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError) as exc:
        plt.close("all")
        log.warning("report: a %s was left out: %s", make.__name__.strip("_"), exc)
        return None


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
        model = [math.nan if v is None else v for v in e["net_benefit"]["model"]]  # withheld
        ax.plot(e["net_benefit"]["thresholds"], model, color=COLOURS[i % 8], marker=".",
                label=arm)
    ax.plot(nb0["thresholds"], nb0["treat_all"], "--", color="black", label="treat all")
    ax.axhline(0, color="grey", lw=1, label="treat none")
    top = max((v for _, e in arms for v in e["net_benefit"]["model"] if v is not None),
              default=0.0)
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
    with matplotlib.rc_context({"text.parse_math": False}):  # labels are text, not TeX
        return _build_report(run_dir)


def _build_report(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    hist_path = run_dir / "history.jsonl"
    history = ([json.loads(x) for x in hist_path.read_text().splitlines() if x.strip()]
               if hist_path.exists() else [])
    ext: dict[str, Any] = metrics.get("external", {})
    task = TASKS.get(metrics["task"])
    parts: list[Markup] = [
        _h("<h1>hcc-fl study report: {}</h1>", metrics["task"]),
        _h('<p class="sub">run {} &middot; {} &middot; hcc-fl {}</p>', metrics["run_name"],
           metrics.get("created", ""), metrics.get("code_version", "")),
    ]
    first: dict[str, Any] = next(iter(ext.values()), {})
    parts.append(Markup("<h2>External site</h2>"))
    parts.append(_h(
        "<p>{}: n = {}, {} cases. {}. AUC with DeLong 95 % CI; sensitivity, specificity and "
        "accuracy with percentile-bootstrap 95 % CIs.</p>", metrics["external_site"],
        _f(first.get("n")), _f(first.get("n_pos")), metrics.get("threshold_rule", "")))
    rows = []
    for arm, e in ext.items():
        cal = e.get("calibration") or {}
        rows.append([
            arm, _ci(e.get("auc"), e.get("auc_ci")), _f(e.get("threshold")),
            _ci(e.get("sensitivity"), e.get("sensitivity_ci")),
            _ci(e.get("specificity"), e.get("specificity_ci")),
            _ci(e.get("accuracy"), e.get("accuracy_ci")), _f(e.get("ppv")), _f(e.get("npv")),
            _f(cal.get("brier")), _f(cal.get("slope"), 2),
        ])
    parts.append(_table(["arm", "AUC (95% CI)", "threshold", "sensitivity", "specificity",
                         "accuracy", "PPV", "NPV", "Brier", "cal. slope"], rows))
    parts.extend(_fedbn_note(metrics))
    withheld = [(arm, w) for arm, e in ext.items() for w in e.get("withheld") or []]
    if withheld:
        parts.append(Markup('<p class="note">Withheld by the external site\'s release policy '
                            "(docs/privacy.md):</p>"))
        parts.append(_table(["arm", "what"], [[a, w] for a, w in withheld]))
    deep = {a: e for a, e in ext.items() if "/" not in a}
    plots = [(p, c) for p, c in (
        (_plot(_roc_plot, deep), "ROC curves of every arm on the external site"),
        (_plot(_calibration_plot, deep), "Calibration of every arm on the external site"),
        (_plot(_decision_plot, deep), "Decision curves (net benefit) on the external site"),
    ) if p]
    parts.append(_h('<div class="grid">{}</div>', _join(_figure(p, c) for p, c in plots)))
    parts.extend(_recalibration_section(metrics, cfg))
    parts.extend(_components_section(metrics))
    parts.extend(_segmentation_and_cox_section(metrics))
    parts.extend(_ssl_and_cam_section(metrics))

    parts.extend(_transport_section(metrics))
    parts.extend(_cross_site_section(metrics))
    comps = metrics.get("comparisons") or []
    if comps:
        parts.append(Markup("<h2>Baseline comparison (paired DeLong tests, external site)</h2>"))
        parts.append(_table(
            ["model A", "model B", "AUC A", "AUC B", "difference (95% CI)", "z", "p"],
            [[c["a"], c["b"], _f(c["auc_a"]), _f(c["auc_b"]),
              _ci(_diff(c["auc_a"], c["auc_b"]), c.get("ci_diff")), _f(c["z"], 2),
              _f(c["p_value"], 4)] for c in comps]))

    surv_rows, surv_plots = [], []
    primary = metrics.get("model", {}).get("arm")
    for arm, e in ext.items():
        for endpoint, block in (e.get("survival") or {}).items():
            surv_rows.append([arm, ENDPOINTS.get(endpoint, endpoint), _f(block.get("n_high")),
                              _f(block.get("n_low")), _f(block.get("statistic"), 2),
                              _f(block.get("p_value"), 4)])
            if arm == primary:
                src = _plot(_km_plot, arm, endpoint, block)
                if src:
                    name = ENDPOINTS.get(endpoint, endpoint)
                    surv_plots.append(_figure(src, f"Kaplan-Meier: {name}, {arm}"))
    if surv_rows:
        parts.append(Markup("<h2>Prognosis: survival by risk group (external site)</h2>"))
        parts.append(Markup("<p>Patients are split at the training Youden threshold of each "
                            "arm's score; Kaplan-Meier with 95 % CIs; log-rank test.</p>"))
        parts.append(_table(["arm", "endpoint", "n high", "n low", "log-rank chi2", "p"],
                            surv_rows))
        parts.append(_h('<div class="grid">{}</div>', _join(surv_plots)))

    val = metrics.get("validation") or {}
    if val:
        parts.append(Markup("<h2>Training sites: validation (per site and pooled)</h2>"))
        parts.append(Markup(
            '<p class="note">Pooled values come from summed sufficient statistics (score '
            "histograms, placement sums); no per-patient score left a site.</p>"))
        rows = []
        excluded: list[tuple[str, dict[str, Any]]] = []
        for arm, block in val.items():
            for site, v in block.get("per_site", {}).items():
                rows.append([arm, site, _ci(v.get("auc"), v.get("auc_ci")), _f(v.get("n")),
                             _f(v.get("n_pos")), "", "",
                             (block.get("disclosure") or {}).get(site, "")])
            pooled = block.get("pooled", {})
            bounds = pooled.get("auc_bounds") or [None, None]
            rows.append([arm, Markup("<b>pooled</b>"),
                         _ci(pooled.get("auc"), pooled.get("auc_ci")), _f(pooled.get("n")),
                         _f(pooled.get("n_pos")), _f(pooled.get("threshold")),
                         _f(pooled.get("brier")),
                         f"AUC within [{_f(bounds[0])}, {_f(bounds[1])}]"])
            excluded.extend((arm, x) for x in block.get("excluded") or [])
        parts.append(_table(["arm", "site", "AUC (95% CI)", "n", "cases", "Youden threshold",
                             "Brier", "release policy"], rows))
        if excluded:
            parts.append(Markup('<p class="note">Sites whose sums failed the coordinator\'s '
                                "checks, left out of the pooled statistics:</p>"))
            parts.append(_table(["arm", "site", "step", "reason"],
                                [[arm, x.get("site"), x.get("step"), x.get("reason")]
                                 for arm, x in excluded]))

    tp = _plot(_training_plot, history)
    if tp:
        parts.append(Markup("<h2>Training curves</h2>"))
        parts.append(_figure(tp, "Per-round (federated) or per-epoch (baselines) training loss "
                                 "and validation AUC per site"))

    parts.extend(_messages_section(metrics))

    fed = cfg["federation"]
    arms_desc = ", ".join(
        f"{a['name']}" + (f" (mu={a['proximal_mu']})" if a.get("proximal_mu") else "")
        for a in cfg["strategy"]["arms"])
    card = [
        ["task", f"{metrics['task']}: {task.description}" if task else metrics["task"]],
        ["seed paper", task.seed_paper if task else ""],
        ["model profile", cfg["model"]["profile"]],
        ["federated strategies", arms_desc],
        ["rounds x local epochs", f"{fed['rounds']} x {fed['local_epochs']}"],
        ["baselines", ", ".join(a for a in deep if a not in
                                [x["name"] for x in cfg["strategy"]["arms"]])],
        ["privacy", _privacy_text(metrics.get("privacy") or {}, _secure_aggregation(metrics))],
        ["aggregation", _aggregation_text(fed)],
        ["seed", cfg["seed"]],
        ["code version", metrics.get("code_version", "")],
    ]
    parts.append(Markup("<h2>Model card</h2>"))
    parts.append(_table(["", ""], card))
    parts.append(_table(
        ["site", "role", "train", "val", "test", "manifest SHA-256"],
        [[s["site"], s["role"], _f(s.get("n_train")), _f(s.get("n_val")), _f(s.get("n_test")),
          str(s.get("manifest_sha256", ""))[:16]]
         for s in metrics.get("sites", [])]))
    return _PAGE.render(run_name=str(metrics["run_name"]), css=Markup(CSS), body=_join(parts),
                        script=_SCRIPT)


def _cross_site_plot(cross: dict[str, Any]) -> str | None:
    """Heat map of the cross-site matrix: AUC of each model (row) on each site (column)."""
    models, sites = cross["models"], cross["sites"]
    if not models:
        return None
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in cross["auc"]])
    fig, ax = plt.subplots(figsize=(1.2 * len(sites) + 2.5, 0.42 * len(models) + 1.4))
    im = ax.imshow(values, cmap="viridis", vmin=0.5, vmax=1.0, aspect="auto")
    for i in range(len(models)):
        for j in range(len(sites)):
            v = values[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=8, color="white" if np.isnan(v) or v < 0.75 else "black")
    ax.set_xticks(range(len(sites)), [f"{s}\n(external)" if s == cross["external_site"] else s
                                      for s in sites], fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_title("AUC of every model on every site", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _png(fig)


def _cross_site_section(metrics: dict[str, Any]) -> list[Markup]:
    """The cross-site evaluation matrix: a heat map and its table."""
    cross = metrics.get("cross_site") or {}
    if not cross.get("models"):
        return []
    parts = [Markup("<h2>Cross-site evaluation</h2><p>Each model on every training site's "
                    "threshold split (each site's own AUC from its summed statistics; a "
                    "baseline's model scored on every site in the simulation) and on the "
                    "external site. A row that is high only on its own site is a model that "
                    "does not transport.</p>")]
    fig = _plot(_cross_site_plot, cross)
    if fig:
        parts.append(_figure(fig, "Cross-site AUC matrix"))
    parts.append(_table(["model", *cross["sites"]],
                        [[m, *(_h("{} (n={})", _f(a), _f(n)) if a is not None else "-"
                               for a, n in zip(row, nrow, strict=True))]
                         for m, row, nrow in zip(cross["models"], cross["auc"], cross["n"],
                                                 strict=True)]))
    return parts


def _messages_section(metrics: dict[str, Any]) -> list[Markup]:
    """Messages each federated arm sent, by kind, and the wall time spent waiting for them."""
    rows = []
    for arm, f in (metrics.get("federated") or {}).items():
        for kind, m in ((f or {}).get("messages") or {}).items():
            rows.append([arm, Markup("<b>total</b>") if kind == "total" else kind,
                         _f(m.get("exchanges")), _f(m.get("messages")), _f(m.get("replies")),
                         _f(m.get("errors")), _f(m.get("wait_s"), 1)])
    if not rows:
        return []
    return [Markup("<h2>Messages</h2><p>What each federated arm sent to the sites: every "
                   "exchange is one message per site and costs seconds in a deployment (a fresh "
                   "process per message at the site, Flower's pull intervals on both "
                   "sides).</p>"),
            _table(["arm", "kind", "exchanges", "messages", "replies", "error replies",
                    "wait (s)"], rows)]


def _aggregation_text(fed: dict[str, Any]) -> str:
    """One line for the model card: how the coordinator combined and screened the updates."""
    rule = str(fed.get("aggregation", "mean"))
    how = {"mean": "weighted mean (FedAvg)", "median": "coordinate-wise median",
           "trimmed_mean": f"coordinate-wise trimmed mean ({fed.get('trim_fraction')} cut at "
                           "each end)"}.get(rule, rule)
    cap = fed.get("max_site_weight", 1.0)
    ratio = fed.get("max_update_norm_ratio", 0)
    return (f"{how}; largest site share {cap}" + (" (off)" if cap == 1 else "")
            + f"; update norm bound {ratio} x the reference scale" + (" (off)" if not ratio
                                                                      else ""))


def _transport_section(metrics: dict[str, Any]) -> list[Markup]:
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
                  _ci(_diff(t["auc_internal"], t["auc_external"]), t["ci_diff"]),
                  _f(t["statistic"], 2),
                  _f(t["df"], 1), _f(t["p_value"], 4)] if t else
                 [_f(pooled.get("auc")), _f(e.get("auc")), "n/a", "n/a", "n/a", "n/a"])
        rows.append([arm, *cells,
                     _h("{} / {}", _f(pv.get("specificity_0.8_1")),
                        _f(pe.get("specificity_0.8_1"))),
                     _h("{} / {}", _f(pv.get("sensitivity_0.8_1")),
                        _f(pe.get("sensitivity_0.8_1")))])
    if not rows:
        return []
    return [
        Markup("<h2>Internal validation against the external site</h2>"),
        Markup("<p>Unpaired DeLong test (pROC's <code>roc.test(paired = FALSE)</code>: Student "
        "t with Welch-Satterthwaite df) of the pooled training-site validation AUC, from summed "
        "placement sums, against the external site's AUC, from its own summary. Partial AUCs over "
        "specificity 0.8-1 and sensitivity 0.8-1, McClish-standardised (0.5 = chance, 1 = "
        "perfect), pooled validation / external.</p>"),
        _table(["arm", "AUC internal", "AUC external", "difference (95% CI)", "D", "df", "p",
                "pAUC spec. 0.8-1", "pAUC sens. 0.8-1"], rows),
    ]


def _fedbn_note(metrics: dict[str, Any]) -> list[Markup]:
    """What the two FedBN rows of the external table are."""
    ext = metrics.get("external") or {}
    rows = []
    for arm, e in ext.items():
        if not arm.endswith("+external-stats") or "/" in arm:
            continue
        base = arm.removesuffix("+external-stats")
        tts = e.get("test_time_statistics") or {}
        rows.append([base, "FedBN + averaged statistics", _f((ext.get(base) or {}).get("auc")),
                     "normalisation state averaged over the training sites once at the end"])
        rows.append([arm, "FedBN + external statistics", _f(e.get("auc")),
                     _h("running statistics of {} layer(s) recomputed on the external site's "
                        "{} unlabelled test images", _f(tts.get("layers")),
                        _f(tts.get("n_images")))])
    if not rows:
        return []
    return [Markup('<p class="note">FedBN: normalisation layers stay at each training site; '
                   "the external site never trained and is scored twice. With GroupNorm or "
                   "InstanceNorm without running statistics (0 layers) the two rows are the same "
                   "model.</p>"),
            _table(["arm", "FedBN variant", "AUC", "normalisation state"], rows)]


def _recalibration_section(metrics: dict[str, Any], cfg: dict[str, Any]) -> list[Markup]:
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
                arm, _f(coef.get("intercept")), _f(coef.get("slope")),
                _h("{}, n = {}, {} evaluations", coef.get("method"), _f(coef.get("n")),
                   _f(coef.get("iterations"))),
                _h("{} / {}", _f(e.get("auc")), _f(rec.get("auc"))),
                _h("{} &rarr; {}", _f(before.get("slope"), 2), _f(cal.get("slope"), 2)),
                _h("{} &rarr; {}", _f(before.get("intercept_in_the_large"), 2),
                   _f(cal.get("intercept_in_the_large"), 2)),
                _h("{} &rarr; {}", _f(before.get("brier")), _f(cal.get("brier"))),
                _h("{} &rarr; {}", _f(e.get("threshold")), _f(rec.get("threshold"))),
            ])
        else:
            reason = (fit or {}).get("reason") or "not sent to the external site"
            rows.append([arm, _f((fit or {}).get("intercept")),
                         _f((fit or {}).get("slope")),
                         f"not applied: {reason}", _f(e.get("auc")),
                         _f(before.get("slope"), 2), _f(before.get("intercept_in_the_large"), 2),
                         _f(before.get("brier")), _f(e.get("threshold"))])
    if not rows:
        return []
    split = str((cfg.get("evaluation") or {}).get("threshold_split", "val"))
    out = [
        Markup("<h2>Recalibration (external site, before &rarr; after)</h2>"),
        _h("<p>Logistic recalibration <i>p</i>' = expit(<i>a</i> + <i>b</i> logit <i>p</i>), "
        "fitted on the pooled training-site '{}' predictions by Newton steps on summed site sums "
        "(<code>newton</code>; <code>binned</code>: on the pooled score histograms, under "
        "secure aggregation), then applied by the external site to its own scores. With "
        "<i>b</i> &gt; 0 the ranks are unchanged: the AUC (before / after) and the patients "
        "above the mapped threshold stay the same; calibration slope (ideal 1), "
        "calibration-in-the-large (ideal 0), Brier score and the decision curve change.</p>",
           split),
        _table(["arm", "a", "b", "fit", "AUC before / after", "cal. slope",
                "cal.-in-the-large", "Brier", "threshold"], rows),
    ]
    plots = [(p, c) for p, c in (
        (_plot(_calibration_plot, after), "Calibration after recalibration, external site"),
        (_plot(_decision_plot, after), "Decision curves after recalibration, external site"),
    ) if p]
    if plots:
        out.append(_h('<div class="grid">{}</div>', _join(_figure(p, c) for p, c in plots)))
    return out


def _components_section(metrics: dict[str, Any]) -> list[Markup]:
    """The task's models compared within each arm: paired DeLong tests, the primary arm's ROC,
    calibration and decision curves per model, re-split robustness and selected features."""
    block = metrics.get("components") or {}
    names = block.get("names") or []
    if len(names) < 2:
        return []
    ext = metrics.get("external", {})
    deep = block["deep"]
    primary = metrics.get("model", {}).get("arm")
    parts = [Markup("<h2>The task's models compared (external site)</h2>"),
             _h("<p>Models: {}. Each has its own Youden threshold from the pooled "
                "training-site validation sums; DeLong tests are paired (same external "
                "patients) and run at the external site.</p>", ", ".join(map(str, names)))]
    rows = []
    for arm, comps in (block.get("comparisons") or {}).items():
        for c in comps:
            rows.append([arm, c["a"], c["b"], _f(c["auc_a"]), _f(c["auc_b"]),
                         _ci(_diff(c["auc_a"], c["auc_b"]), c.get("ci_diff")),
                         _f(c.get("z"), 2), _f(c.get("p_value"), 4)])
    if rows:
        parts.append(_table(["arm", "model A", "model B", "AUC A", "AUC B",
                             "difference (95% CI)", "z", "p"], rows))
    if primary:
        sub = {(deep if n == deep else n): ext.get(primary if n == deep else f"{primary}/{n}")
               for n in names}
        sub = {n: e for n, e in sub.items() if e}
        plots = [(_plot(_roc_plot, sub), f"ROC of each model, {primary} arm"),
                 (_plot(_calibration_plot, sub), f"Calibration of each model, {primary} arm"),
                 (_plot(_decision_plot, sub), f"Decision curves of each model, {primary} arm")]
        parts.append(_h('<div class="grid">{}</div>',
                        _join(_figure(p, c) for p, c in plots if p)))
    robust = block.get("robustness") or {}
    if robust:
        parts.append(_h("<h3>Robustness: {} seeded re-splits of the training sites' "
                        "train/validation rows</h3>", _f(block.get("resplits"))))
        parts.append(Markup('<p class="note">Each re-split refits the tabular models '
                            "federated; the external AUC of every refit is reported.</p>"))
        parts.append(_table(
            ["arm", "model", "mean AUC", "SD", "min", "max", "AUCs"],
            [[arm, name, _f(r.get("mean")), _f(r.get("sd")),
              _f(r.get("min")), _f(r.get("max")),
              _join((_f(a) for a in r.get("auc", [])), ", ")]
             for arm, per in robust.items() for name, r in per.items()]))
    tab = (block.get("tabular") or {}).get(primary or "", {})
    if tab:
        parts.append(_h("<h3>Selected features ({} arm)</h3>", str(primary)))
        rows = []
        for k, t in tab.items():
            sel = t.get("selected", [])
            shown = _join((_h("{} ({})", x["feature"], _signed(x["coef"])) for x in sel[:12]),
                          ", ")
            more = f" and {len(sel) - 12} more" if len(sel) > 12 else ""
            fit = t.get("fit") or {}
            how = (_h("{}, {} messages{}", fit.get("solver"), _f(fit.get("messages")),
                      "" if fit.get("converged", True) else ", NOT converged")
                   if fit else "")
            rows.append([k.split("@")[0], t["spec"]["penalty"],
                         _f(t["spec"]["alpha"], 3), _h("{} / {}", len(sel),
                                                       _f(t.get("n_features"))),
                         how, shown + more])
        parts.append(_table(["model", "penalty", "alpha", "selected", "fit",
                             "largest coefficients (standardised)"], rows))
    return parts


def _segmentation_and_cox_section(metrics: dict[str, Any]) -> list[Markup]:
    """Liver segmentation (Dice per time point) and the Cox models (C-index, hazard ratios,
    risk by the horizon) on the external site, when the task has them."""
    ext = {a: e for a, e in metrics.get("external", {}).items() if "/" not in a}
    parts: list[Markup] = []
    seg = [(a, e["segmentation"]) for a, e in ext.items() if e.get("segmentation")]
    if seg:
        parts.append(Markup("<h2>Liver segmentation (external site)</h2>"))
        parts.append(Markup("<p>Dice of the predicted liver mask (probability &ge; 0.5) per "
                            "patient; mean with percentile-bootstrap 95 % CI over patients.</p>"))
        parts.append(_table(
            ["arm", "n", "Dice T0 (95% CI)", "SD T0", "Dice T1 (95% CI)", "SD T1"],
            [[a, _f(b["n"]), _ci(b["t0"]["mean"], b["t0"]["ci"]),
              _f(b["t0"]["sd"]), _ci(b["t1"]["mean"], b["t1"]["ci"]), _f(b["t1"]["sd"])]
             for a, b in seg]))
    surv = [(a, e["survival_models"]) for a, e in ext.items() if e.get("survival_models")]
    if surv:
        first = surv[0][1]
        parts.append(Markup("<h2>Survival models (external site)</h2>"))
        parts.append(_h("<p>Overall survival of {} external patients ({} deaths). Harrell's C "
                        "with percentile-bootstrap 95 % CI; the Cox models are fitted federated "
                        "(site-stratified partial likelihood, Newton steps on summed site "
                        "gradients and Hessians) and predict the risk of death by day {}.</p>",
                        _f(first["n"]), _f(first["events"]), _f(first["horizon"], 0)))
        rows = []
        for a, b in surv:
            for m, c in b["c_index"].items():
                cal = b.get("calibration", {}).get(m)
                rows.append([a, m, _ci(c["c"], c["ci"]),
                             _f(cal["predicted_mean"]) if cal else "",
                             _f(b.get("observed_risk_at_horizon")) if cal else ""])
        parts.append(_table(["arm", "model", "C-index (95% CI)", "mean predicted risk",
                             "observed risk (KM)"], rows))
        diffs = [[a, d["a"], d["b"],
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
                    hr = math.exp(c) if _num(c) is not None and c < 700 else None
                    hr_rows.append([arm, k.split("@")[0], f, _f(c), _f(se), _f(hr),
                                    _f(cox["h0"], 4)])
        if hr_rows:
            parts.append(Markup("<h3>Federated Cox coefficients</h3>"))
            parts.append(_table(["arm", "model", "covariate", "coef", "SE", "hazard ratio",
                                 "baseline H0(horizon)"], hr_rows))
    return parts


def _signed(x: Any) -> Markup:
    """A coefficient with its sign (``+0.12``), or the value escaped when not a number."""
    return Markup(f"{x:+.2f}") if _num(x) is not None else _f(x)


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


def _ssl_and_cam_section(metrics: dict[str, Any]) -> list[Markup]:
    """The self-supervised pretraining ablation (paired DeLong of each arm against its no-SSL
    twin) and the Grad-CAM localisation on the external site."""
    ext = metrics.get("external", {})
    parts: list[Markup] = []
    pairs = [c for c in metrics.get("comparisons") or []
             if c["b"] == f"{c['a']}_nossl" or c["a"] == f"{c['b']}_nossl"]
    if pairs:
        parts.append(Markup("<h2>Self-supervised pretraining ablation (external site)</h2>"))
        parts.append(Markup(
            "<p>Each federated strategy trained twice in the same run: after federated Barlow "
            "Twins pretraining of the encoder, and from scratch (<code>_nossl</code>) with the "
            "same fine-tuning budget; paired DeLong test on the same external patients.</p>"))
        parts.append(_table(["with SSL", "without", "AUC with", "AUC without",
                             "difference (95% CI)", "p"],
                            [[c["a"], c["b"], _f(c["auc_a"]), _f(c["auc_b"]),
                              _ci(_diff(c["auc_a"], c["auc_b"]), c.get("ci_diff")),
                              _f(c["p_value"], 4)] for c in pairs]))
    cams = [(a, e["cam"]) for a, e in ext.items() if "/" not in a and e.get("cam")]
    if cams:
        parts.append(Markup("<h2>Grad-CAM on the external site</h2>"))
        parts.append(Markup(
            "<p>Share of the top-10 % Grad-CAM mass that falls inside the lesion mask, against "
            "the share expected if it were spread at random (one-sided paired test over "
            "patients). The images are means over all external patients, lesion-centred: no "
            "single patient's pixels leave the site.</p>"))
        parts.append(_table(["arm", "n", "in-mask share", "chance", "p"],
                            [[a, _f(c["n"]), _f(c["in_mask_fraction"]),
                              _f(c["chance"]), _f(c["p_value"], 4)] for a, c in cams]))
        primary = metrics.get("model", {}).get("arm")
        chosen = [(a, c) for a, c in cams if a == primary] or cams[:1]
        figures = [(_plot(_cam_plot, a, c), f"Mean Grad-CAM over the external patients, {a}")
                   for a, c in chosen]
        parts.append(_h('<div class="grid">{}</div>',
                        _join(_figure(p, cap) for p, cap in figures if p)))
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
