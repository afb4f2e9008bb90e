"""Time-intensity-curve (TIC) perfusion analysis for contrast-enhanced ultrasound (CEUS).

The pipeline of science.md section 2, in pure numpy/scipy:

1. :func:`linearise` undoes the display's log compression (and optional gamma law), so that
   amplitudes are linear contrast-agent power.
2. :func:`roi_curves` averages the linear power over the lesion mask and a liver reference ROI
   (:func:`liver_reference_mask`, a ring around the lesion) in every frame.
3. :func:`fit_lognormal` fits the lognormal bolus model :func:`lognormal_curve` with bounded
   trust-region least squares; the fit never raises and flags poor fits (R^2 < 0.7).
4. :func:`tic_features` derives the usual perfusion features from the fitted curve,
   :func:`lesion_liver_features` the lesion-to-liver ratios, and :func:`raw_tic_stats` the
   first-order "TIC radiomics" of the measured curve and its derivative.
5. :func:`tic_feature_vector` runs everything for one patient and returns a flat, sorted dict.

Feature conventions (all on the fitted curve; "enhancement" means the curve minus I0)
--------------------------------------------------------------------------------------
``pe``     peak enhancement, peak value minus I0 (linear power units).
``ttp``    time to peak, absolute time (s) on the cine's clock, i.e. including the arrival time.
``at``     arrival time t0 (s), the start of the bolus in the model.
``rt``     rise time t90 - t10 (s); t10 and t90: the *rising* limb reaches 10 % and 90 % of PE.
``ft``     fall time (s) from the peak to where the *falling* limb has dropped to 10 % of PE.
``wir``    wash-in rate, the largest slope of the curve (power/s, > 0).
``wor``    wash-out rate, the most negative slope (power/s, < 0; kept signed).
``auc``    area under the enhancement over (t0, infinity): exactly the model amplitude A.
``wiauc``  area under the enhancement from t0 to TTP: A * Phi(-sigma) (analytic).
``woauc``  area under the enhancement after TTP: A * Phi(sigma) = auc - wiauc (analytic).
``wipi``   wash-in perfusion index, wiauc / rt (power).
``mtt``    mean transit time after arrival, exp(mu + sigma^2 / 2) (s), i.e. measured from t0.
``i0``     baseline I0 (power).

The three areas are analytic (infinite horizon), so they do not depend on the acquisition
window; all others except ``mtt`` and ``at`` are measured numerically on the fitted curve,
sampled on :func:`feature_grid`: a grid that starts at t0 with step ``dt`` (0.05 s by default)
and runs to the later of :data:`CINE_HORIZON_S` (120 s, the phantom's acquisition) and the time
the falling limb has dropped to 1 % of PE, merged with 2001 points evenly spaced in log time
around the bolus; each grid estimate is refined on the model between its neighbouring grid
points. For the lognormal the results agree with closed forms (see the tests) to ~1e-9.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage, optimize, special, stats

F64 = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

#: Reference level (dB) that maps to full white in the phantom's log compression
#: (``hcc_fl.shared.phantom_images.log_compress``, default argument ``ref_db=20.0``).
PHANTOM_REF_DB = 20.0
#: Display exponent of the phantom's "gamma law" sites (``grey ** 0.8`` in ``log_compress``).
PHANTOM_GAMMA = 0.8
#: End of the phantom's CEUS acquisition (s); the minimum horizon of the feature grid.
CINE_HORIZON_S = 120.0
#: Fits with R^2 below this are flagged (``BolusFit.ok`` is False).
R2_MIN = 0.7

#: Bounds of the lognormal fit (i0, a, t0, mu, sigma), science.md section 2.
LOWER_BOUNDS = (0.0, 0.0, 0.0, -2.0, 0.05)
UPPER_BOUNDS = (np.inf, np.inf, 60.0, 6.0, 3.0)

_PARAM_NAMES = ("i0", "a", "t0", "mu", "sigma")
_FEATURE_NAMES = (
    "at", "auc", "ft", "i0", "mtt", "pe", "rt", "ttp", "wiauc", "wipi", "wir", "woauc", "wor",
)
_MAX_GRID = 400_000


# ----------------------------------------------------------------------------- linearisation
def linearise(
    v: ArrayLike,
    dr_db: float,
    gain_db: float = 0.0,
    vmax: float = 255.0,
    *,
    gamma: float = 1.0,
    ref_db: float = PHANTOM_REF_DB,
) -> F64:
    """Convert log-compressed display values to linear power.

    Inverts the phantom's compression law (``hcc_fl.shared.phantom_images.log_compress``)::

        g = (10 log10(P) + gain_db - (ref_db - dr_db)) / dr_db      clipped to [0, 1]
        v = round(vmax * g ** gamma)

    so that::

        P = 10 ** ((dr_db * (v / vmax) ** (1 / gamma) + ref_db - dr_db - gain_db) / 10)

    This is science.md's ``10^((v/255*DR - offset)/10)`` with ``offset = dr_db - ref_db + gain_db``
    when ``gamma == 1``. Grey level 0 maps to ``ref_db - dr_db - gain_db`` dB and ``vmax`` to
    ``ref_db - gain_db`` dB; values outside [0, vmax] are clipped first. Clipped (saturated or
    black) pixels cannot be restored: they come back as the end points of the range.

    Parameters
    ----------
    v : array_like
        Display values (any shape), e.g. 8-bit grey levels.
    dr_db : float
        Displayed dynamic range in dB (manifest column ``dr_db``), > 0.
    gain_db : float
        Receive gain in dB added before compression (manifest column ``gain_db``).
    vmax : float
        Display value of full white.
    gamma : float
        Display exponent applied after compression; the phantom uses 1.0, and
        :data:`PHANTOM_GAMMA` (0.8) for sites with a gamma law (site_EXT).
    ref_db : float
        Power level (dB) shown as full white at zero gain; the phantom uses 20 dB.

    Returns
    -------
    ndarray of float64
        Linear power, same shape as ``v``.
    """
    if not dr_db > 0:
        raise ValueError(f"dr_db must be > 0, got {dr_db}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not vmax > 0:
        raise ValueError(f"vmax must be > 0, got {vmax}")
    grey = np.clip(np.asarray(v, dtype=np.float64) / vmax, 0.0, 1.0)
    if gamma != 1.0:
        grey = grey ** (1.0 / gamma)
    db = dr_db * grey + (ref_db - dr_db) - gain_db
    return np.asarray(10.0 ** (db / 10.0), dtype=np.float64)


# ----------------------------------------------------------------------------- ROIs
def liver_reference_mask(
    lesion_mask: npt.NDArray[np.bool_], gap_px: float = 3.0, width_px: float = 6.0
) -> npt.NDArray[np.bool_]:
    """Ring-shaped liver reference ROI around (not touching) the lesion.

    The phantom's CEUS cine is liver parenchyma everywhere outside the lesion and has no liver
    mask of its own (the liver masks it writes belong to the follow-up B-mode pair), so the
    reference ROI is the set of pixels whose Euclidean distance to the lesion is in
    ``(gap_px, gap_px + width_px]``. The gap should exceed the breathing motion (the phantom
    shifts frames by up to 2 pixels) so that the ring does not pick up lesion signal.

    Parameters
    ----------
    lesion_mask : ndarray of bool, shape (H, W)
        Lesion mask.
    gap_px, width_px : float
        Distance (pixels) between lesion and ring, and ring width.

    Returns
    -------
    ndarray of bool, shape (H, W)
        The ring, cut at the image border. If the ring is empty (the lesion fills the field),
        every pixel farther than ``gap_px`` from the lesion; empty if there is none, or if the
        lesion mask is empty.
    """
    lesion = np.asarray(lesion_mask, dtype=bool)
    if lesion.ndim != 2:
        raise ValueError(f"lesion_mask must be 2-D, got shape {lesion.shape}")
    if not lesion.any():
        return np.zeros_like(lesion)
    dist = ndimage.distance_transform_edt(~lesion)
    ring = (dist > gap_px) & (dist <= gap_px + width_px)
    if not ring.any():
        ring = dist > gap_px
    return np.asarray(ring, dtype=bool)


def erode_mask(mask: npt.NDArray[np.bool_], px: int) -> npt.NDArray[np.bool_]:
    """Erode ``mask`` by ``px`` pixels (8-connected steps); the mask itself if that empties it."""
    m = np.asarray(mask, dtype=bool)
    if px <= 0 or not m.any():
        return m
    eroded = ndimage.binary_erosion(m, structure=np.ones((3, 3), bool), iterations=int(px))
    return np.asarray(eroded if eroded.any() else m, dtype=bool)


def roi_curves(
    frames: ArrayLike,
    lesion_mask: npt.NDArray[np.bool_],
    liver_mask: npt.NDArray[np.bool_] | None = None,
    *,
    lesion_erode_px: int = 0,
) -> dict[str, F64]:
    """Mean intensity per frame inside the lesion and the liver reference ROI.

    Parameters
    ----------
    frames : array_like, shape (T, H, W)
        Cine frames, normally linear power from :func:`linearise` (averaging display values
        would average logarithms).
    lesion_mask : ndarray of bool, shape (H, W)
        Lesion ROI.
    liver_mask : ndarray of bool, shape (H, W), optional
        Liver reference ROI; when None, :func:`liver_reference_mask` of the (uneroded) lesion.
    lesion_erode_px : int
        Erode the lesion ROI by this many pixels (:func:`erode_mask`) before averaging, so that
        breathing motion does not mix liver signal into the lesion curve. A lesion that would
        vanish is used uneroded.

    Returns
    -------
    dict
        ``{"lesion": (T,), "liver": (T,)}`` float64 means; all-NaN for an empty mask. Non-finite
        pixels are ignored.
    """
    arr = np.asarray(frames, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"frames must have shape (T, H, W), got {arr.shape}")
    lesion = np.asarray(lesion_mask, dtype=bool)
    if lesion.shape != arr.shape[1:]:
        raise ValueError(f"lesion_mask shape {lesion.shape} != frame shape {arr.shape[1:]}")
    liver = liver_reference_mask(lesion) if liver_mask is None else np.asarray(liver_mask, bool)
    if liver.shape != arr.shape[1:]:
        raise ValueError(f"liver_mask shape {liver.shape} != frame shape {arr.shape[1:]}")
    lesion_roi = erode_mask(lesion, lesion_erode_px)
    return {"lesion": _masked_mean(arr, lesion_roi), "liver": _masked_mean(arr, liver)}


def _masked_mean(arr: F64, mask: npt.NDArray[np.bool_]) -> F64:
    if not mask.any():
        return np.full(arr.shape[0], np.nan)
    vals = arr[:, mask]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(vals, axis=1), dtype=np.float64)


# ----------------------------------------------------------------------------- model
def lognormal_curve(
    t: ArrayLike, i0: float, a: float, t0: float, mu: float, sigma: float
) -> F64:
    """Lognormal bolus model (science.md section 2).

    ``I(t) = I0 + A / (sqrt(2 pi) sigma (t - t0)) exp(-(ln(t - t0) - mu)^2 / (2 sigma^2))`` for
    ``t > t0`` and ``I0`` for ``t <= t0``. ``A`` is the area under the enhancement, ``mu`` and
    ``sigma`` the mean and standard deviation of ``ln(t - t0)``.

    Parameters
    ----------
    t : array_like
        Times (s).
    i0, a, t0, mu, sigma : float
        Baseline, area, arrival time, log-time location and log-time scale (> 0).

    Returns
    -------
    ndarray of float64
        Model intensity at ``t``.
    """
    tt = np.asarray(t, dtype=np.float64)
    s = tt - t0
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    z = (np.log(ss) - mu) / sigma
    body = a / (math.sqrt(2.0 * math.pi) * sigma * ss) * np.exp(-0.5 * z * z)
    return np.asarray(i0 + np.where(pos, body, 0.0), dtype=np.float64)


def _lognormal_slope(t: F64, a: float, t0: float, mu: float, sigma: float) -> F64:
    """Time derivative of :func:`lognormal_curve` (0 before t0)."""
    s = t - t0
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    z = (np.log(ss) - mu) / sigma
    f = a / (math.sqrt(2.0 * math.pi) * sigma * ss) * np.exp(-0.5 * z * z)
    return np.asarray(np.where(pos, -f * (1.0 + z / sigma) / ss, 0.0), dtype=np.float64)


def _lognormal_jac(t: F64, i0: float, a: float, t0: float, mu: float, sigma: float) -> F64:
    """Jacobian of :func:`lognormal_curve` with respect to (i0, a, t0, mu, sigma), shape (T, 5)."""
    s = t - t0
    pos = s > 0
    ss = np.where(pos, s, 1.0)
    z = (np.log(ss) - mu) / sigma
    unit = np.where(pos, np.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * sigma * ss), 0.0)
    f = a * unit
    jac = np.empty((t.size, 5), dtype=np.float64)
    jac[:, 0] = 1.0
    jac[:, 1] = unit
    jac[:, 2] = f * (1.0 + z / sigma) / ss
    jac[:, 3] = f * z / sigma
    jac[:, 4] = f * (z * z - 1.0) / sigma
    return jac


# ----------------------------------------------------------------------------- fit
@dataclass(frozen=True)
class BolusFit:
    """Result of :func:`fit_lognormal`.

    Attributes
    ----------
    i0, a, t0, mu, sigma : float
        Fitted parameters of :func:`lognormal_curve`; NaN when the fit failed.
    r2 : float
        Coefficient of determination on the fitted points; NaN when undefined.
    ok : bool
        True when the fit converged and ``r2 >= R2_MIN`` (0.7).
    message : str
        Why the fit failed or was flagged, or "ok".
    n_points : int
        Number of finite samples used.
    """

    i0: float
    a: float
    t0: float
    mu: float
    sigma: float
    r2: float
    ok: bool
    message: str
    n_points: int = 0

    @property
    def params(self) -> tuple[float, float, float, float, float]:
        """``(i0, a, t0, mu, sigma)``."""
        return (self.i0, self.a, self.t0, self.mu, self.sigma)

    @property
    def has_params(self) -> bool:
        """True when all parameters are finite (the fit ran, even if flagged)."""
        return bool(np.all(np.isfinite(self.params)))

    def curve(self, t: ArrayLike) -> F64:
        """The fitted model at ``t``."""
        return lognormal_curve(t, *self.params)

    @classmethod
    def failed(cls, message: str, n_points: int = 0) -> BolusFit:
        """A failed fit: NaN parameters, ``ok`` False."""
        nan = float("nan")
        return cls(nan, nan, nan, nan, nan, nan, False, message, n_points)


def _start_values(t: F64, y: F64) -> tuple[float, float, float, float, float]:
    """Data-driven start values (science.md section 2), on lightly smoothed data."""
    n = len(y)
    k = min(n, max(3, int(round(0.05 * n))))
    i0 = float(np.mean(y[:k]))
    ys = ndimage.uniform_filter1d(y, size=3, mode="nearest") if n >= 5 else y
    ipk = int(np.argmax(ys))
    ttp_obs = float(t[ipk])
    pe_obs = float(ys[ipk] - i0)
    above = np.nonzero(ys - i0 > 0.1 * pe_obs)[0]
    t_first = float(t[above[0]]) if len(above) else ttp_obs
    t0 = t_first - 2.0
    t0 = min(t0, ttp_obs - 1.0)
    t0 = float(np.clip(t0, LOWER_BOUNDS[2], UPPER_BOUNDS[2]))
    rise = max(ttp_obs - t0, 0.5)
    mu = math.log(rise) + 0.2
    a = pe_obs * ttp_obs * 0.8
    return (max(i0, 0.0), max(a, 0.0), t0, mu, 0.5)


def _inside(p: tuple[float, ...]) -> list[float]:
    """Move start values strictly inside the bounds (TRF requires a feasible start)."""
    out = []
    for v, lo, hi in zip(p, LOWER_BOUNDS, UPPER_BOUNDS, strict=True):
        span = (hi - lo) if np.isfinite(hi) else max(abs(v), 1.0)
        eps = 1e-6 * span
        out.append(float(np.clip(v, lo + eps, hi - eps if np.isfinite(hi) else np.inf)))
    return out


def fit_lognormal(
    t: ArrayLike,
    y: ArrayLike,
    *,
    weighting: Literal["none", "inverse"] = "none",
    r2_min: float = R2_MIN,
) -> BolusFit:
    """Fit :func:`lognormal_curve` to a time-intensity curve; never raises on bad data.

    Least squares on linear intensity with ``scipy.optimize.curve_fit(method="trf")`` and the
    bounds of science.md (``I0, A >= 0``; ``0 <= t0 <= 60`` s; ``mu`` in [-2, 6]; ``sigma`` in
    [0.05, 3]). Start values come from the data: I0 the mean of the first 5 % of samples (at
    least 3); the observed peak and TTP from a 3-sample moving average; t0 the first time above
    10 % of the observed enhancement minus 2 s; ``mu = ln(TTP_obs - t0) + 0.2``; ``sigma = 0.5``;
    ``A = PE_obs * TTP_obs * 0.8``. The data are divided by their largest absolute value before
    fitting (and the result scaled back), so the fit is equivariant to the intensity scale; the
    Jacobian is analytic and each start may use at most 200 evaluations (good fits need ~15). If
    the first start gives R^2 below ``r2_min``, two more starts (``sigma`` 0.3 and 1.0) are tried
    and the best fit is kept.

    Parameters
    ----------
    t, y : array_like, shape (T,)
        Times (s) and intensities (linear power). Non-finite samples are dropped.
    weighting : {"none", "inverse"}
        "inverse" weights residuals by 1 / I (relative errors, suited to multiplicative speckle),
        using the 3-sample moving average of the data as I.
    r2_min : float
        R^2 threshold for ``ok``.

    Returns
    -------
    BolusFit
        ``ok`` is False (parameters NaN, ``message`` giving the reason) for fewer than 6 finite
        samples, a flat curve or an optimiser failure; ``ok`` is False with parameters kept when
        R^2 < ``r2_min``.
    """
    try:
        tt = np.asarray(t, dtype=np.float64).ravel()
        yy = np.asarray(y, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        return BolusFit.failed(f"inputs are not numeric: {exc}")
    if tt.shape != yy.shape:
        return BolusFit.failed(f"t and y differ in length ({tt.size} vs {yy.size})")
    keep = np.isfinite(tt) & np.isfinite(yy)
    tt, yy = tt[keep], yy[keep]
    n = int(tt.size)
    if n < 6:
        return BolusFit.failed(f"too few finite samples ({n} < 6)", n)
    order = np.argsort(tt, kind="stable")
    tt, yy = tt[order], yy[order]
    scale = float(np.max(np.abs(yy)))
    if scale == 0.0 or float(np.ptp(yy)) <= 1e-9 * scale:
        return BolusFit.failed("flat curve: no enhancement", n)
    yn = yy / scale
    p_start = _start_values(tt, yn)
    if not p_start[1] > 0:
        return BolusFit.failed("no enhancement above the baseline", n)
    sigma_w = None
    if weighting == "inverse":
        ys = ndimage.uniform_filter1d(yn, size=3, mode="nearest")
        sigma_w = np.maximum(np.abs(ys), 1e-3 * float(np.max(np.abs(ys))))
    elif weighting != "none":
        return BolusFit.failed(f"unknown weighting {weighting!r}", n)

    ss_tot = float(np.sum((yn - yn.mean()) ** 2))
    best: tuple[float, F64] | None = None
    errors: list[str] = []
    starts = [p_start, (*p_start[:4], 0.3), (*p_start[:4], 1.0)]
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, _ = optimize.curve_fit(
                    lognormal_curve, tt, yn, p0=_inside(p0), sigma=sigma_w, jac=_lognormal_jac,
                    bounds=(LOWER_BOUNDS, UPPER_BOUNDS), method="trf",
                    ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=200,
                )
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        popt = np.asarray(popt, dtype=np.float64)
        if not np.all(np.isfinite(popt)):
            errors.append("non-finite parameters")
            continue
        resid = yn - lognormal_curve(tt, *popt)
        r2 = 1.0 - float(np.sum(resid**2)) / ss_tot
        if best is None or r2 > best[0]:
            best = (r2, popt)
        if r2 >= r2_min:
            break
    if best is None:
        return BolusFit.failed("optimiser failed: " + "; ".join(errors), n)
    r2, popt = best
    i0, a, t0, mu, sigma = (float(v) for v in popt)
    ok = r2 >= r2_min
    msg = "ok" if ok else f"poor fit: R^2 = {r2:.3f} < {r2_min}"
    return BolusFit(i0 * scale, a * scale, t0, mu, sigma, float(r2), ok, msg, n)


# ----------------------------------------------------------------------------- features
def _nan_features() -> dict[str, float]:
    return dict.fromkeys(_FEATURE_NAMES, float("nan"))


def _bracket_root(fn: Callable[[float], float], lo: float, hi: float) -> float:
    """Root of ``fn`` in ``[lo, hi]`` (which must bracket a sign change), to ~1e-12 s."""
    f_lo, f_hi = fn(lo), fn(hi)
    if f_lo == 0.0:
        return lo
    if f_hi == 0.0 or f_lo * f_hi > 0:
        return hi
    return float(optimize.brentq(fn, lo, hi, xtol=1e-12, rtol=1e-14))


def _crossing(
    t: F64, v: F64, level: float, lo: int, hi: int, rising: bool, fn: Callable[[float], float]
) -> float:
    """First time in ``t[lo..hi]`` where ``v`` crosses ``level``, refined on ``fn`` (the curve)."""
    seg = v[lo : hi + 1]
    idx = np.nonzero(seg >= level)[0] if rising else np.nonzero(seg <= level)[0]
    if not len(idx):
        return float("nan")
    j = lo + int(idx[0])
    if j == lo:
        return float(t[j])
    return _bracket_root(lambda x: fn(x) - level, float(t[j - 1]), float(t[j]))


def _extremum(t: F64, v: F64, i: int, fn: Callable[[float], float]) -> float:
    """Largest value of ``fn`` near grid index ``i`` (the grid maximum of ``v``), refined."""
    if i <= 0 or i >= len(v) - 1:
        return float(v[i])
    res = optimize.minimize_scalar(
        lambda x: -fn(x), bounds=(float(t[i - 1]), float(t[i + 1])), method="bounded",
        options={"xatol": 1e-10},
    )
    return max(float(-res.fun), float(v[i]))


def feature_grid(fit: BolusFit, dt: float = 0.05) -> F64:
    """The time grid :func:`tic_features` samples the fitted curve on.

    The union of (1) a uniform grid from t0 with step ``dt`` to the later of
    :data:`CINE_HORIZON_S` and the time the falling limb has dropped to 1 % of PE
    (``t0 + exp(mu - sigma^2 + sigma sqrt(2 ln 100))``), with ``dt`` enlarged if that would
    exceed 400 000 points, and (2) 2001 points evenly spaced in ``ln(t - t0)`` over
    ``mu +- 8 sigma``, which resolves boluses far narrower than ``dt``.
    """
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    t0, mu, sigma = fit.t0, fit.mu, fit.sigma
    t_end = t0 + math.exp(mu - sigma**2 + sigma * math.sqrt(2.0 * math.log(100)))
    t_end = max(t_end, CINE_HORIZON_S, t0 + 10 * dt)
    n = int(math.ceil((t_end - t0) / dt)) + 1
    if n > _MAX_GRID:
        dt = (t_end - t0) / (_MAX_GRID - 1)
        n = _MAX_GRID
    uniform = t0 + dt * np.arange(n)
    log_part = t0 + np.exp(mu + sigma * np.linspace(-8.0, 8.0, 2001))
    return np.asarray(np.union1d(uniform, log_part), dtype=np.float64)


def tic_features(fit: BolusFit, dt: float = 0.05) -> dict[str, float]:
    """Perfusion features of a fitted bolus curve.

    See the module docstring for the conventions. PE, TTP, RT, FT, WiR and WoR are measured on
    the fitted curve sampled on :func:`feature_grid`: the grid locates the peak, the threshold
    crossings and the slope extrema (the slope is the model's analytic derivative), and each is
    then refined on the model between its neighbouring grid points (Brent root finding or
    bounded minimisation), so the results do not depend on ``dt`` beyond ~1e-9 relative as long
    as the grid resolves the curve. AUC, WiAUC, WoAUC and mTT are analytic.

    Parameters
    ----------
    fit : BolusFit
        A fit from :func:`fit_lognormal`. Features are computed whenever its parameters are
        finite, even if the fit was flagged (``ok`` False); check ``fit_ok``.
    dt : float
        Grid step (s).

    Returns
    -------
    dict of str to float
        ``at, auc, ft, i0, mtt, pe, rt, ttp, wiauc, wipi, wir, woauc, wor`` (NaN when the fit has
        no parameters), plus ``r2`` and ``fit_ok`` (1.0 or 0.0).
    """
    out = _nan_features()
    out["r2"] = float(fit.r2)
    out["fit_ok"] = 1.0 if fit.ok else 0.0
    if not fit.has_params:
        return out
    i0, a, t0, mu, sigma = fit.params
    grid = feature_grid(fit, dt)
    enh = lognormal_curve(grid, 0.0, a, t0, mu, sigma)
    slope = _lognormal_slope(grid, a, t0, mu, sigma)

    def enh_at(x: float) -> float:
        return float(lognormal_curve(np.array([x]), 0.0, a, t0, mu, sigma)[0])

    def slope_at(x: float) -> float:
        return float(_lognormal_slope(np.array([x]), a, t0, mu, sigma)[0])

    out.update(at=t0, i0=i0, mtt=math.exp(mu + 0.5 * sigma**2), auc=a)
    wiauc = a * float(special.ndtr(-sigma))
    out.update(wiauc=wiauc, woauc=a - wiauc)
    ipk = int(np.argmax(enh))
    if not enh[ipk] > 0:
        out.update(pe=0.0)
        return out
    # the peak is where the slope changes sign, bracketed by the grid points beside the maximum
    lo, hi = max(ipk - 1, 0), min(ipk + 1, len(grid) - 1)
    ttp = _bracket_root(slope_at, float(grid[lo]), float(grid[hi]))
    pe = max(enh_at(ttp), float(enh[ipk]))
    t10 = _crossing(grid, enh, 0.1 * pe, 0, ipk, True, enh_at)
    t90 = _crossing(grid, enh, 0.9 * pe, 0, ipk, True, enh_at)
    t_fall = _crossing(grid, enh, 0.1 * pe, ipk, len(grid) - 1, False, enh_at)
    rt = t90 - t10
    i_up = int(np.argmax(slope[: ipk + 1]))
    i_dn = ipk + int(np.argmin(slope[ipk:]))
    wir = _extremum(grid, slope, i_up, slope_at)
    wor = -_extremum(grid, -slope, i_dn, lambda x: -slope_at(x))
    out.update(
        pe=pe, ttp=ttp, rt=rt, ft=t_fall - ttp, wir=wir, wor=wor,
        wipi=wiauc / rt if rt > 0 else float("nan"),
    )
    return out


def lesion_liver_features(lesion_fit: BolusFit, liver_fit: BolusFit) -> dict[str, float]:
    """Lesion-to-liver features.

    Returns
    -------
    dict of str to float
        ``pe_ratio`` (lesion PE / liver PE), ``auc_ratio`` (lesion A / liver A) and ``at_diff``
        (arrival time of the lesion minus that of the liver, s; negative when the lesion
        enhances first, as HCC does in the arterial phase). NaN unless both fits are ``ok``
        (and, for the ratios, the liver value is > 0).
    """
    nan = float("nan")
    out = {"at_diff": nan, "auc_ratio": nan, "pe_ratio": nan}
    if not (lesion_fit.ok and liver_fit.ok):
        return out
    fl, fv = tic_features(lesion_fit), tic_features(liver_fit)
    out["at_diff"] = lesion_fit.t0 - liver_fit.t0
    if fv["pe"] > 0:
        out["pe_ratio"] = fl["pe"] / fv["pe"]
    if fv["auc"] > 0:
        out["auc_ratio"] = fl["auc"] / fv["auc"]
    return out


def _first_order(x: F64, prefix: str) -> dict[str, float]:
    keys = ("mean", "std", "skewness", "kurtosis", "min", "max", "p10", "p50", "p90")
    if x.size == 0:
        return {f"{prefix}_{k}": float("nan") for k in keys}
    std = float(np.std(x))
    flat = std <= 1e-12 * max(float(np.max(np.abs(x))), 1e-300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        skew = float("nan") if flat else float(stats.skew(x))
        kurt = float("nan") if flat else float(stats.kurtosis(x))
    p10, p50, p90 = (float(v) for v in np.percentile(x, [10, 50, 90]))
    vals = (float(np.mean(x)), std, skew, kurt, float(np.min(x)), float(np.max(x)), p10, p50, p90)
    return {f"{prefix}_{k}": v for k, v in zip(keys, vals, strict=True)}


def raw_tic_stats(t: ArrayLike, y: ArrayLike) -> dict[str, float]:
    """First-order statistics of a measured TIC and of its time derivative ("TIC radiomics").

    Statistics: mean, population std, skewness and excess kurtosis (biased moment estimators,
    NaN for a constant curve), min, max and the 10th/50th/90th percentiles. The derivative is
    ``numpy.gradient(y, t)`` (central differences, one-sided at the ends; handles uneven
    spacing). Non-finite samples are dropped first.

    Returns
    -------
    dict of str to float
        Keys ``tic_<stat>`` and ``dtic_<stat>``; NaN when there are too few samples (fewer than
        1 for the TIC, 2 for the derivative).
    """
    tt = np.asarray(t, dtype=np.float64).ravel()
    yy = np.asarray(y, dtype=np.float64).ravel()
    if tt.shape != yy.shape:
        raise ValueError(f"t and y differ in length ({tt.size} vs {yy.size})")
    keep = np.isfinite(tt) & np.isfinite(yy)
    tt, yy = tt[keep], yy[keep]
    order = np.argsort(tt, kind="stable")
    tt, yy = tt[order], yy[order]
    if tt.size >= 2:
        # Repeated times would divide by zero; keep the first sample of each time.
        _, first = np.unique(tt, return_index=True)
        tt_u, yy_u = tt[first], yy[first]
    else:
        tt_u, yy_u = tt, yy
    dy = np.gradient(yy_u, tt_u) if tt_u.size >= 2 else np.empty(0)
    return {**_first_order(yy, "tic"), **_first_order(np.asarray(dy, np.float64), "dtic")}


# ----------------------------------------------------------------------------- pipeline
def tic_feature_vector(
    frames: ArrayLike,
    times: ArrayLike,
    lesion_mask: npt.NDArray[np.bool_],
    liver_mask: npt.NDArray[np.bool_] | None,
    dr_db: float,
    gain_db: float = 0.0,
    *,
    gamma: float = 1.0,
    ref_db: float = PHANTOM_REF_DB,
    vmax: float = 255.0,
    lesion_erode_px: int = 2,
    dt: float = 0.05,
    max_saturated: float = 0.05,
) -> dict[str, float]:
    """All TIC features of one patient.

    Linearises the cine (:func:`linearise`), averages the lesion ROI eroded by
    ``lesion_erode_px`` and the liver reference ROI (:func:`roi_curves`; the liver ROI defaults to
    :func:`liver_reference_mask`, a ring 3-9 px outside the lesion), fits both
    curves (:func:`fit_lognormal`) and collects:

    - ``lesion_<f>`` and ``liver_<f>`` for every :func:`tic_features` feature ``f``. The
      features of a fit that failed or was flagged (R^2 < 0.7) are NaN; ``<roi>_r2`` and
      ``<roi>_fit_ok`` are always reported (r2 NaN when undefined);
    - ``ratio_pe_ratio``, ``ratio_auc_ratio``, ``ratio_at_diff`` (:func:`lesion_liver_features`);
    - ``raw_tic_<stat>`` and ``raw_dtic_<stat>``: :func:`raw_tic_stats` of the lesion's linear
      TIC (no fit needed).

    Parameters
    ----------
    frames : array_like, shape (T, H, W)
        Display values of the CEUS cine (e.g. ``read_cine(...).frames``).
    times : array_like, shape (T,)
        Frame times (s).
    lesion_mask, liver_mask : ndarray of bool, shape (H, W)
        Lesion ROI and liver reference ROI (None: ring around the lesion).
    dr_db, gain_db : float
        The site's compression law (manifest columns ``dr_db``, ``gain_db``).
    gamma, ref_db, vmax : float
        Further parameters of :func:`linearise`. The manifest does not say which sites use a
        gamma law; for the phantom, site_EXT does (``gamma=PHANTOM_GAMMA``).
    lesion_erode_px : int
        Lesion ROI erosion (pixels); 2 matches the phantom's breathing shifts of up to 2 px.
        Without it, liver signal at the lesion edge inflates the fitted I0 and biases sigma.
    dt : float
        Feature grid step of :func:`tic_features`.
    max_saturated : float
        A frame in which more than this fraction of an ROI's pixels shows full white is left
        out of that ROI's curve: a clipped pixel only says "at least this bright", so
        its mean would flatten the bolus peak (gain-heavy sites saturate at the peak). The
        lognormal fit then rests on the unclipped rise and wash-out.

    Returns
    -------
    dict of str to float
        Keys in sorted order; values are floats (NaN where unavailable).
    """
    lin = linearise(frames, dr_db, gain_db, vmax, gamma=gamma, ref_db=ref_db)
    t = np.asarray(times, dtype=np.float64).ravel()
    if lin.ndim != 3 or lin.shape[0] != t.size:
        raise ValueError(f"frames {lin.shape} and times ({t.size},) do not match")
    curves = roi_curves(lin, lesion_mask, liver_mask, lesion_erode_px=lesion_erode_px)
    raw = np.asarray(frames, dtype=np.float64)
    clipped = (raw >= vmax - 0.5).astype(np.float64)
    frac = roi_curves(clipped, lesion_mask, liver_mask, lesion_erode_px=lesion_erode_px)
    for roi in ("lesion", "liver"):
        curves[roi] = np.where(frac[roi] > max_saturated, np.nan, curves[roi])
    out: dict[str, Any] = {}
    fits: dict[str, BolusFit] = {}
    for roi in ("lesion", "liver"):
        fit = fit_lognormal(t, curves[roi])
        fits[roi] = fit
        feats = tic_features(fit, dt)
        if not fit.ok:
            feats = {**_nan_features(), "r2": feats["r2"], "fit_ok": 0.0}
        out.update({f"{roi}_{k}": v for k, v in feats.items()})
    out.update({f"ratio_{k}": v for k, v in
                lesion_liver_features(fits["lesion"], fits["liver"]).items()})
    out.update({f"raw_{k}": v for k, v in raw_tic_stats(t, curves["lesion"]).items()})
    return {k: float(out[k]) for k in sorted(out)}


def tic_feature_names() -> list[str]:
    """The sorted keys of :func:`tic_feature_vector` (stable across patients)."""
    roi_keys = [*_FEATURE_NAMES, "fit_ok", "r2"]
    stats_keys = ("mean", "std", "skewness", "kurtosis", "min", "max", "p10", "p50", "p90")
    names = [f"{roi}_{k}" for roi in ("lesion", "liver") for k in roi_keys]
    names += [f"ratio_{k}" for k in ("at_diff", "auc_ratio", "pe_ratio")]
    names += [f"raw_{p}_{k}" for p in ("tic", "dtic") for k in stats_keys]
    return sorted(names)
