"""Image physics of the synthetic phantom: CEUS cines, B-mode, DCE-MRI and follow-up US.

Everything is generated in numpy from the latent variables of one patient; nothing is copied from
real patients. The models follow ``docs/phantom.md`` (lognormal bolus kinetics, multiplicative
speckle with a site-specific point-spread function and log compression, extended Tofts with a
Parker population AIF, liver shrinkage and ascites on follow-up ultrasound).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SiteImaging:
    """Acquisition characteristics of one site (the non-IID part of the phantom)."""

    gain_db: float
    dr_db: float
    psf_sigma: float
    speckle_k: float
    fps: float
    pixel_mm: float
    gamma_law: bool
    mr_noise: float
    mr_art_time: float
    t10_liver_ms: float


# ----------------------------------------------------------------------------- shapes
def irregular_mask(
    size: int, cx: float, cy: float, radius: float, irregularity: float, rng: np.random.Generator
) -> npt.NDArray[np.bool_]:
    """Star-shaped mask: radius modulated by a few random harmonics (irregular margin)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    r = np.full_like(theta, radius)
    for k in (2, 3, 5):
        r += radius * irregularity * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.asarray(dist <= r)


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> F32:
    """Zero-mean, unit-variance spatially smooth Gaussian field."""
    field = rng.normal(size=shape).astype(np.float32)
    field = np.asarray(cv2.GaussianBlur(field, (0, 0), sigma), dtype=np.float32)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


# ----------------------------------------------------------------------------- ultrasound
def log_compress(intensity: F32, site: SiteImaging, ref_db: float = 20.0) -> U8:
    """Map linear power to 8-bit grey levels over the site's dynamic range (and gain)."""
    db = 10.0 * np.log10(np.maximum(intensity, 1e-6)) + site.gain_db
    grey = (db - (ref_db - site.dr_db)) / site.dr_db
    grey = np.clip(grey, 0.0, 1.0)
    if site.gamma_law:
        grey = grey**0.8
    return np.asarray(np.round(grey * 255.0), dtype=np.uint8)


def speckle(shape: tuple[int, ...], site: SiteImaging, rng: np.random.Generator) -> F32:
    """Multiplicative speckle: gamma(k, 1/k) noise blurred by the site's PSF, mean one."""
    noise = rng.gamma(site.speckle_k, 1.0 / site.speckle_k, size=shape).astype(np.float32)
    if noise.ndim == 2:
        noise = np.asarray(cv2.GaussianBlur(noise, (0, 0), site.psf_sigma), dtype=np.float32)
    else:
        for i in range(noise.shape[0]):
            noise[i] = cv2.GaussianBlur(noise[i], (0, 0), site.psf_sigma)
    return (noise / noise.mean()).astype(np.float32)


def lognormal_tic(t: F32, t0: float, mu: float, sigma: float, amplitude: float) -> F32:
    """Lognormal bolus curve (linear power); zero before the arrival time ``t0``."""
    out = np.zeros_like(t)
    dt = t - t0
    pos = dt > 1e-6
    out[pos] = (
        amplitude
        / (np.sqrt(2 * np.pi) * sigma * dt[pos])
        * np.exp(-((np.log(dt[pos]) - mu) ** 2) / (2 * sigma**2))
    )
    return out


@dataclass(frozen=True)
class CeusParams:
    """Lesion and liver bolus kinetics of one patient."""

    t0: float
    mu: float
    sigma: float
    amplitude: float
    liver_mu: float
    liver_amplitude: float


def render_ceus(
    times: F32,
    lesion: npt.NDArray[np.bool_],
    core: npt.NDArray[np.bool_],
    texture: F32,
    params: CeusParams,
    site: SiteImaging,
    rng: np.random.Generator,
    breathing_px: int = 2,
) -> U8:
    """Render a contrast-mode cine (T, H, W) uint8.

    Linear power is ``floor + liver TIC`` outside the lesion and ``lesion TIC x texture`` inside
    (a non-enhancing necrotic ``core`` keeps 15 %), times multiplicative speckle, shifted by a
    random respiratory translation of up to ``breathing_px`` pixels, then log compressed.
    """
    size = lesion.shape[0]
    pad = breathing_px
    lesion_tic = lognormal_tic(times, params.t0, params.mu, params.sigma, params.amplitude)
    liver_tic = lognormal_tic(
        times, params.t0 + 6.0, params.liver_mu, 0.6, params.liver_amplitude
    )
    lesion_w = lesion.astype(np.float32) * np.clip(texture, 0.2, None)
    lesion_w[core] *= 0.15
    liver_w = (~lesion).astype(np.float32) * np.clip(1.0 + 0.15 * texture, 0.3, None)
    power = (
        0.02
        + liver_tic[:, None, None] * liver_w[None]
        + lesion_tic[:, None, None] * lesion_w[None]
    ).astype(np.float32)
    power = np.pad(power, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    power *= speckle(power.shape, site, rng)
    out = np.empty((len(times), size, size), dtype=np.float32)
    for i in range(len(times)):
        dy, dx = rng.integers(-breathing_px, breathing_px + 1, size=2)
        out[i] = power[i, pad + dy : pad + dy + size, pad + dx : pad + dx + size]
    return log_compress(out, site)


def render_bmode(
    lesion: npt.NDArray[np.bool_],
    lesion_echo: float,
    texture_strength: float,
    site: SiteImaging,
    rng: np.random.Generator,
    liver_mask: npt.NDArray[np.bool_] | None = None,
    ascites: npt.NDArray[np.bool_] | None = None,
    coarseness: float = 1.0,
) -> U8:
    """Render a B-mode still: speckle on an echogenicity map, depth attenuation with partial TGC."""
    size = lesion.shape[0]
    echo = np.full((size, size), 1.0, dtype=np.float32)
    echo *= np.exp(0.25 * smooth_noise((size, size), 3.0 * coarseness, rng))
    if liver_mask is not None:
        echo[~liver_mask] = 0.35
    echo[lesion] = lesion_echo * np.exp(
        texture_strength * smooth_noise((size, size), 1.5, rng)[lesion]
    )
    if ascites is not None:
        echo[ascites] = 0.01
    depth = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    attenuation = np.exp(-1.2 * depth) * (1.0 + 0.8 * depth)  # attenuation, partly TGC-corrected
    field = rng.normal(size=(2, size, size)).astype(np.float32)
    sigma = site.psf_sigma * coarseness
    re = cv2.GaussianBlur(field[0], (0, 0), sigma)
    im = cv2.GaussianBlur(field[1], (0, 0), sigma)
    envelope = (re**2 + im**2).astype(np.float32)
    envelope /= envelope.mean()
    power = 30.0 * echo * attenuation * envelope
    return log_compress(power.astype(np.float32), site)


# ----------------------------------------------------------------------------- DCE-MRI
def parker_aif(t_s: F32) -> F32:
    """Parker et al. (2006) population arterial input function, plasma mM (Hct 0.42)."""
    t = t_s / 60.0
    a1, a2, t1, t2, s1, s2 = 0.809, 0.330, 0.17046, 0.365, 0.0563, 0.132
    alpha, beta, s, tau = 1.050, 0.1685, 38.078, 0.483
    cb = (
        a1 / (s1 * np.sqrt(2 * np.pi)) * np.exp(-((t - t1) ** 2) / (2 * s1**2))
        + a2 / (s2 * np.sqrt(2 * np.pi)) * np.exp(-((t - t2) ** 2) / (2 * s2**2))
        + alpha * np.exp(-beta * t) / (1 + np.exp(-s * (t - tau)))
    )
    return (cb / (1.0 - 0.42)).astype(np.float32)


def tofts(t_s: F32, cp: F32, ktrans_min: float, ve: float, vp: float) -> F32:
    """Extended Tofts tissue concentration on a uniform grid ``t_s`` (seconds)."""
    dt = float(t_s[1] - t_s[0]) / 60.0
    kep = ktrans_min / max(ve, 1e-3)
    kernel = np.exp(-kep * (t_s / 60.0)).astype(np.float32)
    conv = np.convolve(cp, kernel)[: len(t_s)] * dt
    return (vp * cp + ktrans_min * conv).astype(np.float32)


def spgr_signal(
    conc: F32, t10_ms: float | F32, flip_deg: float = 12.0, tr_ms: float = 4.0
) -> F32:
    """Spoiled gradient echo signal for a concentration map (r1 = 4 /mM/s, T10 scalar or map)."""
    r1 = 1000.0 / t10_ms + 4.0 * conc
    e1 = np.exp(-(tr_ms / 1000.0) * r1)
    fa = np.deg2rad(flip_deg)
    return (np.sin(fa) * (1 - e1) / (1 - np.cos(fa) * e1)).astype(np.float32)


def dce_concentrations(
    phase_times: list[float],
    ktrans: float,
    ve: float,
    vp: float,
    rim_ktrans: float,
    core_ktrans: float,
) -> dict[str, npt.NDArray[np.float32]]:
    """Concentration (mM) at each phase time for liver, lesion, lesion rim and necrotic core."""
    t = np.arange(0.0, 200.0, 0.5, dtype=np.float32)
    cp = parker_aif(t - 10.0)  # bolus arrives ~10 s after injection
    cp[t < 10.0] = 0.0
    # Portal supply: AIF delayed by 10 s and dispersed (exponential kernel, tau 15 s).
    disp = np.exp(-np.arange(0, 120, 0.5) / 15.0).astype(np.float32)
    disp /= disp.sum()
    portal = np.convolve(np.roll(cp, 20), disp)[: len(t)]
    liver_in = (0.25 * cp + 0.75 * portal).astype(np.float32)
    curves = {
        "liver": tofts(t, liver_in, 0.6, 0.25, 0.12),
        "lesion": tofts(t, cp, ktrans, ve, vp),
        "rim": tofts(t, cp, rim_ktrans, ve, vp * 1.3),
        "core": tofts(t, cp, core_ktrans, 0.4, 0.01),
    }
    idx = [int(round(pt / 0.5)) for pt in phase_times]
    return {k: np.asarray(v[idx], dtype=np.float32) for k, v in curves.items()}
