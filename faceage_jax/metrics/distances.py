"""Distances between two sets of features: Fréchet (FID), KID, and bootstrap intervals.

All in float64 with NumPy/SciPy; features come from the FID Inception or from
the face-embedding network, the formulas do not care which.

- `frechet_distance`: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), as
  pytorch-fid computes it (`scipy.linalg.sqrtm`; an eps offset on the diagonals
  when the product is singular; a complex result with a non-negligible imaginary
  diagonal is an error, a negligible one is dropped). `method='eigh'` computes the
  trace of the square root from symmetric eigendecompositions instead,
  tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same value for symmetric PSD matrices
  and several times faster at 2048 dimensions.
- `frechet_distance_of_features(x, y, method='gram')`: the same distance from
  the features themselves. With A, B the centred features scaled by
  1/sqrt(N - 1), S1 S2 = A'A B'B has the nonzero eigenvalues of (A B')(A B')',
  so tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of an
  N1 x N1 matrix: exact, and much faster than any D x D method when the sets
  are smaller than D (the bootstrap's hundreds of resamples of ~1,000 faces).
- `kernel_inception_distance`: the unbiased MMD^2 with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3 of Binkowski et al. (2018), averaged over
  random subsets.
- `bootstrap_interval`: a percentile interval from resampling both sets.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import linalg, stats

# Below this many faces per set FID is biased upward noticeably (its estimate
# converges as 1/N); pytorch-fid's authors recommend at least 2,048.
RECOMMENDED_MINIMUM = 2048


class Statistics(NamedTuple):
    mean: np.ndarray  # [D]
    covariance: np.ndarray  # [D, D]
    count: int


def statistics(features: np.ndarray) -> Statistics:
    """Mean and (unbiased) covariance of `features: [N, D]`, in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component of {imaginary}")
        covmean = covmean.real
    return float(np.trace(covmean))


def _symmetric_sqrt(matrix):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _trace_sqrt_product_eigh(sigma1, sigma2):
    root = _symmetric_sqrt(sigma1)
    return _trace_sqrt_psd(root @ sigma2 @ root)


def frechet_distance(
    first: Statistics, second: Statistics, *, method: str = "sqrtm", eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians of two feature sets (see module docstring)."""
    mu1, mu2 = np.atleast_1d(first.mean), np.atleast_1d(second.mean)
    sigma1, sigma2 = np.atleast_2d(first.covariance), np.atleast_2d(second.covariance)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":
        trace_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        trace_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', not {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def _centred_scaled(features):
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    mean = features.mean(axis=0)
    return mean, (features - mean) / np.sqrt(len(features) - 1)


def _trace_sqrt_psd(matrix) -> float:
    """tr(M^(1/2)) of a symmetric PSD matrix; eigenvalues at rounding level count as 0.

    (Centred sets have rank below their size: the square roots of the rounding
    noise of the missing eigenvalues would otherwise add ~1e-8 each.)
    """
    values = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    floor = max(values.max(), 0.0) * len(values) * np.finfo(np.float64).eps
    return float(np.sum(np.sqrt(values[values > floor])))


def _frechet_distance_gram(x, y):
    mu1, a = _centred_scaled(x)
    mu2, b = _centred_scaled(y)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} and {mu2.shape}")
    cross = a @ b.T  # [N1, N2]
    small = cross @ cross.T if len(a) <= len(b) else cross.T @ cross
    trace_covmean = _trace_sqrt_psd(small)
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * trace_covmean)


def frechet_distance_of_features(
    x: np.ndarray, y: np.ndarray, *, method: str = "sqrtm", **kwargs
) -> float:
    """Fréchet distance of two feature sets `[N, D]`; `method` 'sqrtm', 'eigh' or 'gram'."""
    if method == "gram":
        return _frechet_distance_gram(x, y)
    return frechet_distance(statistics(x), statistics(y), method=method, **kwargs)


def _mmd2_unbiased(x, y):
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    return _mmd2_from_kernels(k_xx, k_yy, k_xy)


def _mmd2_from_kernels(k_xx, k_yy, k_xy):
    m, n = len(k_xx), len(k_yy)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return xx + yy - 2 * k_xy.mean()


def _polynomial_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3


class KID(NamedTuple):
    mean: float
    std: float  # Over the subsets.
    subsets: int
    subset_size: int


def kernel_inception_distance(
    x: np.ndarray,
    y: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KID:
    """Unbiased MMD^2 (cubic polynomial kernel) over `subsets` random subsets of each set."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    if size == len(x) == len(y):  # Every subset would be both whole sets: one is enough.
        return KID(float(_mmd2_unbiased(x, y)), 0.0, 1, size)
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_unbiased(
            x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return KID(float(np.mean(values)), float(np.std(values)), subsets, size)


class Interval(NamedTuple):
    low: float
    high: float
    level: float
    resamples: int
    # 'percentile' (the resamples' quantiles), or 'normal': the estimate +- z times
    # the resamples' standard deviation, for the Fréchet distance, whose resamples are
    # shifted by their duplicated faces (fewer distinct faces than dimensions).
    method: str = "percentile"


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    x: np.ndarray,
    y: np.ndarray,
    *,
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of `statistic(x*, y*)` over resamples of both sets with replacement."""
    rng = np.random.default_rng(seed)
    values = [statistic(x[i], y[j]) for i, j in _resamples(rng, len(x), len(y), resamples)]
    return _percentile_interval(values, level, resamples)


def _percentile_interval(values, level, resamples) -> Interval:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high), level, resamples)


def _normal_interval(estimate, values, level, resamples) -> Interval:
    half = stats.norm.ppf(0.5 + level / 2) * np.std(values, ddof=1)
    return Interval(float(estimate - half), float(estimate + half), level, resamples, "normal")


def _resamples(rng, m, n, resamples):
    for _ in range(resamples):
        yield rng.integers(0, m, m), rng.integers(0, n, n)


def frechet_bootstrap_interval(
    x: np.ndarray, y: np.ndarray, *, resamples: int = 100, level: float = 0.95, seed: int = 0
) -> Interval:
    """A bootstrap interval of the Fréchet distance at these set sizes, from Gram matrices.

    A resampled set holds each face about 0.63 times as often distinct, so with
    fewer faces than dimensions its Fréchet distance is biased upward (the
    estimate itself is, too, as 1/N): the resamples' percentiles need not contain
    the estimate. The interval is therefore the estimate +- z times the
    resamples' standard deviation ('normal'), which measures how much the
    distance varies between draws of this many faces. A resample's centred cross
    products are its rows and columns of X Y' minus their means, so each resample
    costs an N1 x N1 eigendecomposition, not D x D.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    _centred_scaled(x), _centred_scaled(y)  # Shape checks.
    g_xy, sq_x, sq_y = x @ y.T, np.sum(x * x, axis=1), np.sum(y * y, axis=1)
    rng = np.random.default_rng(seed)
    values = []
    for i, j in _resamples(rng, len(x), len(y), resamples):
        mean_x, mean_y = x[i].mean(axis=0), y[j].mean(axis=0)
        cross = g_xy[np.ix_(i, j)]
        cross = cross - cross.mean(axis=1, keepdims=True) - cross.mean(axis=0) + cross.mean()
        cross /= np.sqrt((len(i) - 1) * (len(j) - 1))
        trace_covmean = _trace_sqrt_psd(cross @ cross.T)
        trace_x = (sq_x[i].sum() - len(i) * mean_x @ mean_x) / (len(i) - 1)
        trace_y = (sq_y[j].sum() - len(j) * mean_y @ mean_y) / (len(j) - 1)
        diff = mean_x - mean_y
        values.append(diff @ diff + trace_x + trace_y - 2 * trace_covmean)
    return _normal_interval(_frechet_distance_gram(x, y), values, level, resamples)


def _mmd2_of_resample(k_xx, k_yy, k_xy, i, j):
    """Unbiased MMD^2 of a resample: pairs of one face with itself (same index) left out."""
    sub_xx, sub_yy = k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)]
    other_x, other_y = i[:, None] != i[None, :], j[:, None] != j[None, :]
    xx = sub_xx[other_x].mean()
    yy = sub_yy[other_y].mean()
    return xx + yy - 2 * k_xy[np.ix_(i, j)].mean()


def kid_bootstrap_interval(
    x: np.ndarray,
    y: np.ndarray,
    *,
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of the unbiased MMD^2 of the whole sets over bootstrap resamples.

    The kernel matrices are computed once; a resample indexes into them, leaving
    out the pairs of a face with its own copies as the unbiased estimate leaves
    out the diagonal.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or len(y) < 3:
        raise ValueError("a KID interval needs at least 3 features in each set")
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    rng = np.random.default_rng(seed)
    values = [
        _mmd2_of_resample(k_xx, k_yy, k_xy, i, j)
        for i, j in _resamples(rng, len(x), len(y), resamples)
    ]
    return _percentile_interval(values, level, resamples)
