"""fastforget: fast machine unlearning for image-to-image generative models.

Fused kernels (Triton, CUDA, C++) for the method of Li, Hsu, Chen and Marculescu (ICLR 2024): the
forget/retain embedding-distance loss, the masked-patch encoding, the routed teacher batch, a
diffusion model's step inputs and its GroupNorm-scale-shift-SiLU chain, registered as torch custom
ops with autograd; a trainer, evaluation and baselines for MAE and Palette (fastforget.families).
"""
from . import nn
from .method import EncoderUnlearning, frozen_copy
from .train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from .ops import (UnlearnLossOutput, group_norm_silu, make_diffusion_inputs, make_teacher_batch, masked_patch_embed,
                  random_masking, unlearn_loss)
from .ops import vq_quantize
from .ops import token_embed

__version__ = "0.1.0"
__all__ = [
    "EncoderUnlearning", "LoopConfig", "PretrainConfig", "UnlearnConfig", "UnlearnLossOutput", "frozen_copy",
    "group_norm_silu", "make_diffusion_inputs", "make_teacher_batch", "masked_patch_embed", "nn", "pretrain",
    "random_masking", "token_embed", "unlearn", "unlearn_loss", "vq_quantize", "__version__",
]
