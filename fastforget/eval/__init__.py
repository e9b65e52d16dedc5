"""Evaluation with the paper's metrics: `fastforget eval`."""
from .metrics import frechet_distance, inception_score, mean_cosine, psnr, region_mse

__all__ = ["frechet_distance", "inception_score", "mean_cosine", "psnr", "region_mse"]
