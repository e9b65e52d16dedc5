"""Modules over fastforget's ops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ops import UnlearnLossOutput, masked_patch_embed, unlearn_loss


class UnlearnLoss(nn.Module):
    """The forget/retain embedding-distance loss as a module; see fastforget.unlearn_loss."""

    def __init__(self, retain_weight: float = 1.0, forget_weight: float = 0.2, normalize: str = "set",
                 backend: Optional[str] = None):
        super().__init__()
        self.retain_weight, self.forget_weight = retain_weight, forget_weight
        self.normalize, self.backend = normalize, backend

    def forward(self, student: Tensor, retain_target: Tensor, forget_target: Tensor,
                is_forget: Tensor) -> UnlearnLossOutput:
        return unlearn_loss(student, retain_target, forget_target, is_forget, retain_weight=self.retain_weight,
                            forget_weight=self.forget_weight, normalize=self.normalize, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"retain_weight={self.retain_weight}, forget_weight={self.forget_weight}, "
                f"normalize={self.normalize!r}, backend={self.backend!r}")


class MaskedPatchEmbed(nn.Module):
    """timm's PatchEmbed (parameters proj.weight, proj.bias, so MAE checkpoints load) that embeds
    only the kept patches, through fastforget.masked_patch_embed.

    forward(images, ids_keep, pos_embed, cls_token=None) -> (B, [1 +] K, embed_dim).
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 backend: Optional[str] = None):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.backend = backend

    def forward(self, images: Tensor, ids_keep: Tensor, pos_embed: Tensor,
                cls_token: Optional[Tensor] = None) -> Tensor:
        return masked_patch_embed(images, self.proj.weight, self.proj.bias, pos_embed, ids_keep, cls_token,
                                  backend=self.backend)
