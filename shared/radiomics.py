"""2-D radiomics features (first order, GLCM, GLRLM) with pyradiomics' conventions.

A numpy + scikit-image re-implementation of the pyradiomics 3.0.1 feature classes ``firstorder``,
``glcm`` and ``glrlm`` for one 2-D region of interest (ROI), so that pyradiomics (which does not
install cleanly on Python 3.11) is never a runtime dependency. Every feature is checked against
golden values computed by pyradiomics 3.0.1 (``tests/fixtures/radiomics``).

Conventions reproduced (pyradiomics defaults):

* **Discretisation** (:func:`discretise`). With a fixed bin width ``W`` (default 25) the bin edges
  are ``arange(min - (min mod W), max + 2 W, W)``, i.e. equally spaced from zero, and grey values
  are assigned with ``numpy.digitize`` (half-open bins ``[lo, hi)``, so a maximum that is a
  multiple of ``W`` opens a bin of its own). The lowest bin present is always level 1. With a
  fixed bin count ``N`` the edges are ``numpy.histogram``'s ``N + 1`` equal-width edges with the
  last one raised by 1, so the maximum lands in bin ``N``; a flat ROI then lands in the MIDDLE bin
  (``N // 2 + 1``) because numpy widens a zero range to ``[v - 0.5, v + 0.5]``.
* **Texture matrices** use the 4 in-plane directions at distance 1 (0, 45, 90, 135 degrees), only
  pairs / runs whose pixels are all inside the ROI, a symmetric GLCM, and no distance weighting.
  Each feature is computed per direction and averaged over the directions; directions without any
  pair (for example horizontal and vertical on a one-pixel-wide diagonal ROI) are dropped first.
  For the GLRLM pyradiomics also drops a direction in which no image line holds two or more ROI
  pixels (there every run would have length 1), so a one-pixel-wide diagonal ROI has a GLRLM in
  the diagonal direction only.
  Grey levels absent from the ROI are removed, but features use the actual level values
  ``i, j`` and ``Ng`` is the highest level in the ROI (this matters for ``Idmn`` and ``Idn``).
* **First order** uses the raw (undiscretised) intensities, except ``Entropy`` and
  ``Uniformity``, which use the histogram of discretised levels. ``voxel_array_shift`` (default 0)
  is added before ``Energy``, ``TotalEnergy`` and ``RootMeanSquared``; ``TotalEnergy`` is
  ``Energy`` times the pixel area. ``Kurtosis`` is the plain fourth standardised moment (not
  excess kurtosis); ``Skewness`` and ``Kurtosis`` are 0 for a flat ROI.
* Entropies use ``log2(p + eps)`` with ``eps = numpy.spacing(1)``, so a certain event gives about
  ``-3.2e-16`` rather than exactly 0, as in pyradiomics.

This matches pyradiomics run on a single-slice volume ``(1, H, W)`` with ``force2D=True``, or on a
2-D image with ``force2D=False``. (A 2-D SimpleITK image with ``force2D=True`` makes pyradiomics
drop numpy axis 0 and use only the horizontal direction; that is not what this module computes.)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from skimage.feature import graycomatrix

__all__ = [
    "FIRST_ORDER_FEATURES",
    "GLCM_FEATURES",
    "GLRLM_FEATURES",
    "discretise",
    "first_order",
    "glcm_features",
    "glcm_matrix",
    "glrlm_features",
    "glrlm_matrix",
    "radiomics_features",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

EPS: float = float(np.spacing(1))

FIRST_ORDER_FEATURES: tuple[str, ...] = (
    "10Percentile",
    "90Percentile",
    "Energy",
    "Entropy",
    "InterquartileRange",
    "Kurtosis",
    "Maximum",
    "Mean",
    "MeanAbsoluteDeviation",
    "Median",
    "Minimum",
    "Range",
    "RobustMeanAbsoluteDeviation",
    "RootMeanSquared",
    "Skewness",
    "TotalEnergy",
    "Uniformity",
    "Variance",
)

GLCM_FEATURES: tuple[str, ...] = (
    "Autocorrelation",
    "ClusterProminence",
    "ClusterShade",
    "ClusterTendency",
    "Contrast",
    "Correlation",
    "DifferenceAverage",
    "DifferenceEntropy",
    "DifferenceVariance",
    "Id",
    "Idm",
    "Idmn",
    "Idn",
    "Imc1",
    "Imc2",
    "InverseVariance",
    "JointAverage",
    "JointEnergy",
    "JointEntropy",
    "MCC",
    "MaximumProbability",
    "SumAverage",
    "SumEntropy",
    "SumSquares",
)

GLRLM_FEATURES: tuple[str, ...] = (
    "GrayLevelNonUniformity",
    "GrayLevelNonUniformityNormalized",
    "GrayLevelVariance",
    "HighGrayLevelRunEmphasis",
    "LongRunEmphasis",
    "LongRunHighGrayLevelEmphasis",
    "LongRunLowGrayLevelEmphasis",
    "LowGrayLevelRunEmphasis",
    "RunEntropy",
    "RunLengthNonUniformity",
    "RunLengthNonUniformityNormalized",
    "RunPercentage",
    "RunVariance",
    "ShortRunEmphasis",
    "ShortRunHighGrayLevelEmphasis",
    "ShortRunLowGrayLevelEmphasis",
)

# skimage angle convention: 0 -> right neighbour, pi/4 -> up-right, pi/2 -> up, 3pi/4 -> up-left.
_GLCM_ANGLES: tuple[float, ...] = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


# ----------------------------------------------------------------------------- input checks
def _check_inputs(image: npt.ArrayLike, mask: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    """Return ``(image as float64, mask as bool)`` or raise ``ValueError``."""
    img = np.asarray(image)
    msk = np.asarray(mask)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {img.shape}")
    if msk.shape != img.shape:
        raise ValueError(f"mask shape {msk.shape} does not match image shape {img.shape}")
    if not (np.issubdtype(img.dtype, np.number) and not np.iscomplexobj(img)):
        raise ValueError(f"image must be real-valued, got dtype {img.dtype}")
    roi = msk.astype(bool)
    if not roi.any():
        raise ValueError("mask is empty: the ROI contains no pixel")
    values = img.astype(np.float64)
    if not np.all(np.isfinite(values[roi])):
        raise ValueError("image has non-finite values (NaN or inf) inside the ROI")
    return values, roi


def _bin_edges(values: FloatArray, bin_width: float, bin_count: int | None) -> FloatArray:
    """pyradiomics' bin edges for the ROI grey values (see :func:`discretise`)."""
    if bin_count is not None:
        if int(bin_count) != bin_count or bin_count < 1:
            raise ValueError(f"bin_count must be a positive integer, got {bin_count!r}")
        edges = np.histogram_bin_edges(values, bins=int(bin_count)).astype(np.float64)
        edges[-1] += 1.0  # the maximum must fall inside the top bin under numpy.digitize
        return edges
    if not (np.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f"bin_width must be a positive number, got {bin_width!r}")
    lowest = float(values.min())
    highest = float(values.max())
    low_edge = lowest - float(np.remainder(lowest, bin_width))  # multiple of W at or below min
    edges = np.arange(low_edge, highest + 2.0 * bin_width, bin_width, dtype=np.float64)
    if edges.size == 1:  # defensive: keep at least one bin
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def discretise(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    bin_width: float = 25.0,
    bin_count: int | None = None,
) -> IntArray:
    """Discretise the grey values inside the ROI exactly as pyradiomics does.

    Args:
        image: 2-D array of intensities.
        mask: 2-D array of the same shape; non-zero (``True``) pixels form the ROI.
        bin_width: fixed bin width ``W`` (pyradiomics ``binWidth``, default 25). Bins are equally
            spaced from zero and half-open, ``[kW, (k+1)W)``; level 1 is the bin holding the ROI
            minimum, i.e. ``level = floor(x / W) - floor(min / W) + 1`` (computed with
            ``numpy.arange`` edges and ``numpy.digitize``, as pyradiomics does).
        bin_count: fixed number of bins (pyradiomics ``binCount``); overrides ``bin_width`` when
            given. Levels are ``floor(N (x - min) / (max - min)) + 1`` and ``N`` for the maximum.

    Returns:
        Integer array of the image's shape: grey levels ``1..Ng`` inside the ROI and 0 outside.

    Raises:
        ValueError: empty mask, shape mismatch, non-2-D input, non-finite ROI values, or an
            invalid ``bin_width`` / ``bin_count``.
    """
    values, roi = _check_inputs(image, mask)
    roi_values = values[roi]
    edges = _bin_edges(roi_values, bin_width, bin_count)
    levels = np.zeros(values.shape, dtype=np.int64)
    levels[roi] = np.digitize(roi_values, edges)
    return levels


# ----------------------------------------------------------------------------- first order
def first_order(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    bin_width: float = 25.0,
    bin_count: int | None = None,
    voxel_array_shift: float = 0.0,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
) -> dict[str, float]:
    """pyradiomics ``firstorder`` features of the ROI (names as in pyradiomics, unprefixed).

    ``Entropy`` and ``Uniformity`` use the discretised levels (``bin_width`` / ``bin_count``); all
    other features use the raw intensities. ``voxel_array_shift`` is pyradiomics'
    ``voxelArrayShift`` (added before Energy, TotalEnergy and RootMeanSquared); ``pixel_spacing``
    (row, column) only scales ``TotalEnergy`` by the pixel area. ``RobustMeanAbsoluteDeviation``
    is NaN when no value lies within the closed 10th-90th percentile range (a 2-pixel ROI), as in
    pyradiomics.

    Raises:
        ValueError: see :func:`discretise`.
    """
    values, roi = _check_inputs(image, mask)
    x = values[roi]
    levels = discretise(values, roi, bin_width=bin_width, bin_count=bin_count)[roi]
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()

    mean = float(np.mean(x))
    dev = x - mean
    m2 = float(np.mean(dev**2))
    m3 = float(np.mean(dev**3))
    m4 = float(np.mean(dev**4))
    p10, p25, p50, p75, p90 = (float(v) for v in np.percentile(x, [10, 25, 50, 75, 90]))
    robust = x[(x >= p10) & (x <= p90)]
    shifted = x + voxel_array_shift
    energy = float(np.sum(shifted**2))
    std = float(np.std(x))

    return {
        "10Percentile": p10,
        "90Percentile": p90,
        "Energy": energy,
        "Entropy": float(-np.sum(p * np.log2(p + EPS))),
        "InterquartileRange": p75 - p25,
        "Kurtosis": 0.0 if m2 == 0 else m4 / m2**2,
        "Maximum": float(np.max(x)),
        "Mean": mean,
        "MeanAbsoluteDeviation": float(np.mean(np.abs(dev))),
        "Median": p50,
        "Minimum": float(np.min(x)),
        "Range": float(np.max(x) - np.min(x)),
        "RobustMeanAbsoluteDeviation": (
            float(np.mean(np.abs(robust - np.mean(robust)))) if robust.size else float("nan")
        ),
        "RootMeanSquared": float(np.sqrt(energy / x.size)),
        "Skewness": 0.0 if m2 == 0 else m3 / m2**1.5,
        "TotalEnergy": energy * float(pixel_spacing[0]) * float(pixel_spacing[1]),
        "Uniformity": float(np.sum(p**2)),
        "Variance": std**2,
    }


# ----------------------------------------------------------------------------- GLCM
def glcm_matrix(levels: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Normalised symmetric GLCMs of a discretised ROI, one per non-empty direction.

    Args:
        levels: output of :func:`discretise` (levels ``>= 1`` in the ROI, 0 outside).

    Returns:
        ``(P, grey)``: ``P`` has shape ``(n, n, n_directions)`` over the ``n`` grey levels present
        in the ROI, each direction summing to 1 (directions without any in-ROI pair are dropped;
        ``n_directions`` may be 0); ``grey`` holds the actual level values (float).
    """
    lv = np.asarray(levels, dtype=np.int64)
    grey = np.unique(lv[lv > 0])
    # Rank-encode the present levels as 1..n (0 stays "outside") so the matrix is n+1 square.
    ranks = np.searchsorted(grey, lv) + 1
    ranks[lv <= 0] = 0
    n = grey.size
    counts = graycomatrix(
        ranks.astype(np.uint32 if n >= 65535 else np.uint16),
        distances=[1],
        angles=list(_GLCM_ANGLES),
        levels=n + 1,
        symmetric=True,
        normed=False,
    )
    mat = counts[1:, 1:, 0, :].astype(np.float64)  # drop pairs touching the outside (level 0)
    totals = mat.sum(axis=(0, 1))
    keep = totals > 0
    return mat[:, :, keep] / totals[keep], grey.astype(np.float64)


def _nan_mean(per_direction: FloatArray) -> float:
    finite = per_direction[~np.isnan(per_direction)]
    return float(np.mean(finite)) if finite.size else float("nan")


def _glcm_mcc(p: FloatArray, px: FloatArray, py: FloatArray) -> float:
    """Maximal correlation coefficient: sqrt of the second-largest eigenvalue of Q, per direction.

    ``Q(i, j) = sum_k p(i, k) p(j, k) / (px(i) py(k) + eps)``; 1 when fewer than 2 grey levels.
    """
    n, _, n_dir = p.shape
    if n < 2:
        return 1.0
    q = np.stack(
        [
            (p[:, :, d] / (px[:, None, d] * py[None, :, d] + EPS)) @ p[:, :, d].T
            for d in range(n_dir)
        ]
    )
    # One batched call, like pyradiomics: the dtype (real or complex) is shared by all directions,
    # and numpy sorts complex values by real part first.
    eig = np.sort(np.linalg.eigvals(q), axis=-1)
    with np.errstate(invalid="ignore"):
        mcc = np.sqrt(eig[:, -2])  # a negative real eigenvalue gives NaN, ignored below
    mcc = mcc[~np.isnan(mcc)]
    return float(np.mean(mcc).real) if mcc.size else float("nan")


def _glcm_from_levels(levels: IntArray, mcc: bool = True) -> dict[str, float]:
    p, grey = glcm_matrix(levels)
    n_dir = p.shape[2]
    if n_dir == 0:  # no two ROI pixels are neighbours: every feature is undefined
        return {name: float("nan") for name in GLCM_FEATURES if mcc or name != "MCC"}
    ng = float(grey.max())  # pyradiomics' Ng: the highest level, not the number of levels
    i = grey[:, None, None]
    j = grey[None, :, None]
    px = p.sum(axis=1)  # (n, dirs)
    py = p.sum(axis=0)  # (n, dirs)
    ux = np.sum(p * i, axis=(0, 1))
    uy = np.sum(p * j, axis=(0, 1))

    # Distributions of k = |i - j| (0..Ng-1) and k = i + j (2..2Ng), per direction.
    diff_idx = np.abs(grey[:, None] - grey[None, :]).astype(np.int64).ravel()
    sum_idx = (grey[:, None] + grey[None, :]).astype(np.int64).ravel()
    flat = p.reshape(-1, n_dir)
    k_diff = np.arange(int(ng), dtype=np.float64)
    p_diff = np.stack(
        [np.bincount(diff_idx, weights=flat[:, d], minlength=int(ng)) for d in range(n_dir)], 1
    )
    k_sum = np.arange(2 * int(ng) + 1, dtype=np.float64)
    p_sum = np.stack(
        [np.bincount(sum_idx, weights=flat[:, d], minlength=2 * int(ng) + 1) for d in range(n_dir)],
        1,
    )

    hxy = -np.sum(p * np.log2(p + EPS), axis=(0, 1))
    hx = -np.sum(px * np.log2(px + EPS), axis=0)
    hy = -np.sum(py * np.log2(py + EPS), axis=0)
    pxpy = px[:, None, :] * py[None, :, :]
    hxy1 = -np.sum(p * np.log2(pxpy + EPS), axis=(0, 1))
    hxy2 = -np.sum(pxpy * np.log2(pxpy + EPS), axis=(0, 1))

    centred_sum = i + j - ux - uy
    sigx = np.sqrt(np.sum(p * (i - ux) ** 2, axis=(0, 1)))
    sigy = np.sqrt(np.sum(p * (j - uy) ** 2, axis=(0, 1)))
    corm = np.sum(p * (i - ux) * (j - uy), axis=(0, 1))
    corr = np.where(sigx * sigy == 0, 1.0, corm / (sigx * sigy + EPS))

    div = np.fmax(hx, hy)
    imc1 = np.zeros(n_dir)
    np.divide(hxy - hxy1, div, out=imc1, where=div != 0)
    with np.errstate(invalid="ignore"):
        # pyradiomics: NaN (ignored in the average) when rounding makes HXY > HXY2.
        imc2 = np.sqrt(1.0 - np.exp(-2.0 * (hxy2 - hxy)))
    imc2[hxy2 == hxy] = 0.0

    diff_avg = np.sum(k_diff[:, None] * p_diff, axis=0)
    per_direction: dict[str, FloatArray] = {
        "Autocorrelation": np.sum(p * i * j, axis=(0, 1)),
        "ClusterProminence": np.sum(p * centred_sum**4, axis=(0, 1)),
        "ClusterShade": np.sum(p * centred_sum**3, axis=(0, 1)),
        "ClusterTendency": np.sum(p * centred_sum**2, axis=(0, 1)),
        "Contrast": np.sum(p * (i - j) ** 2, axis=(0, 1)),
        "Correlation": corr,
        "DifferenceAverage": diff_avg,
        "DifferenceEntropy": -np.sum(p_diff * np.log2(p_diff + EPS), axis=0),
        "DifferenceVariance": np.sum(p_diff * (k_diff[:, None] - diff_avg) ** 2, axis=0),
        "Id": np.sum(p_diff / (1.0 + k_diff[:, None]), axis=0),
        "Idm": np.sum(p_diff / (1.0 + k_diff[:, None] ** 2), axis=0),
        "Idmn": np.sum(p_diff / (1.0 + k_diff[:, None] ** 2 / ng**2), axis=0),
        "Idn": np.sum(p_diff / (1.0 + k_diff[:, None] / ng), axis=0),
        "Imc1": imc1,
        "Imc2": imc2,
        "InverseVariance": np.sum(p_diff[1:] / k_diff[1:, None] ** 2, axis=0),
        "JointAverage": ux,
        "JointEnergy": np.sum(p**2, axis=(0, 1)),
        "JointEntropy": hxy,
        "MaximumProbability": p.max(axis=(0, 1)),
        "SumAverage": np.sum(k_sum[:, None] * p_sum, axis=0),
        "SumEntropy": -np.sum(p_sum * np.log2(p_sum + EPS), axis=0),
        "SumSquares": np.sum(p * (i - ux) ** 2, axis=(0, 1)),
    }
    out = {name: _nan_mean(np.asarray(v, dtype=np.float64)) for name, v in per_direction.items()}
    if mcc:
        out["MCC"] = _glcm_mcc(p, px, py)
    return {name: out[name] for name in GLCM_FEATURES if name in out}


def glcm_features(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    bin_width: float = 25.0,
    bin_count: int | None = None,
    mcc: bool = True,
) -> dict[str, float]:
    """pyradiomics ``glcm`` features (all 24 enabled by default in 3.0.1), unprefixed names.

    Symmetric GLCM at distance 1 in the 4 in-plane directions (scikit-image ``graycomatrix``),
    features averaged over the non-empty directions. All features are NaN when no two ROI pixels
    are neighbours (pyradiomics refuses such ROIs or returns NaN).

    ``MCC`` needs the eigenvalues of an ``Ng x Ng`` matrix per direction, O(Ng^3) as in
    pyradiomics: well under a second for the ``Ng`` of tens to a few hundred that the default bin
    width gives, but minutes for thousands of levels (say ``bin_width=1`` on CT). ``mcc=False``
    leaves it out of the result.

    Raises:
        ValueError: see :func:`discretise`.
    """
    levels = discretise(image, mask, bin_width=bin_width, bin_count=bin_count)
    return _glcm_from_levels(levels, mcc=mcc)


# ----------------------------------------------------------------------------- GLRLM
def _lines(levels: IntArray) -> list[list[IntArray]]:
    """The 1-D pixel lines of the 4 directions: rows, columns, diagonals, anti-diagonals."""
    h, w = levels.shape
    flipped = levels[:, ::-1]
    return [
        list(levels),
        list(levels.T),
        [np.diagonal(levels, k) for k in range(-h + 1, w)],
        [np.diagonal(flipped, k) for k in range(-h + 1, w)],
    ]


def glrlm_matrix(levels: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Run-length matrices of a discretised ROI in the 4 in-plane directions.

    Runs are maximal sequences of equal level along a direction; a pixel outside the ROI (level 0)
    or the image border ends a run. As in pyradiomics, a direction in which no image line holds
    more than one ROI pixel is treated as "flat" for that direction and left empty (all zeros),
    even though each ROI pixel would form a run of length 1 there.

    Args:
        levels: output of :func:`discretise` (levels ``>= 1`` in the ROI, 0 outside).

    Returns:
        ``(P, grey)``: ``P[g, r - 1, d]`` counts runs of the ``g``-th present grey level with
        length ``r`` in direction ``d`` (shape ``(n, max_run, 4)``); ``grey`` holds the level
        values.
    """
    lv = np.asarray(levels, dtype=np.int64)
    grey = np.unique(lv[lv > 0])
    per_direction: list[tuple[IntArray, IntArray]] = []
    max_run = 1
    for lines in _lines(lv):
        if max(int(np.count_nonzero(line)) for line in lines) < 2:
            per_direction.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        # One long sequence with a 0 (outside) between lines, then run-length encode it.
        seq = np.concatenate([np.append(line, 0) for line in lines])
        starts = np.concatenate(([0], np.flatnonzero(np.diff(seq)) + 1))
        lengths = np.diff(np.append(starts, seq.size))
        values = seq[starts]
        inside = values > 0
        runs_length = lengths[inside]
        per_direction.append((np.searchsorted(grey, values[inside]), runs_length))
        max_run = max(max_run, int(runs_length.max(initial=1)))
    mat = np.zeros((grey.size, max_run, len(per_direction)), dtype=np.float64)
    for d, (gi, rl) in enumerate(per_direction):
        np.add.at(mat[:, :, d], (gi, rl - 1), 1.0)
    return mat, grey.astype(np.float64)


def _glrlm_from_levels(levels: IntArray) -> dict[str, float]:
    p, grey = glrlm_matrix(levels)
    n_runs = p.sum(axis=(0, 1))  # Nr per direction; 0 for a direction pyradiomics drops
    keep = n_runs > 0
    if not keep.any():  # e.g. a single-pixel ROI: every feature is undefined
        return dict.fromkeys(GLRLM_FEATURES, float("nan"))
    p, n_runs = p[:, :, keep], n_runs[keep]
    i = grey[:, None]  # (n, 1) against pg (n, dirs)
    j = np.arange(1, p.shape[1] + 1, dtype=np.float64)[:, None]  # against pr (runs, dirs)
    i3 = grey[:, None, None]
    j3 = j[None, :, :]
    pg = p.sum(axis=1)
    pr = p.sum(axis=0)
    n_pix = np.sum(pr * j, axis=0)
    pg_n = pg / n_runs
    pr_n = pr / n_runs
    mu_i = np.sum(pg_n * i, axis=0)
    mu_j = np.sum(pr_n * j, axis=0)
    p_n = p / n_runs
    per_direction: dict[str, FloatArray] = {
        "GrayLevelNonUniformity": np.sum(pg**2, axis=0) / n_runs,
        "GrayLevelNonUniformityNormalized": np.sum(pg**2, axis=0) / n_runs**2,
        "GrayLevelVariance": np.sum(pg_n * (i - mu_i) ** 2, axis=0),
        "HighGrayLevelRunEmphasis": np.sum(pg * i**2, axis=0) / n_runs,
        "LongRunEmphasis": np.sum(pr * j**2, axis=0) / n_runs,
        "LongRunHighGrayLevelEmphasis": np.sum(p * i3**2 * j3**2, axis=(0, 1)) / n_runs,
        "LongRunLowGrayLevelEmphasis": np.sum(p * j3**2 / i3**2, axis=(0, 1)) / n_runs,
        "LowGrayLevelRunEmphasis": np.sum(pg / i**2, axis=0) / n_runs,
        "RunEntropy": -np.sum(p_n * np.log2(p_n + EPS), axis=(0, 1)),
        "RunLengthNonUniformity": np.sum(pr**2, axis=0) / n_runs,
        "RunLengthNonUniformityNormalized": np.sum(pr**2, axis=0) / n_runs**2,
        "RunPercentage": n_runs / n_pix,
        "RunVariance": np.sum(pr_n * (j - mu_j) ** 2, axis=0),
        "ShortRunEmphasis": np.sum(pr / j**2, axis=0) / n_runs,
        "ShortRunHighGrayLevelEmphasis": np.sum(p * i3**2 / j3**2, axis=(0, 1)) / n_runs,
        "ShortRunLowGrayLevelEmphasis": np.sum(p / (i3**2 * j3**2), axis=(0, 1)) / n_runs,
    }
    return {name: _nan_mean(per_direction[name]) for name in GLRLM_FEATURES}


def glrlm_features(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    bin_width: float = 25.0,
    bin_count: int | None = None,
) -> dict[str, float]:
    """All 16 pyradiomics ``glrlm`` features, unprefixed names, averaged over the 4 directions.

    Raises:
        ValueError: see :func:`discretise`.
    """
    return _glrlm_from_levels(discretise(image, mask, bin_width=bin_width, bin_count=bin_count))


# ----------------------------------------------------------------------------- all together
def radiomics_features(
    image: npt.ArrayLike,
    mask: npt.ArrayLike,
    bin_width: float = 25.0,
    bin_count: int | None = None,
    mcc: bool = True,
) -> dict[str, float]:
    """First-order, GLCM and GLRLM features of one 2-D ROI, keyed ``<class>_<Feature>``.

    Keys follow pyradiomics without the image-type prefix (``firstorder_Mean``,
    ``glcm_Contrast``, ``glrlm_ShortRunEmphasis``) and are sorted. The image is discretised once
    with ``bin_width`` (default 25) or ``bin_count``; pixel spacing 1 and ``voxelArrayShift`` 0.
    ``mcc=False`` omits ``glcm_MCC`` (costly for thousands of grey levels, see
    :func:`glcm_features`).

    Raises:
        ValueError: empty mask, shape mismatch, non-2-D input, non-finite ROI values, or invalid
            discretisation settings.
    """
    values, roi = _check_inputs(image, mask)
    levels = discretise(values, roi, bin_width=bin_width, bin_count=bin_count)
    groups = {
        "firstorder": first_order(values, roi, bin_width=bin_width, bin_count=bin_count),
        "glcm": _glcm_from_levels(levels, mcc=mcc),
        "glrlm": _glrlm_from_levels(levels),
    }
    out = {
        f"{prefix}_{name}": value
        for prefix, feats in groups.items()
        for name, value in feats.items()
    }
    return dict(sorted(out.items()))
