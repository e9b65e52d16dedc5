"""fastforget: fast machine unlearning for image-to-image generative models.

Fused kernels (Triton, CUDA, C++) for the forget/retain embedding-distance loss of Li, Hsu, Chen
and Marculescu (ICLR 2024), registered as torch custom ops with autograd.
"""
from . import nn
from .ops import UnlearnLossOutput, make_teacher_batch, unlearn_loss

__version__ = "0.1.0"
__all__ = ["UnlearnLossOutput", "make_teacher_batch", "nn", "unlearn_loss", "__version__"]
