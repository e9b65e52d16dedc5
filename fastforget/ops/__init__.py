"""fastforget's ops: validated public functions over registered torch custom ops."""
from .attention import qkv_attention
from .diffusion_inputs import make_diffusion_inputs
from .group_norm import group_norm_silu
from .patch_embed import masked_patch_embed, random_masking
from .teacher_batch import make_teacher_batch
from .token_embed import token_embed
from .unlearn_loss import UnlearnLossOutput, unlearn_loss
from .vq_quantize import vq_quantize

__all__ = ["UnlearnLossOutput", "group_norm_silu", "make_diffusion_inputs", "make_teacher_batch", "masked_patch_embed", "qkv_attention",
           "random_masking", "token_embed", "unlearn_loss", "vq_quantize"]
