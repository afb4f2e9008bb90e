"""CEUS time-intensity-curve analysis: linearisation, lognormal fit, features, phantom patients."""

from __future__ import annotations

import csv
import inspect
import math
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest
from scipy import ndimage, special, stats

from hcc_fl.client.io import read_cine
from hcc_fl.shared import perfusion as P
from hcc_fl.shared.phantom import default_sites, generate
from hcc_fl.shared.phantom_images import log_compress, lognormal_tic

PARAMS = [  # (i0, a, t0, mu, sigma): phantom-like lesion, liver-like, narrow and wide boluses
    (0.02, 35.0, 11.0, math.log(12.0), 0.55),
    (0.05, 20.0, 17.0, math.log(25.0), 0.6),
    (0.10, 50.0, 9.0, math.log(6.0), 0.3),
    (0.00, 80.0, 13.0, math.log(15.0), 0.9),
]
AMPLITUDE_FEATURES = ("pe", "auc", "wiauc", "woauc", "wir", "wor", "wipi", "i0")
TIMING_FEATURES = ("ttp", "rt", "mtt", "ft", "at")


def _truth_fit(p: tuple[float, float, float, float, float]) -> P.BolusFit:
    return P.BolusFit(*p, r2=1.0, ok=True, message="truth")


def _closed_forms(p: tuple[float, float, float, float, float]) -> dict[str, float]:
    """Lognormal closed forms, derived independently of the grid code.

    With u = (ln(t - t0) - mu) / sigma the enhancement is C exp(-sigma u - u^2 / 2),
    C = A exp(-mu) / (sqrt(2 pi) sigma), so it is a fraction q of its peak where
    u = -sigma -/+ sqrt(-2 ln q); its slope is extremal where u^2 + 3 sigma u + 2 sigma^2 = 1.
    """
    _, a, t0, mu, s = p

    def at_u(u: float) -> float:
        return t0 + math.exp(mu + s * u)

    c = a * math.exp(-mu) / (math.sqrt(2 * math.pi) * s)

    def slope(u: float) -> float:
        return -(c / s) * (s + u) * math.exp(-2 * s * u - u * u / 2 - mu)

    r10, r90 = math.sqrt(-2 * math.log(0.1)), math.sqrt(-2 * math.log(0.9))
    ttp = at_u(-s)
    rt = at_u(-s - r90) - at_u(-s - r10)
    wiauc = a * float(special.ndtr(-s))
    return {
        "ttp": ttp, "pe": c * math.exp(s * s / 2), "mtt": math.exp(mu + s * s / 2), "auc": a,
        "rt": rt, "ft": at_u(-s + r10) - ttp,
        "wir": slope((-3 * s - math.sqrt(s * s + 4)) / 2),
        "wor": slope((-3 * s + math.sqrt(s * s + 4)) / 2),
        "wiauc": wiauc, "woauc": a - wiauc, "wipi": wiauc / rt, "at": t0, "i0": p[0],
    }


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ----------------------------------------------------------------------------- model and fit
@pytest.mark.parametrize("p", PARAMS)
def test_noiseless_curve_is_recovered(p: tuple[float, float, float, float, float]) -> None:
    t = np.arange(0.0, 121.0, 1.0)  # 1 fps over 0-120 s
    fit = P.fit_lognormal(t, P.lognormal_curve(t, *p))
    assert fit.ok and fit.r2 > 0.999999 and fit.message == "ok" and fit.n_points == 121
    for name, got, want in zip(("i0", "a", "t0", "mu", "sigma"), fit.params, p, strict=True):
        tol = 1e-3 * max(abs(want), 1e-2)  # i0 = 0 is compared absolutely
        assert abs(got - want) <= tol, (name, got, want)
    feats = P.tic_features(fit)
    closed = _closed_forms(p)
    for name, want in closed.items():
        if name == "i0" and want == 0:
            assert abs(feats[name]) < 1e-4
            continue
        assert _rel(feats[name], want) < 1e-3, (name, feats[name], want)
    assert feats["fit_ok"] == 1.0 and feats["r2"] == fit.r2


@pytest.mark.parametrize("p", [*PARAMS, (0.0, 1.0, 5.0, -1.0, 0.05), (0.0, 1.0, 0.0, 6.0, 3.0)])
def test_grid_features_match_closed_forms(p: tuple[float, float, float, float, float]) -> None:
    feats = P.tic_features(_truth_fit(p))
    for name, want in _closed_forms(p).items():
        if name == "i0":
            continue
        assert _rel(feats[name], want) < 1e-8, (name, feats[name], want)
    assert feats["wir"] > 0 > feats["wor"]
    assert feats["ttp"] - p[2] == pytest.approx(math.exp(p[3] - p[4] ** 2), rel=1e-9)
    # the grid only brackets; the refined values do not depend on its step
    coarse = P.tic_features(_truth_fit(p), dt=0.5)
    for name in ("pe", "ttp", "rt", "ft", "wir", "wor"):
        assert _rel(coarse[name], feats[name]) < 1e-8, name


def test_model_matches_phantom_generator() -> None:
    t = np.arange(0.0, 121.0, 0.5, dtype=np.float32)
    ours = P.lognormal_curve(t, 0.0, 700.0, 11.3, math.log(12.0), 0.55)
    theirs = lognormal_tic(t, 11.3, math.log(12.0), 0.55, 700.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.all(P.lognormal_curve(t[t <= 11.3], 0.7, 700.0, 11.3, 2.0, 0.5) == 0.7)


def _noisy(rng: np.random.Generator, t: np.ndarray, p: tuple[float, ...], cv: float) -> np.ndarray:
    k = 1.0 / cv**2
    return P.lognormal_curve(t, *p) * rng.gamma(k, 1.0 / k, size=t.shape)


def test_intensity_scale_changes_only_amplitudes() -> None:
    rng = np.random.default_rng(11)
    t = np.arange(0.0, 120.0, 0.5)
    for p in PARAMS[:2]:
        y = _noisy(rng, t, p, 0.35)
        f1, f7 = P.tic_features(P.fit_lognormal(t, y)), P.tic_features(P.fit_lognormal(t, 7.3 * y))
        assert f1["fit_ok"] == f7["fit_ok"] == 1.0
        assert f1["r2"] == pytest.approx(f7["r2"], rel=1e-9)
        for name in TIMING_FEATURES:
            assert _rel(f7[name], f1[name]) < 1e-6, name
        for name in AMPLITUDE_FEATURES:
            assert _rel(f7[name], 7.3 * f1[name]) < 1e-6, name


@pytest.mark.parametrize(("fps", "weighting"), [(2.0, "none"), (1.0, "inverse")])
def test_noisy_curves_median_errors(fps: float, weighting: Literal["none", "inverse"]) -> None:
    """50 curves, multiplicative gamma noise (CV 0.35) over 0-120 s.

    2 fps unweighted is science.md's check; at 1 fps the unweighted PE error is ~12 %, and the
    1 / I weighting meant for multiplicative noise brings it back under 10 %.
    """
    rng = np.random.default_rng(2024)
    t = np.arange(0.0, 120.0, 1.0 / fps)
    err: dict[str, list[float]] = {"ttp": [], "pe": [], "auc": []}
    n_ok = 0
    for _ in range(50):
        p = (0.02, rng.uniform(300, 1000), rng.uniform(8, 14),
             math.log(12.0) + rng.normal(0, 0.18), rng.uniform(0.45, 0.7))
        fit = P.fit_lognormal(t, _noisy(rng, t, p, 0.35), weighting=weighting)
        n_ok += fit.ok
        got, want = P.tic_features(fit), _closed_forms(p)
        for name in err:
            err[name].append(_rel(got[name], want[name]))
    assert n_ok == 50
    assert np.median(err["ttp"]) < 0.05
    assert np.median(err["pe"]) < 0.10
    assert np.median(err["auc"]) < 0.10


def test_inverse_weighting_recovers_noiseless_curve() -> None:
    t = np.arange(0.0, 121.0, 1.0)
    p = PARAMS[0]
    fit = P.fit_lognormal(t, P.lognormal_curve(t, *p), weighting="inverse")
    assert fit.ok
    np.testing.assert_allclose(fit.params, p, rtol=1e-3)


@pytest.mark.parametrize(
    ("t", "y", "reason"),
    [
        (np.arange(121.0), np.full(121, 3.2), "flat"),
        (np.arange(121.0), np.zeros(121), "flat"),
        (np.arange(121.0), np.full(121, np.nan), "too few"),
        (np.arange(121.0), np.r_[np.full(118, np.nan), 1.0, 2.0, 1.0], "too few"),
        (np.zeros(0), np.zeros(0), "too few"),
        (np.arange(5.0), np.arange(4.0), "differ"),
        (np.arange(121.0), np.r_[np.full(60, 5.0), np.full(61, 1.0)], "enhancement"),
    ],
)
def test_bad_curves_fail_without_exception(t: np.ndarray, y: np.ndarray, reason: str) -> None:
    fit = P.fit_lognormal(t, y)
    assert not fit.ok and reason in fit.message
    assert not fit.has_params and all(math.isnan(v) for v in fit.params)
    feats = P.tic_features(fit)
    assert feats["fit_ok"] == 0.0
    assert all(math.isnan(feats[k]) for k in ("pe", "ttp", "auc", "mtt", "rt"))


def test_noise_only_curve_is_flagged_not_failed() -> None:
    rng = np.random.default_rng(5)
    t = np.arange(0.0, 121.0)
    fit = P.fit_lognormal(t, 1.0 + 0.3 * rng.standard_normal(t.size))
    assert not fit.ok and fit.r2 < 0.7 and "poor fit" in fit.message
    assert fit.has_params


def test_nan_samples_are_dropped() -> None:
    t = np.arange(0.0, 121.0)
    y = P.lognormal_curve(t, *PARAMS[0])
    y[[3, 40, 77]] = np.nan
    fit = P.fit_lognormal(t, y)
    assert fit.ok and fit.n_points == 118
    np.testing.assert_allclose(fit.params, PARAMS[0], rtol=1e-3)


def test_lesion_liver_features() -> None:
    lesion, liver = _truth_fit(PARAMS[0]), _truth_fit(PARAMS[1])
    out = P.lesion_liver_features(lesion, liver)
    assert out["at_diff"] == pytest.approx(11.0 - 17.0)
    assert out["auc_ratio"] == pytest.approx(35.0 / 20.0)
    cl, cv = _closed_forms(PARAMS[0]), _closed_forms(PARAMS[1])
    assert out["pe_ratio"] == pytest.approx(cl["pe"] / cv["pe"], rel=1e-5)
    failed = P.lesion_liver_features(lesion, P.BolusFit.failed("x"))
    assert all(math.isnan(v) for v in failed.values())


def test_raw_tic_stats() -> None:
    t = np.arange(0.0, 10.0, 0.5)
    y = 3.0 * t + 1.0
    out = P.raw_tic_stats(t, y)
    assert out["tic_mean"] == pytest.approx(y.mean())
    assert out["tic_std"] == pytest.approx(y.std())
    assert out["tic_p90"] == pytest.approx(np.percentile(y, 90))
    assert out["tic_min"] == 1.0 and out["tic_max"] == pytest.approx(y.max())
    assert out["tic_skewness"] == pytest.approx(0.0, abs=1e-12)
    assert out["tic_kurtosis"] == pytest.approx(stats.kurtosis(y))
    for k in ("mean", "min", "max", "p10", "p50", "p90"):  # the derivative of a ramp is 3
        assert out[f"dtic_{k}"] == pytest.approx(3.0)
    assert out["dtic_std"] == pytest.approx(0.0, abs=1e-12) and math.isnan(out["dtic_skewness"])
    yy = np.r_[y[:5], np.nan, y[6:]]
    assert P.raw_tic_stats(t, yy)["tic_mean"] == pytest.approx(np.nanmean(yy))
    empty = P.raw_tic_stats(np.zeros(0), np.zeros(0))
    assert len(empty) == 18 and all(math.isnan(v) for v in empty.values())


# ----------------------------------------------------------------------------- linearise, ROIs
def test_linearise_inverts_phantom_compression() -> None:
    """Round trip through the phantom's own forward law, ``phantom_images.log_compress``."""
    assert inspect.signature(log_compress).parameters["ref_db"].default == P.PHANTOM_REF_DB
    levels = np.arange(256, dtype=np.float64)
    for site in default_sites():
        im = site.imaging
        gamma = P.PHANTOM_GAMMA if im.gamma_law else 1.0
        power = P.linearise(levels, im.dr_db, im.gain_db, gamma=gamma)
        # every grey level maps to a power that the phantom compresses back to that level
        back = log_compress(power.astype(np.float32), im)
        np.testing.assert_array_equal(back, levels.astype(np.uint8), err_msg=site.name)
        assert np.all(np.diff(power) > 0)
        # powers inside the displayed range come back within half a grey level
        lo, hi = power[0], power[-1]
        p = np.geomspace(lo * 1.01, hi * 0.99, 500).astype(np.float32)
        rec = P.linearise(log_compress(p, im), im.dr_db, im.gain_db, gamma=gamma)
        # half a grey level is dr/510 dB, at most 1/gamma times that through the gamma law
        db_err = np.abs(10 * np.log10(rec / p))
        assert db_err.max() <= 0.5 * im.dr_db / 255.0 / gamma + 1e-4, site.name
    # science.md's form 10^((v/255*DR - offset)/10) with offset = DR - 20 + gain
    v = np.array([0.0, 17.0, 128.0, 255.0])
    np.testing.assert_allclose(
        P.linearise(v, 40.0, 3.0), 10 ** ((v / 255 * 40.0 - (40.0 - 20.0 + 3.0)) / 10)
    )
    np.testing.assert_allclose(P.linearise([-5.0, 300.0], 40.0), P.linearise([0.0, 255.0], 40.0))
    with pytest.raises(ValueError, match="dr_db"):
        P.linearise(v, 0.0)


def test_liver_reference_mask_is_a_ring_outside_the_lesion() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    lesion = np.hypot(yy - 30, xx - 33) <= 9
    ring = P.liver_reference_mask(lesion, gap_px=3, width_px=6)
    dist = ndimage.distance_transform_edt(~lesion)
    assert ring.any() and not (ring & lesion).any()
    assert dist[ring].min() > 3 and dist[ring].max() <= 9
    assert ring.sum() > lesion.sum()
    big = np.ones((64, 64), bool)
    big[:2] = False
    assert not P.liver_reference_mask(big).any()  # nothing is farther than 3 px from it
    assert not P.liver_reference_mask(np.zeros((8, 8), bool)).any()


def test_roi_curves_average_inside_masks() -> None:
    frames = np.zeros((3, 32, 32))
    lesion = np.zeros((32, 32), bool)
    lesion[10:20, 10:20] = True
    frames[:, lesion] = np.array([1.0, 2.0, 3.0])[:, None]
    frames[:, ~lesion] = 0.5
    frames[1, 12, 12] = np.nan
    cur = P.roi_curves(frames, lesion)
    np.testing.assert_allclose(cur["lesion"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(cur["liver"], [0.5, 0.5, 0.5])
    frames[:, lesion & ~P.erode_mask(lesion, 2)] = 100.0  # the lesion's 2-px edge
    eroded = P.roi_curves(frames, lesion, lesion_erode_px=2)
    np.testing.assert_allclose(eroded["lesion"], [1.0, 2.0, 3.0])
    assert np.all(np.isnan(P.roi_curves(frames, lesion, np.zeros_like(lesion))["liver"]))


def test_saturated_peak_frames_are_left_out_of_the_fit() -> None:
    """A gain-heavy display clips the bolus peak at full white: averaging the clipped pixels
    flattens the curve (lower peak, longer transit); leaving those frames out lets the fit
    recover the bolus from its rise and wash-out."""
    t = np.arange(0.0, 120.0, 1.0)
    p = (0.5, 2000.0, 10.0, math.log(12.0), 0.55)
    power = P.lognormal_curve(t, *p)
    lesion = np.zeros((24, 24), bool)
    lesion[6:18, 6:18] = True
    liver = np.zeros((24, 24), bool)
    liver[:3] = True
    site = default_sites()[1].imaging  # site_B, +3 dB gain
    grey = np.stack([log_compress(np.full((24, 24), x, np.float32), site) for x in power])
    clipped = (grey >= 255).mean(axis=(1, 2)) > 0
    assert 3 <= clipped.sum() <= 40  # the display really clips the peak
    truth = P.tic_features(_truth_fit(p))
    fixed = P.tic_feature_vector(grey, t, lesion, liver, site.dr_db, site.gain_db,
                                 lesion_erode_px=0)
    naive = P.tic_feature_vector(grey, t, lesion, liver, site.dr_db, site.gain_db,
                                 lesion_erode_px=0, max_saturated=1.0)
    for f in ("pe", "mtt", "ttp"):
        assert _rel(fixed[f"lesion_{f}"], truth[f]) < 0.03, f
    assert _rel(naive["lesion_pe"], truth["pe"]) > 0.15  # what the clipped mean gives


def test_feature_vector_of_a_blank_cine_is_nan_with_stable_names() -> None:
    frames = np.full((61, 32, 32), 40.0)
    lesion = np.zeros((32, 32), bool)
    lesion[8:20, 8:20] = True
    out = P.tic_feature_vector(frames, np.arange(61) * 2.0, lesion, None, 40.0, 0.0)
    assert list(out) == sorted(out) == P.tic_feature_names()
    assert out["lesion_fit_ok"] == 0.0 and math.isnan(out["lesion_ttp"])
    assert math.isnan(out["ratio_pe_ratio"])
    assert out["raw_tic_mean"] == pytest.approx(P.linearise(40.0, 40.0).item())


# ----------------------------------------------------------------------------- phantom patients
def _site_features(root: Path, site: str) -> list[tuple[dict[str, float], dict[str, str]]]:
    truth = {r["patient_id"]: r for r in csv.DictReader((root / "truth.csv").open())}
    gamma_law = {s.name: s.imaging.gamma_law for s in default_sites()}
    out = []
    with (root / site / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            cine = read_cine(root / site / row["ceus_cine"])
            mask = cv2.imread(str(root / site / row["ceus_lesion_mask"]), cv2.IMREAD_GRAYSCALE)
            assert mask is not None
            feats = P.tic_feature_vector(
                cine.frames, cine.times, np.asarray(mask > 127), None,
                float(row["dr_db"]), float(row["gain_db"]),
                gamma=P.PHANTOM_GAMMA if gamma_law[site] else 1.0,
            )
            out.append((feats, truth[row["patient_id"]]))
    return out


@pytest.fixture(scope="module")
def ceus_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sites A and EXT of ``generate(root, seed=3, scale=0.25)`` (10 patients each).

    Only two sites are generated to keep this module fast. Site A is byte-identical to the
    session's ``small_phantom``; EXT is drawn from the same seed with a different site index.
    """
    root = tmp_path_factory.mktemp("ceus_phantom")
    sites = {s.name: s for s in default_sites(0.25)}
    generate(root, seed=3, sites=[sites["site_A"], sites["site_EXT"]])
    return root


@pytest.mark.parametrize("site", ["site_A", "site_EXT"])
def test_phantom_patients(ceus_phantom: Path, site: str) -> None:
    rows = _site_features(ceus_phantom, site)
    assert len(rows) >= 8
    ok = [f["lesion_fit_ok"] == 1.0 and f["lesion_r2"] > 0.7 for f, _ in rows]
    assert np.mean(ok) >= 0.8
    # truth.csv holds the generator's lesion TIC (tic_t0, tic_mu, tic_sigma, tic_amplitude)
    got = np.array([f["lesion_ttp"] for f, _ in rows])
    want = np.array([float(r["tic_t0"]) + math.exp(float(r["tic_mu"]) - float(r["tic_sigma"]) ** 2)
                     for _, r in rows])
    good = np.isfinite(got)
    rho = stats.spearmanr(got[good], want[good])[0]
    assert rho > 0.7
    if site != "site_EXT":  # EXT saturates at the peak (gain +6 dB), so only ranks are checked
        assert np.median(np.abs(got[good] - want[good]) / want[good]) < 0.03
        # arrival time and mTT are accurate only once the lesion ROI is eroded against breathing
        # (median errors 0.1 s and 1 %; 0.6 s and 7 % without erosion)
        at_err = [abs(f["lesion_at"] - float(r["tic_t0"])) for f, r in rows]
        mtt_true = [math.exp(float(r["tic_mu"]) + float(r["tic_sigma"]) ** 2 / 2) for _, r in rows]
        mtt_err = [abs(f["lesion_mtt"] / m - 1) for (f, _), m in zip(rows, mtt_true, strict=True)]
        assert np.nanmedian(at_err) < 0.4 and np.nanmedian(mtt_err) < 0.04
        # the phantom's liver bolus arrives 6 s after the lesion's
        at_diff = np.array([f["ratio_at_diff"] for f, _ in rows])
        assert -7.5 < np.nanmedian(at_diff) < -4.5
        assert np.mean([f["liver_fit_ok"] for f, _ in rows]) >= 0.8
