"""The evaluation metrics against independent computations (scipy, closed forms)."""
import numpy as np
import pytest
import torch

scipy_linalg = pytest.importorskip("scipy.linalg", reason="the reference square root is scipy's")

from fastforget.eval import metrics


def scipy_fid(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_a @ cov_b).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)


@pytest.mark.parametrize("n,f,shift", [(200, 8, 0.0), (300, 16, 0.5), (50, 64, 2.0)])
def test_frechet_distance_matches_scipy_sqrtm(n, f, shift):
    rng = np.random.default_rng(f)
    a = rng.normal(size=(n, f))
    b = rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) * 0.3 + shift
    assert metrics.frechet_distance(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6, abs=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_rank_deficient_is_fine():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 64))  # 20 samples in 64 dims: singular covariances
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-7 * np.trace(np.cov(a, rowvar=False)))
    assert np.isfinite(metrics.frechet_distance(a, rng.normal(size=(20, 64))))
    with pytest.raises(ValueError, match=r"features must be \(N, F\)"):
        metrics.frechet_distance(a, a[:, :3])


def test_inception_score_closed_forms():
    uniform = torch.zeros(100, 10)
    assert metrics.inception_score(uniform) == pytest.approx((1.0, 0.0))
    confident = torch.full((100, 10), -1e4)
    confident[torch.arange(100), torch.arange(100) % 10] = 0.0  # one-hot, classes balanced in every split
    mean, std = metrics.inception_score(confident)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_cosine_mse_psnr():
    a = torch.randn(5, 7)
    assert metrics.mean_cosine(a, 3 * a) == pytest.approx(1.0)
    assert metrics.mean_cosine(a, -a) == pytest.approx(-1.0)
    truth, gen = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.5]]]])
    region = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert metrics.region_mse(gen, truth, region) == pytest.approx((1 + 0.25) / 2)
    assert metrics.psnr(0.01) == pytest.approx(20.0)
