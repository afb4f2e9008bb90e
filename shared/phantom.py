"""Deterministic synthetic multi-site HCC cohort written as real DICOM (``hcc-fl synth``).

Per patient: a CEUS cine (Ultrasound Multi-frame), B-mode, arterial- and portal-phase stills (US),
a 4-phase DCE-MRI (one MR series per phase) and a T0/T1 follow-up ultrasound pair with liver masks.
Per site: ``manifest.csv`` with clinical variables, the labels and survival endpoints of all five
seed tasks, and acquisition parameters. The latent variables go to ``truth.csv`` at the data root,
outside every site folder: training code never reads it.

Three non-IID training sites (A, B, C) and one external site (EXT) with a distinct shift.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hcc_fl.shared.dicom_write import StudyInfo, write_mr_series, write_us_cine, write_us_image
from hcc_fl.shared.perfusion import PHANTOM_GAMMA
from hcc_fl.shared.phantom_images import (
    CeusParams,
    SiteImaging,
    dce_concentrations,
    irregular_mask,
    render_bmode,
    render_ceus,
    smooth_noise,
    spgr_signal,
)

PHANTOM_VERSION = "1"
IMAGE_SIZE = 64
MR_SLICES = 3
MR_PIXEL_MM = 1.5
MR_SLICE_MM = 3.0
MR_PHASES = ("PRE", "ART", "PV", "DEL")
CEUS_DURATION_S = 120.0
BETA_U = 2.0  # Ki-67 effect of the imaging phenotype (science.md 6.4)


@dataclass(frozen=True)
class SiteProfile:
    """One site of the phantom: imaging characteristics, population shift and size."""

    name: str
    code: str
    role: str
    imaging: SiteImaging
    n: int
    prevalence_shift: float = 0.0
    age_shift: float = 0.0
    hbv_p: float = 0.8
    afp_shift: float = 0.0
    manufacturer: str = "Phantom"


def default_sites(scale: float = 1.0) -> list[SiteProfile]:
    """The four sites of science.md 6.3 (pixel sizes doubled to fit a 64-pixel field)."""

    def n(base: int) -> int:
        return max(8, int(round(base * scale)))

    return [
        SiteProfile(
            "site_A", "A", "train",
            SiteImaging(0.0, 40.0, 0.8, 6.0, 1.0, 1.0, False, 12.0, 35.0, 800.0),
            n(40), manufacturer="SonoVendor Alpha",
        ),
        SiteProfile(
            "site_B", "B", "train",
            SiteImaging(3.0, 40.0, 1.2, 4.0, 1.0, 1.2, False, 18.0, 35.0, 780.0),
            n(30), prevalence_shift=0.5, age_shift=5.0, manufacturer="SonoVendor Beta",
        ),
        SiteProfile(
            "site_C", "C", "train",
            SiteImaging(-2.0, 45.0, 0.6, 8.0, 1.0, 0.8, False, 10.0, 30.0, 820.0),
            n(50), prevalence_shift=-0.4, hbv_p=0.95, manufacturer="SonoVendor Gamma",
        ),
        SiteProfile(
            "site_EXT", "X", "external",
            SiteImaging(6.0, 50.0, 1.8, 3.0, 0.5, 1.6, True, 22.0, 30.0, 760.0),
            n(40), prevalence_shift=0.3, hbv_p=0.25, afp_shift=0.3, manufacturer="SonoVendor Delta",
        ),
    ]


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _weibull_time(rng: np.random.Generator, lam: float, nu: float, eta: float) -> float:
    """Survival time from a Weibull-Cox model (Bender et al. 2005)."""
    u = rng.uniform(1e-12, 1.0)
    return float((-np.log(u) / (lam * np.exp(eta))) ** (1.0 / nu))


@dataclass
class Patient:
    """One phantom patient: clinical row for the manifest and latent row for truth.csv."""

    row: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, Any] = field(default_factory=dict)


def _latents(site: SiteProfile, rng: np.random.Generator, pid: str) -> Patient:
    a, e = rng.normal(), rng.normal()
    u_img = 0.8 * a + 0.6 * e
    v = rng.normal()
    h = 0.5 * a + np.sqrt(0.75) * rng.normal()
    s_liv = rng.normal()
    d_img = 0.8 * s_liv + 0.6 * rng.normal()

    age = rng.normal(55.0 + site.age_shift, 10.0)
    male = rng.uniform() < 0.85
    log_afp = rng.normal(1.5 + 0.5 * a + site.afp_shift, 1.0)
    size_cm = float(np.exp(rng.normal(1.3 + 0.2 * a, 0.35)))
    hbv = int(rng.uniform() < site.hbv_p)
    cirrhosis = int(rng.uniform() < 0.7)
    bclc = "0" if size_cm < 2 else "A" if size_cm < 5 else "B" if size_cm < 8 else "C"
    n_lesions = 1 + int(rng.poisson(0.3 + 0.4 * (a > 1.0)))
    meld = float(np.clip(rng.normal(22.0 + 3.0 * s_liv, 5.0), 6.0, 40.0))
    log_tbil = rng.normal(5.5 + 0.2 * s_liv, 0.5)
    inr = float(np.clip(rng.normal(1.6 + 0.3 * s_liv, 0.3), 0.9, 4.0))
    z_size = (np.log(size_cm) - 1.3) / 0.35
    z_afp = (log_afp - 1.5) / 1.0

    # Ki-67: latent index thresholded at 20 % (logistic noise => logistic model on lp).
    clin_lp = 0.35 * (log_afp - 1.5) + 0.15 * (size_cm - 4.0) - 0.01 * (age - 55.0)
    lp_ki67 = site.prevalence_shift - 0.6 + BETA_U * u_img + 0.6 * clin_lp
    z_ki67 = lp_ki67 + rng.logistic()
    ki67_high = int(z_ki67 > 0)
    ki67_index = 100.0 * _sigmoid(z_ki67 + np.log(0.2 / 0.8))
    lp_prolif = site.prevalence_shift - 1.2 + 1.8 * a + 1.0 * h + 0.3 * (log_afp - 1.5)
    prolif = int(rng.uniform() < _sigmoid(lp_prolif))
    lp_tace = 0.3 + 1.8 * v - 0.4 * z_size
    tace_or = int(rng.uniform() < _sigmoid(lp_tace))

    censor = 12.0 + min(rng.exponential(48.0), 48.0)  # months; >= 12 so er_1y is always known
    eta_rfs = 0.9 * a + 0.4 * ki67_high + 0.3 * z_size + 0.3 * z_afp
    eta_pfs = 0.8 * a + 0.5 * ki67_high + 0.2 * z_size
    eta_ihr = 0.85 * a + 0.45 * ki67_high + 0.2 * z_afp
    t_rfs = _weibull_time(rng, 0.010, 1.2, eta_rfs)
    t_pfs = _weibull_time(rng, 0.014, 1.2, eta_pfs)
    t_ihr = _weibull_time(rng, 0.008, 1.2, eta_ihr)
    # HBV-ACLF 30-day mortality (days), censoring min(Exp(200), 90).
    eta_death = 0.8 * d_img + 0.06 * (meld - 22.0) + 0.02 * (age - 55.0) + 0.4 * (log_tbil - 5.5)
    t_death = _weibull_time(rng, 0.004, 1.2, eta_death)
    c_death = min(rng.exponential(200.0), 90.0)

    def surv(t: float, c: float) -> tuple[float, int]:
        return (round(min(t, c), 3), int(t <= c))

    rfs_time, rfs_event = surv(t_rfs, censor)
    pfs_time, pfs_event = surv(t_pfs, censor)
    ihr_time, ihr_event = surv(t_ihr, censor)
    os_time, os_event = surv(t_death, c_death)

    row: dict[str, Any] = {
        "patient_id": pid,
        "site": site.name,
        "age": round(float(age), 1),
        "sex": "M" if male else "F",
        "afp": round(float(10**log_afp), 2),
        "tumor_size_cm": round(size_cm, 2),
        "hbv": hbv,
        "cirrhosis": cirrhosis,
        "bclc": bclc,
        "n_lesions": n_lesions,
        "meld": round(meld, 1),
        "tbil": round(float(np.exp(log_tbil)) / 17.1, 2),  # umol/L -> mg/dL
        "inr": round(inr, 2),
        "ki67_index": round(float(ki67_index), 2),
        "ki67_high": ki67_high,
        "prolif": prolif,
        "tace_or": tace_or,
        "er_1y": int(rfs_event == 1 and rfs_time <= 12.0),
        "rfs_time": rfs_time,
        "rfs_event": rfs_event,
        "pfs_time": pfs_time,
        "pfs_event": pfs_event,
        "ihr_time": ihr_time,
        "ihr_event": ihr_event,
        "death_30d": int(os_event == 1 and os_time <= 30.0),
        "os_time": os_time,
        "os_event": os_event,
        "fps": site.imaging.fps,
        "dr_db": site.imaging.dr_db,
        "gain_db": site.imaging.gain_db,
        "gamma": PHANTOM_GAMMA if site.imaging.gamma_law else 1.0,
    }
    truth = {
        "patient_id": pid,
        "site": site.name,
        "a": a, "e": e, "u_img": u_img, "v": v, "h": h, "s_liv": s_liv, "d_img": d_img,
        "lp_ki67": lp_ki67, "lp_prolif": lp_prolif, "lp_tace": lp_tace,
        "eta_rfs": eta_rfs, "eta_pfs": eta_pfs, "eta_ihr": eta_ihr, "eta_death": eta_death,
    }
    return Patient(row, truth)


def _render_patient(
    site: SiteProfile, p: Patient, rng: np.random.Generator, site_dir: Path, seed: int
) -> None:
    """Render and write all images of one patient; fills the path columns of ``p.row``."""
    t = p.truth
    im = site.imaging
    pid = p.row["patient_id"]
    rel = Path("patients") / pid
    pdir = site_dir / rel
    info = StudyInfo(pid, site.name, site.manufacturer, seed)
    size = IMAGE_SIZE

    # ---- lesion geometry (shared by CEUS and B-mode)
    radius = float(np.clip(p.row["tumor_size_cm"] * 10.0 / 2.0 / im.pixel_mm, 5.0, 22.0))
    cx, cy = size / 2 + rng.uniform(-5, 5), size / 2 + rng.uniform(-5, 5)
    irregularity = 0.04 + 0.10 * _sigmoid(2.0 * t["a"])
    lesion = irregular_mask(size, cx, cy, radius, irregularity, rng)
    core_r = radius * 0.55 * _sigmoid(2.0 * (t["h"] - 0.5))
    core = irregular_mask(size, cx, cy, core_r, 0.05, rng) & lesion
    texture = (1.0 + 0.25 * (1.0 + max(t["h"], 0.0)) * smooth_noise((size, size), 1.5, rng))

    # ---- CEUS cine at the site's frame rate over 0-120 s
    times = np.arange(0.0, CEUS_DURATION_S + 1e-6, 1.0 / im.fps, dtype=np.float32)
    params = CeusParams(
        t0=float(rng.uniform(8.0, 14.0)),
        mu=float(np.log(12.0) - 0.18 * t["u_img"]),
        sigma=float(0.55 + 0.08 * t["u_img"]),
        amplitude=float(700.0 * np.exp(0.25 * t["u_img"] + 0.2 * t["v"] + rng.normal(0, 0.1))),
        liver_mu=float(np.log(25.0)),
        liver_amplitude=float(700.0 * np.exp(rng.normal(0, 0.1))),
    )
    cine = render_ceus(times, lesion, core, texture, params, im, rng)
    write_us_cine(pdir / "ceus_cine.dcm", info, cine, im.fps, im.pixel_mm)
    ys, xs = np.nonzero(lesion)
    margin = 4
    roi = (
        max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin),
        min(size, int(xs.max()) + 1 + margin), min(size, int(ys.max()) + 1 + margin),
    )
    cv2.imwrite(str(pdir / "ceus_lesion_mask.png"), lesion.astype(np.uint8) * 255)
    for name, sec in (("ceus_ap", 25.0), ("ceus_pp", 60.0)):
        frame = cine[int(np.argmin(np.abs(times - sec)))]
        write_us_image(pdir / f"{name}.dcm", info, frame, im.pixel_mm, name.upper())

    # ---- B-mode: hypo- or hyperechoic lesion, texture from a and h
    lesion_echo = float(np.exp(0.35 * t["h"] - 0.25 * t["a"] - 0.2))
    bmode = render_bmode(lesion, lesion_echo, 0.2 + 0.15 * abs(t["h"]), im, rng)
    write_us_image(pdir / "bmode.dcm", info, bmode, im.pixel_mm, "BMODE")

    # ---- DCE-MRI: 4 phases x MR_SLICES slices, extended Tofts + SPGR + Rician noise
    phase_times = [0.0, im.mr_art_time, 70.0, 180.0]
    prolif_like = _sigmoid(1.5 * t["a"] + 0.8 * t["h"])
    conc = dce_concentrations(
        phase_times,
        ktrans=float(0.8 * np.exp(0.3 * t["u_img"])),
        ve=0.2,
        vp=float(np.clip(0.1 + 0.03 * t["v"], 0.02, 0.25)),
        rim_ktrans=float(0.8 * np.exp(0.3 * t["u_img"]) * (1.0 + prolif_like)),
        core_ktrans=0.05,
    )
    mr_radius = float(np.clip(p.row["tumor_size_cm"] * 10.0 / 2.0 / MR_PIXEL_MM, 4.0, 20.0))
    mcx, mcy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    mr_masks = []
    for k in range(MR_SLICES):
        scale = 1.0 if k == MR_SLICES // 2 else 0.8
        mr_masks.append(irregular_mask(size, mcx, mcy, mr_radius * scale, irregularity, rng))
    yy, xx = np.mgrid[0:size, 0:size]
    rdist = np.hypot(yy - mcy, xx - mcx) / mr_radius
    mr_core = rdist < 0.5 * prolif_like
    mr_rim = (rdist > 0.7) & (rdist <= 1.05)
    for j, phase in enumerate(MR_PHASES):
        vol = np.empty((MR_SLICES, size, size), dtype=np.uint16)
        shift = rng.integers(-1, 2, size=2)
        for k in range(MR_SLICES):
            c = np.full((size, size), conc["liver"][j], dtype=np.float32)
            t10 = np.full((size, size), im.t10_liver_ms, dtype=np.float32)
            m = mr_masks[k]
            c[m] = conc["lesion"][j]
            c[m & mr_rim] = conc["rim"][j] * prolif_like + conc["lesion"][j] * (1 - prolif_like)
            c[m & mr_core] = conc["core"][j]
            t10[m] = 1100.0
            sig = 20000.0 * spgr_signal(c, t10)
            sig *= 1.0 + 0.05 * smooth_noise((size, size), 4.0, rng)
            n1 = rng.normal(0, im.mr_noise, size=sig.shape)
            n2 = rng.normal(0, im.mr_noise, size=sig.shape)
            mag = np.sqrt((sig + n1) ** 2 + n2**2)
            mag = np.roll(mag, tuple(int(s) for s in shift), axis=(0, 1))
            vol[k] = np.clip(np.round(mag), 0, 65535).astype(np.uint16)
        write_mr_series(
            pdir / "mr" / phase, info, vol, phase, j + 1, phase_times[j], MR_PIXEL_MM, MR_SLICE_MM
        )
    cv2.imwrite(str(pdir / "mr_lesion_mask.png"), mr_masks[MR_SLICES // 2].astype(np.uint8) * 255)

    # ---- Longitudinal US (T0, T1 = day 5): liver shrinkage, coarser texture, ascites
    lcx, lcy = size / 2 + rng.uniform(-3, 3), size / 2 + 2 + rng.uniform(-3, 3)
    liver_r = 22.0 + rng.uniform(-2, 2)
    base_rng_state = rng.integers(0, 2**31)
    liver0 = irregular_mask(size, lcx, lcy, liver_r, 0.08, np.random.default_rng(base_rng_state))
    shrink = float(np.clip(0.05 + 0.05 * t["d_img"], 0.0, 0.2))
    liver1 = irregular_mask(
        size, lcx, lcy, liver_r * np.sqrt(1.0 - shrink), 0.08,
        np.random.default_rng(base_rng_state),
    )
    ascites_w = max(0.0, 2.5 * t["d_img"])
    outer = irregular_mask(size, lcx, lcy, liver_r * np.sqrt(1 - shrink) + ascites_w, 0.08,
                           np.random.default_rng(base_rng_state))
    ascites = outer & ~liver1 & (yy > lcy)
    no_lesion = np.zeros((size, size), dtype=bool)
    us0 = render_bmode(no_lesion, 1.0, 0.0, im, rng, liver_mask=liver0)
    us1 = render_bmode(
        no_lesion, 1.0, 0.0, im, rng, liver_mask=liver1, ascites=ascites,
        coarseness=1.0 + 0.25 * max(t["d_img"], 0.0),
    )
    write_us_image(pdir / "us_t0.dcm", info, us0, im.pixel_mm, "US_T0")
    write_us_image(pdir / "us_t1.dcm", info, us1, im.pixel_mm, "US_T1")
    cv2.imwrite(str(pdir / "liver_mask_t0.png"), liver0.astype(np.uint8) * 255)
    cv2.imwrite(str(pdir / "liver_mask_t1.png"), liver1.astype(np.uint8) * 255)

    p.row.update(
        {
            "ceus_cine": str(rel / "ceus_cine.dcm"),
            "ceus_roi_x0": roi[0], "ceus_roi_y0": roi[1],
            "ceus_roi_x1": roi[2], "ceus_roi_y1": roi[3],
            "ceus_lesion_mask": str(rel / "ceus_lesion_mask.png"),
            "bmode": str(rel / "bmode.dcm"),
            "ceus_ap": str(rel / "ceus_ap.dcm"),
            "ceus_pp": str(rel / "ceus_pp.dcm"),
            **{f"mr_{ph.lower()}_dir": str(rel / "mr" / ph) for ph in MR_PHASES},
            "mr_lesion_mask": str(rel / "mr_lesion_mask.png"),
            "us_t0": str(rel / "us_t0.dcm"),
            "us_t1": str(rel / "us_t1.dcm"),
            "liver_mask_t0": str(rel / "liver_mask_t0.png"),
            "liver_mask_t1": str(rel / "liver_mask_t1.png"),
        }
    )
    p.truth.update(
        {"tic_t0": params.t0, "tic_mu": params.mu, "tic_sigma": params.sigma,
         "tic_amplitude": params.amplitude, "liver_shrink": shrink}
    )


MANIFEST_COLUMNS = [
    "patient_id", "site", "split",
    "ceus_cine", "ceus_roi_x0", "ceus_roi_y0", "ceus_roi_x1", "ceus_roi_y1", "ceus_lesion_mask",
    "bmode", "ceus_ap", "ceus_pp",
    "mr_pre_dir", "mr_art_dir", "mr_pv_dir", "mr_del_dir", "mr_lesion_mask",
    "us_t0", "us_t1", "liver_mask_t0", "liver_mask_t1",
    "age", "sex", "afp", "tumor_size_cm", "hbv", "cirrhosis", "bclc", "n_lesions",
    "meld", "tbil", "inr",
    "ki67_index", "ki67_high", "prolif", "tace_or", "er_1y",
    "rfs_time", "rfs_event", "pfs_time", "pfs_event", "ihr_time", "ihr_event",
    "death_30d", "os_time", "os_event",
    "fps", "dr_db", "gain_db", "gamma",
]


def _write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def generate(
    out: Path,
    seed: int = 0,
    scale: float = 1.0,
    sites: list[SiteProfile] | None = None,
    val_fraction: float = 0.2,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate the phantom cohort under ``out``.

    Parameters
    ----------
    out : Path
        Data root. Written: ``<site>/manifest.csv``, ``<site>/patients/...``, ``truth.csv`` and
        ``manifest_index.json`` (sites, roles, manifest paths, seed).
    seed : int
        Global seed; patient ``i`` of site ``s`` draws from ``default_rng([seed, s, i])``.
    scale : float
        Multiplies every site's cohort size (science.md 6.3 sizes at 1.0).
    sites : list of SiteProfile, optional
        Defaults to :func:`default_sites`.
    val_fraction : float
        Fraction of each training site's patients put in the ``val`` split.
    progress : callable, optional
        Called with 1 after each patient (for a progress bar).

    Returns
    -------
    dict
        The manifest index that was written.
    """
    sites = sites or default_sites(scale)
    out.mkdir(parents=True, exist_ok=True)
    truth_rows: list[dict[str, Any]] = []
    index: dict[str, Any] = {"phantom_version": PHANTOM_VERSION, "seed": seed, "scale": scale,
                             "sites": {}}
    for s_idx, site in enumerate(sites):
        site_dir = out / site.name
        rng_split = np.random.default_rng([seed, s_idx, 10**6])
        n_val = int(round(site.n * val_fraction)) if site.role == "train" else 0
        val_idx = set(rng_split.choice(site.n, size=n_val, replace=False).tolist())
        rows = []
        for i in range(site.n):
            rng = np.random.default_rng([seed, s_idx, i])
            pid = f"{site.code}{i + 1:04d}"
            patient = _latents(site, rng, pid)
            patient.row["split"] = (
                "test" if site.role == "external" else ("val" if i in val_idx else "train")
            )
            _render_patient(site, patient, rng, site_dir, seed)
            rows.append(patient.row)
            truth_rows.append(patient.truth)
            if progress:
                progress(1)
        _write_csv(site_dir / "manifest.csv", rows, MANIFEST_COLUMNS)
        index["sites"][site.name] = {
            "role": site.role, "manifest": f"{site.name}/manifest.csv", "n": site.n,
        }
    _write_csv(out / "truth.csv", truth_rows, list(truth_rows[0].keys()))
    (out / "manifest_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
