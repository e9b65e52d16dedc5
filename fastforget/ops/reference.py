"""The readable PyTorch definitions of fastforget's ops: the ground truth for tests and benchmarks.

Slow on purpose: every step is a plain tensor op, so each line can be checked against the paper
(Li, Hsu, Chen, Marculescu, ICLR 2024) and the reference code.
"""
from __future__ import annotations

import torch
from torch import Tensor


def unlearn_loss(
    student: Tensor,
    retain_target: Tensor,
    forget_target: Tensor,
    is_forget: Tensor,
    retain_weight: float = 1.0,
    forget_weight: float = 0.2,
    normalize: str = "set",
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, retain_loss, forget_loss), each a 0-d float32 tensor.

    student, retain_target, forget_target: (B, ...) of one shape. is_forget: (B,), nonzero = forget.
    d_b = mean over the non-batch elements of (student_b - target_b)^2, where target_b is the
    forget target on forget rows and the retain target on retain rows, in float32.
    normalize="set": each loss is the mean of d_b over its own rows (0 for an empty set).
    normalize="reference": each loss is (2/B) * sum of d_b over its rows, as the reference code's
    compute_loss (per-sample mean, weights 1 - label and 1 + label, mean over the batch).
    upcast=False computes in the inputs' own dtype: the "same-precision PyTorch" yardstick of the
    low-precision tests.
    """
    forget = is_forget.bool()
    batch = student.shape[0]
    target = torch.where(forget.view(-1, *([1] * (student.dim() - 1))), forget_target, retain_target)
    diff = student.float() - target.float() if upcast else student - target.to(student.dtype)
    d = diff.pow(2).reshape(batch, -1).mean(dim=1)
    if normalize == "set":
        n_forget = forget.sum()
        n_retain = batch - n_forget
        retain_loss = torch.where(forget, 0.0, d).sum() / n_retain.clamp(min=1)
        forget_loss = torch.where(forget, d, 0.0).sum() / n_forget.clamp(min=1)
    elif normalize == "reference":
        retain_loss = torch.where(forget, 0.0, d).sum() * (2.0 / batch)
        forget_loss = torch.where(forget, d, 0.0).sum() * (2.0 / batch)
    else:
        raise ValueError(f"normalize must be 'set' or 'reference', got {normalize!r}")
    loss = retain_weight * retain_loss + forget_weight * forget_loss
    return loss, retain_loss, forget_loss


def reference_code_loss(
    student: Tensor, retain_target: Tensor, forget_target: Tensor, is_forget: Tensor, forget_weight: float = 0.2
) -> Tensor:
    """The reference code's compute_loss as it is written: the baseline that benchmarks time.

    The target is the forget target on forget rows and the retain target on the others; label is 1
    on forget rows and -1 on retain rows; the per-sample mean squared error is weighted (1 - label)
    on retain rows and forget_weight * (1 + label) on forget rows, then averaged over the batch.
    It equals unlearn_loss(..., retain_weight=1, normalize="reference").loss.
    """
    label = is_forget.float() * 2 - 1
    target = torch.where(is_forget.bool().view(-1, *([1] * (student.dim() - 1))), forget_target, retain_target)
    per_sample = ((student.float() - target.float()) ** 2).reshape(student.shape[0], -1).mean(dim=1)
    return ((1 - label) * per_sample + forget_weight * (1 + label) * per_sample).mean()
