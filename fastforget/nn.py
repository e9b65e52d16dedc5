"""Modules over fastforget's ops."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ops import UnlearnLossOutput, unlearn_loss


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
