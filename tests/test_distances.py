"""Fréchet distance, KID and bootstrap intervals against closed forms and pytorch-fid."""

import numpy as np
import pytest
from scipy import linalg

from faceage_jax.metrics import distances
from tests.helpers import REPO_ROOT


def random_covariance(rng, dims):
    factor = rng.standard_normal((dims, dims))
    return factor @ factor.T / dims + 0.1 * np.eye(dims)


def test_frechet_distance_of_gaussians_with_commuting_covariances_is_the_closed_form():
    # Diagonal covariances commute: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    first = distances.Statistics(mu1, np.diag(a), 1)
    second = distances.Statistics(mu2, np.diag(b), 1)
    for method in ["sqrtm", "eigh"]:
        assert distances.frechet_distance(first, second, method=method) == pytest.approx(
            expected, rel=1e-10
        )


def test_both_methods_agree_with_a_direct_scipy_computation_on_full_covariances():
    rng = np.random.default_rng(1)
    s1, s2 = random_covariance(rng, 64), random_covariance(rng, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    first, second = distances.Statistics(mu1, s1, 1), distances.Statistics(mu2, s2, 1)
    assert distances.frechet_distance(first, second) == pytest.approx(direct, rel=1e-9)
    assert distances.frechet_distance(first, second, method="eigh") == pytest.approx(
        direct, rel=1e-6
    )


def test_frechet_distance_equals_pytorch_fids_on_its_stored_case():
    with np.load(REPO_ROOT / "tests" / "reference" / "inception_features.npz") as reference:
        x, y, expected = reference["frechet_x"], reference["frechet_y"], reference["frechet"]
    assert distances.frechet_distance_of_features(x, y) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(2).standard_normal((300, 32))
    for method in ["sqrtm", "eigh"]:
        value = distances.frechet_distance_of_features(features, features, method=method)
        assert abs(value) < 1e-6, (method, value)


def test_singular_covariances_get_the_eps_offset_and_stay_finite():
    # Fewer samples than dimensions: both covariances are singular.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((10, 40)), rng.standard_normal((10, 40)) + 1
    value = distances.frechet_distance_of_features(x, y)
    assert np.isfinite(value) and value > 0


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    same = [
        distances.kernel_inception_distance(
            rng.standard_normal((100, 16)), rng.standard_normal((100, 16)), subsets=10, seed=i
        ).mean
        for i in range(20)
    ]
    # Unbiased: the average over independent draws is ~0 (a biased MMD would be
    # ~2 * k(x, x)'s excess / N > 0), within a few standard errors.
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-4
    shifted = distances.kernel_inception_distance(
        rng.standard_normal((100, 16)), rng.standard_normal((100, 16)) + 0.5, subsets=10
    )
    assert shifted.mean > 10 * np.std(same)


def test_kid_on_a_toy_case_equals_the_formula_written_out():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 0.0], [2.0, 1.0], [-1.0, 0.5]])

    def k(a, b):
        return (a @ b / 2 + 1) ** 3

    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / 6
    yy = sum(k(y[i], y[j]) for i, j in pairs) / 6
    xy = sum(k(a, b) for a in x for b in y) / 9
    # Subsets of all 3: each is the whole set, in some order.
    kid = distances.kernel_inception_distance(x, y, subsets=3, subset_size=3)
    assert kid.mean == pytest.approx(xx + yy - 2 * xy)
    assert kid.std == pytest.approx(0, abs=1e-12)


def test_bootstrap_interval_covers_the_true_mean_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(5)
    covered = 0
    trials = 60
    for trial in range(trials):
        x, y = rng.standard_normal(80), rng.standard_normal(80) + 1.0
        interval = distances.bootstrap_interval(
            lambda a, b: float(np.mean(b) - np.mean(a)), x, y, resamples=200, seed=trial
        )
        covered += interval.low <= 1.0 <= interval.high
    assert 0.85 * trials <= covered <= trials


def test_statistics_need_two_features():
    with pytest.raises(ValueError, match="N >= 2"):
        distances.statistics(np.zeros((1, 8)))


def test_the_gram_form_equals_sqrtm_and_eigh_with_fewer_faces_than_dimensions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 100))
    y = rng.normal(size=(45, 100)) * 1.3 + 0.2
    expected = distances.frechet_distance_of_features(x, y, method="eigh")
    for first, second in [(x, y), (y, x)]:
        gram = distances.frechet_distance_of_features(first, second, method="gram")
        assert gram == pytest.approx(expected, rel=1e-9)
    # And with more faces than dimensions, where sqrtm needs no offset.
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) + 0.5
    assert distances.frechet_distance_of_features(x, y, method="gram") == pytest.approx(
        distances.frechet_distance_of_features(x, y, method="sqrtm"), rel=1e-9
    )


def test_the_frechet_interval_is_the_estimate_plus_minus_z_times_the_bootstrap_spread():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 30)), rng.normal(size=(50, 30)) + 0.3
    interval = distances.frechet_bootstrap_interval(x, y, resamples=30, seed=5)
    # The same resamples, each computed from scratch.
    draws = np.random.default_rng(5)
    values = []
    for _ in range(30):
        i, j = draws.integers(0, 40, 40), draws.integers(0, 50, 50)
        values.append(distances.frechet_distance_of_features(x[i], y[j], method="eigh"))
    estimate = distances.frechet_distance_of_features(x, y, method="eigh")
    half = 1.959963984540054 * np.std(values, ddof=1)
    assert interval.method == "normal"
    assert interval.low == pytest.approx(estimate - half, rel=1e-7)
    assert interval.high == pytest.approx(estimate + half, rel=1e-7)


def test_the_frechet_interval_covers_the_true_distance_about_95_percent_of_the_time():
    # Two dimensions, many faces: the estimate's bias is small against its spread.
    rng = np.random.default_rng(3)
    # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for diagonal S1 = I, S2 = diag(1, 2.25).
    true = 0.5**2 + (1 + 1 - 2 * 1) + (1 + 2.25 - 2 * 1.5)
    covered = 0
    for trial in range(40):
        x = rng.normal(size=(150, 2)) * [1.0, 1.0]
        y = rng.normal(size=(150, 2)) * [1.0, 1.5] + [0.5, 0.0]
        interval = distances.frechet_bootstrap_interval(x, y, resamples=40, seed=trial)
        covered += interval.low <= true <= interval.high
    assert covered >= 33, covered


def test_the_kid_interval_covers_zero_for_one_distribution_and_not_for_two():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same = distances.kid_bootstrap_interval(x, y, resamples=100)
    assert same.low <= 0 <= same.high
    estimate = distances._mmd2_unbiased(x, y)
    assert same.low <= estimate <= same.high
    shifted = distances.kid_bootstrap_interval(x, y + 0.5, resamples=100)
    assert shifted.low > 0
