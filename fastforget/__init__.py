"""fastforget: fast machine unlearning for image-to-image generative models.

Fused kernels (Triton, CUDA, C++) for the method of Li, Hsu, Chen and Marculescu (ICLR 2024): the
forget/retain embedding-distance loss, the masked-patch encoding and the routed teacher batch,
registered as torch custom ops with autograd.
"""
from . import nn
from .train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from .ops import UnlearnLossOutput, make_teacher_batch, masked_patch_embed, random_masking, unlearn_loss

__version__ = "0.1.0"
__all__ = [
    "LoopConfig", "PretrainConfig", "UnlearnConfig", "UnlearnLossOutput", "make_teacher_batch",
    "masked_patch_embed", "nn", "pretrain", "random_masking", "unlearn", "unlearn_loss", "__version__",
]
