"""The fused forget/retain embedding-distance loss: validation, dispatch, custom op, autograd.

    L_R = mean over retain rows of d_b,   L_F = mean over forget rows of d_b,   L = w_R L_R + w_F L_F
    d_b = mean over the row's elements of (student_b - target_b)^2, target_b = forget or retain target

The kernels write d L / d student in the forward pass (one pass over memory); backward rescales
it in place only when some output other than `loss` carries gradient, or `loss` carries a
gradient other than 1, and it decides that on the device (no host synchronisation).
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom

NORMALIZE = ("set", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class UnlearnLossOutput(NamedTuple):
    loss: Tensor
    retain_loss: Tensor
    forget_loss: Tensor


def unlearn_loss(
    student: Tensor,
    retain_target: Tensor,
    forget_target: Tensor,
    is_forget: Tensor,
    *,
    retain_weight: float = 1.0,
    forget_weight: float = 0.2,
    normalize: str = "set",
    backend: Optional[str] = None,
) -> UnlearnLossOutput:
    """(loss, retain_loss, forget_loss), 0-d float32, of student embeddings against their targets.

    student: (B, ...) float32, bfloat16 or float16, any strides. retain_target, forget_target:
    student's shape, any of those dtypes, treated as constants (no gradient); they may be one
    tensor. is_forget: (B,) bool or 0/1 integers, nonzero = forget row. normalize: "set" (each
    loss is the mean over its own rows, 0 for an empty set) or "reference" (2/B times the sum,
    the reference code's compute_loss). backend: None (fastest that fits), "torch", "triton",
    "cuda" or "cpu"; FASTFORGET_BACKEND sets the default.
    """
    _check(student, retain_target, forget_target, is_forget, normalize)
    retain_weight, forget_weight = _weight("retain_weight", retain_weight), _weight("forget_weight", forget_weight)
    batch = student.shape[0]
    if forget_target.dtype != retain_target.dtype:  # the kernels read both targets as one dtype: the wider
        common = torch.promote_types(retain_target.dtype, forget_target.dtype)  # (bf16 with fp16: fp32), exact
        retain_target, forget_target = retain_target.to(common), forget_target.to(common)
    flags = is_forget if is_forget.dtype == torch.bool else is_forget != 0
    args = (_rows(student, batch), _rows(retain_target.detach(), batch), _rows(forget_target.detach(), batch),
            flags.contiguous().view(torch.uint8), retain_weight, forget_weight, normalize == "set")
    requested = backends.requested_backend(backend)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    if custom.traced():
        return UnlearnLossOutput(*UNLEARN_LOSS.op(*args, compute_grad, True, requested)[:3])
    name = backends.select("unlearn_loss", requested, student.device)  # every backend takes every input
    if name in backends.native.EXTENSIONS:  # autograd in C++
        return UnlearnLossOutput(*backends.native.ops(name).unlearn_loss(*args))
    return UnlearnLossOutput(*UNLEARN_LOSS.eager(*args, compute_grad, True, name)[:3])


def _float32(w: float) -> float:
    """w rounded to float32: 1e-50 is 0 there and 1e39 is inf, for every backend alike."""
    try:
        w = float(w)
    except OverflowError:  # an int beyond any float
        return math.inf
    return struct.unpack("f", struct.pack("f", w))[0] if abs(w) < 3.5e38 else math.copysign(math.inf, w)


def _weight(name: str, w) -> float:
    """w as every kernel uses it, rounded to float32; it must be finite there."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(rounded := _float32(w)):
        raise InvalidType(f"{name} must be a finite float (in float32's range), got {w!r}")
    return rounded


def _rows(x: Tensor, batch: int) -> Tensor:
    """x as (batch, elements per row) with unit column stride: a view when strides allow."""
    x = x if x.dim() == 2 else x.reshape(batch, -1)
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _check(student, retain_target, forget_target, is_forget, normalize) -> None:
    """Every argument named, with what it got and what was expected; costs about a microsecond."""
    for name, t in (("student", student), ("retain_target", retain_target), ("forget_target", forget_target),
                    ("is_forget", is_forget)):
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("student", student), ("retain_target", retain_target), ("forget_target", forget_target)):
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidType(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    shape, device = student.shape, student.device
    if len(shape) < 2 or student.numel() == 0:
        raise InvalidValue(
            f"student must be (B, ...) with B >= 1 and at least one element per row, got shape {tuple(shape)}"
        )
    for name, t in (("retain_target", retain_target), ("forget_target", forget_target)):
        if t.shape != shape:
            raise InvalidValue(f"{name} must have student's shape {tuple(shape)}, got {tuple(t.shape)}")
    for name, t in (("retain_target", retain_target), ("forget_target", forget_target), ("is_forget", is_forget)):
        if t.device != device:
            raise InvalidValue(f"{name} must be on student's device {device}, got {t.device}")
    if is_forget.dtype.is_floating_point or is_forget.dtype.is_complex:
        raise InvalidType(f"is_forget must be bool or 0/1 integers, got {is_forget.dtype}")
    if is_forget.shape != shape[:1]:
        raise InvalidValue(f"is_forget must have shape ({shape[0]},) (one flag per row), got {tuple(is_forget.shape)}")
    if normalize not in NORMALIZE:
        raise InvalidValue(f"normalize must be one of {NORMALIZE}, got {normalize!r}")

# ---------------------------------------------------------------------------------------------
# Backends. Inputs: (rows, cols) tensors with unit column stride; is_forget (rows,) uint8.


def _torch_forward(student, retain, forget, is_forget, retain_weight, forget_weight, normalize_set, compute_grad):
    rows, cols = student.shape
    forget_rows = is_forget.bool()
    target = torch.where(forget_rows[:, None], forget.float(), retain.float())
    diff = student.float() - target
    row_sq = diff.square().sum(dim=1)
    n_forget = forget_rows.sum()
    n_retain = rows - n_forget
    if normalize_set:
        norm_retain, norm_forget = 1.0 / n_retain.clamp(min=1), 1.0 / n_forget.clamp(min=1)
    else:
        norm_retain = norm_forget = torch.full((), 2.0 / rows, device=student.device)
    retain_loss = torch.where(forget_rows, 0.0, row_sq).sum() / cols * norm_retain
    forget_loss = torch.where(forget_rows, row_sq, 0.0).sum() / cols * norm_forget
    loss = retain_weight * retain_loss + forget_weight * forget_loss
    if compute_grad:
        coef = torch.where(
            forget_rows, _grad_weight(forget_weight) * norm_forget, _grad_weight(retain_weight) * norm_retain
        ) * (2.0 / cols)
        grad = (diff * coef[:, None]).to(student.dtype)
    else:
        grad = student.new_empty(0)
    return loss.float(), retain_loss.float(), forget_loss.float(), grad


def _grad_weight(w: float) -> float:
    return w if w != 0.0 else 1.0  # as csrc/common/unlearn_loss.h


def _row_scale(is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight) -> Tensor:
    """(rows,) float32: what each row's saved gradient is multiplied by in backward."""
    zero = torch.zeros((), device=is_forget.device)
    g = grad_loss if grad_loss is not None else zero
    scale_retain = (g * retain_weight + (grad_retain if grad_retain is not None else zero)) / _grad_weight(retain_weight)
    scale_forget = (g * forget_weight + (grad_forget if grad_forget is not None else zero)) / _grad_weight(forget_weight)
    return torch.where(is_forget.bool(), scale_forget, scale_retain)


def _torch_scale_grad_(grad, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight):
    scale = _row_scale(is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight)
    grad.copy_(grad.float() * scale[:, None])


def _impl(name: str, torch_fn, triton_fn: str, native_op: str):
    """The function of backend `name`: torch_fn, kernels.unlearn_loss.<triton_fn> or the native op."""
    if name == "torch":
        return torch_fn
    if name == "triton":
        from ..kernels import unlearn_loss as kernel

        return getattr(kernel, triton_fn)
    return getattr(backends.native.ops(name), native_op)


# ---------------------------------------------------------------------------------------------
# The custom ops (custom.register): opaque to torch.compile, with fake kernels and autograd.


def _forward(
    student: Tensor, retain_target: Tensor, forget_target: Tensor, is_forget: Tensor,
    retain_weight: float, forget_weight: float, normalize_set: bool, compute_grad: bool,
    inplace_backward: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, retain_loss, forget_loss, grad) of (rows, cols) inputs, is_forget (rows,) uint8.

    grad is d loss / d student when compute_grad, else empty: the op's gradient workspace. With
    inplace_backward, eager backward rescales it in place (the caller must not read it); without,
    backward is functional.
    """
    name = backends.select("unlearn_loss", backend, student.device)  # every backend takes every input
    return _impl(name, _torch_forward, "forward", "unlearn_loss_forward")(
        student, retain_target, forget_target, is_forget, retain_weight, forget_weight, normalize_set, compute_grad
    )


def _forward_fake(student, retain_target, forget_target, is_forget, retain_weight, forget_weight, normalize_set,
                  compute_grad, inplace_backward, backend):
    scalar = student.new_empty((), dtype=torch.float32)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return scalar, scalar.clone(), scalar.clone(), grad


def _scale_grad(
    grad: Tensor, is_forget: Tensor, grad_loss: Optional[Tensor], grad_retain: Optional[Tensor],
    grad_forget: Optional[Tensor], retain_weight: float, forget_weight: float, backend: str,
) -> None:
    name = backends.select("unlearn_loss backward", backend, grad.device)
    _impl(name, _torch_scale_grad_, "scale_grad_", "unlearn_loss_scale_grad")(
        grad, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight)


def _setup_context(ctx, inputs, output):
    _, _, _, is_forget, retain_weight, forget_weight, _, _, inplace_backward, backend = inputs
    ctx.save_for_backward(output[3], is_forget)
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero-filled tensors
    ctx.retain_weight, ctx.forget_weight = retain_weight, forget_weight
    ctx.inplace_backward, ctx.backend = inplace_backward, backend


def _backward(ctx, grad_loss, grad_retain, grad_forget, _grad_of_grad):
    grad, is_forget = ctx.saved_tensors
    grads = (_as_f32(grad_loss), _as_f32(grad_retain), _as_f32(grad_forget), ctx.retain_weight, ctx.forget_weight)
    if ctx.inplace_backward and type(grad) is torch.Tensor:
        # Eager: rescale the saved gradient in place, skipped on the device when the scale is 1.
        # It is consumed: a second backward through the same graph is refused by autograd's
        # version check ("modified by an inplace operation"); sum the outputs instead.
        SCALE_GRAD.eager(grad, is_forget, *grads, ctx.backend)
        torch.autograd.graph.increment_version(grad)  # a Triton kernel's write is invisible to autograd
    else:
        # Traced (torch.compile, export) or asked: a functional multiply. Under torch.compile
        # Inductor fuses it into the consumer of the gradient: no pass of its own either.
        grad = (grad.float() * _row_scale(is_forget, *grads)[:, None]).to(grad.dtype)
    return grad, None, None, None, None, None, None, None, None, None


def _as_f32(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None else g.float().contiguous()


UNLEARN_LOSS = custom.register("unlearn_loss", _forward, _forward_fake, setup_context=_setup_context,
                               backward=_backward)
SCALE_GRAD = custom.register("unlearn_loss_scale_grad_", _scale_grad, lambda *args: None, mutates_args=("grad",))
