"""Distances between two sets of features: Fréchet (FID), KID, and bootstrap intervals.

All in float64 with NumPy/SciPy; features come from the FID Inception or from
the face-embedding network, the formulas do not care which.

- `frechet_distance`: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), as
  pytorch-fid computes it (`scipy.linalg.sqrtm`; an eps offset on the diagonals
  when the product is singular; a complex result with a non-negligible imaginary
  diagonal is an error, a negligible one is dropped). `method='eigh'` computes the
  trace of the square root from symmetric eigendecompositions instead,
  tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same value for symmetric PSD matrices
  and several times faster at 2048 dimensions, which the bootstrap needs.
- `kernel_inception_distance`: the unbiased MMD^2 with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3 of Binkowski et al. (2018), averaged over
  random subsets.
- `bootstrap_interval`: a percentile interval from resampling both sets.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import linalg

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
    product = root @ sigma2 @ root
    values = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sum(np.sqrt(np.clip(values, 0, None))))


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


def frechet_distance_of_features(x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    return frechet_distance(statistics(x), statistics(y), **kwargs)


def _mmd2_unbiased(x, y):
    dims = x.shape[1]
    k_xx = (x @ x.T / dims + 1) ** 3
    k_yy = (y @ y.T / dims + 1) ** 3
    k_xy = (x @ y.T / dims + 1) ** 3
    m, n = len(x), len(y)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return xx + yy - 2 * k_xy.mean()


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
    values = [
        statistic(x[rng.integers(0, len(x), len(x))], y[rng.integers(0, len(y), len(y))])
        for _ in range(resamples)
    ]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high), level, resamples)
