"""The paper's metrics on feature arrays and images: FID, IS, embedding cosine, MSE, PSNR.

FID is computed in float64 with a matrix square root taken through a symmetric eigendecomposition,
which stays real and stable where a generic sqrtm of the (non-symmetric) product goes complex.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidValue


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """FID between two (N, F) feature arrays: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the square root of a symmetric PSD
    matrix, so eigh suffices and the result is real."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InvalidValue(f"features must be (N, F) arrays with N >= 2 and one F, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    covmean_trace = np.trace(_sqrt_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * covmean_trace)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    if p.shape[0] < splits:
        raise InvalidValue(f"inception_score needs at least {splits} samples, got {p.shape[0]}")
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of matching rows: each generated image's embedding with its truth's."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean())


def region_mse(generated: Tensor, truth: Tensor, region: Tensor) -> float:
    """Mean squared error over the pixels where region is 1 (region broadcasts over channels)."""
    region = region.expand_as(truth).to(truth.dtype)
    return float(((generated - truth) ** 2 * region).sum() / region.sum().clamp_min(1))


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
