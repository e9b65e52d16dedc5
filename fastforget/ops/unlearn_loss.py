"""The fused forget/retain feature-distance loss: validation, dispatch, custom op, autograd.

For one tensor of features (B, ...), with d_b = the row's mean of (student_b - target_b)^2 and
target_b the forget target on forget rows, the retain target on the others:

    L_R = norm_R * sum over retain rows of d_b,   L_F = norm_F * sum over forget rows of d_b
    L = w_R L_R + w_F L_F
    norm: "set" 1 / (rows in the set), "reference" 2 / B (the MAE reference code's compute_loss),
          "batch" 1 / B (Palette's weighted_mse_loss: F.mse_loss of row-masked tensors)

For lists of tensors (an encoder's feature maps), every output is the sum over the tensors of
that tensor's loss: each tensor weighs the same whatever its size. Any number of tensors go
through one multi-tensor pass.

The kernels write d L / d student in the forward pass (one pass over memory); backward rescales
it in place only when some output other than `loss` carries gradient, or `loss` carries a
gradient other than 1, and it decides that on the device (no host synchronisation).
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom

NORMALIZE = ("set", "reference", "batch")  # the kernels' codes are the indices
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Features = Union[Tensor, Sequence[Tensor]]


class UnlearnLossOutput(NamedTuple):
    loss: Tensor
    retain_loss: Tensor
    forget_loss: Tensor


def unlearn_loss(
    student: Features,
    retain_target: Features,
    forget_target: Features,
    is_forget: Tensor,
    *,
    retain_weight: float = 1.0,
    forget_weight: float = 0.2,
    normalize: str = "set",
    backend: Optional[str] = None,
) -> UnlearnLossOutput:
    """(loss, retain_loss, forget_loss), 0-d float32, of student features against their targets.

    student: (B, ...) float32, bfloat16 or float16, any strides, or a sequence of such tensors
    (one B). retain_target, forget_target: the same structure and shapes, any of those dtypes,
    treated as constants (no gradient); they may be the same tensors. is_forget: (B,) bool or 0/1
    integers, nonzero = forget row. normalize: "set", "reference" or "batch" (the module
    docstring). backend: None (fastest that fits), "torch", "triton", "cuda" or "cpu";
    FASTFORGET_BACKEND sets the default. For a sequence, each output is the sum of the tensors'.
    """
    students, retains, forgets = _as_lists(student, retain_target, forget_target)
    for s, r, f in zip(students, retains, forgets):
        _check(s, r, f, is_forget, normalize)
    retain_weight, forget_weight = _weight("retain_weight", retain_weight), _weight("forget_weight", forget_weight)
    batch = students[0].shape[0]
    pairs = [_common_dtype(r, f) for r, f in zip(retains, forgets)]  # the kernels read one target dtype a tensor
    flags = is_forget if is_forget.dtype == torch.bool else is_forget != 0
    args = ([_rows(s, batch) for s in students], [_rows(r.detach(), batch) for r, _ in pairs],
            [_rows(f.detach(), batch) for _, f in pairs], flags.contiguous().view(torch.uint8), retain_weight,
            forget_weight, NORMALIZE.index(normalize))
    requested = backends.requested_backend(backend)
    compute_grad = torch.is_grad_enabled() and any(s.requires_grad for s in students)
    if custom.traced():
        return UnlearnLossOutput(*UNLEARN_LOSS.op(*args, compute_grad, True, requested)[:3])
    name = backends.select("unlearn_loss", requested, students[0].device, lambda n: _not_supported(n, args[0]))
    if name in backends.native.EXTENSIONS:  # autograd in C++
        return UnlearnLossOutput(*backends.native.ops(name).unlearn_loss(*args))
    return UnlearnLossOutput(*_EagerLoss.apply(len(students), args[3:], compute_grad, name, *args[0], *args[1],
                                               *args[2]))


def _as_lists(student, retain_target, forget_target) -> tuple[list, list, list]:
    """The three arguments as lists of equal length (a tensor is a list of one)."""
    if isinstance(student, Tensor) or not isinstance(student, Sequence):
        return [student], [retain_target], [forget_target]
    if not student:
        raise InvalidValue("student must be a torch.Tensor or a non-empty sequence of tensors, got an empty sequence")
    for name, seq in (("student", student), ("retain_target", retain_target), ("forget_target", forget_target)):
        odd = [type(t).__name__ for t in (seq if isinstance(seq, Sequence) else ()) if not isinstance(t, Tensor)]
        if odd:
            raise InvalidType(f"{name} must be a torch.Tensor or a sequence of tensors, got a {type(seq).__name__} "
                              f"holding {odd[0]}")
    for name, t in (("retain_target", retain_target), ("forget_target", forget_target)):
        if isinstance(t, Tensor) or not isinstance(t, Sequence) or len(t) != len(student):
            got = f"a sequence of {len(t)}" if isinstance(t, Sequence) and not isinstance(t, Tensor) else type(t).__name__
            raise InvalidValue(f"{name} must be a sequence of {len(student)} tensors, as student is, got {got}")
    batches = {tuple(s.shape[:1]) for s in student if isinstance(s, Tensor)}
    if len(batches) > 1:
        raise InvalidValue(f"student's tensors must share the batch size B, got {sorted(b[0] for b in batches)}")
    return list(student), list(retain_target), list(forget_target)


def _common_dtype(retain: Tensor, forget: Tensor) -> tuple[Tensor, Tensor]:
    if forget.dtype == retain.dtype:
        return retain, forget
    common = torch.promote_types(retain.dtype, forget.dtype)  # the wider (bf16 with fp16: fp32), exact
    return retain.to(common), forget.to(common)


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
# Backends. Inputs: lists of (rows, cols_i) tensors with unit column stride; is_forget (rows,)
# uint8; normalize the index in NORMALIZE.

MAX_TENSORS = 32  # the GPU kernels' table of tensors per launch


def _not_supported(name: str, students: list[Tensor]) -> list[str]:
    """The GPU kernels walk one table of tensors of one student dtype (the CPU's takes any mix)."""
    if name in ("cuda", "triton"):
        if len({s.dtype for s in students}) > 1:
            return [f"the {name} kernel takes tensors of one dtype, got {sorted(str(s.dtype) for s in students)}"]
        if len(students) > MAX_TENSORS:
            return [f"the {name} kernel takes up to {MAX_TENSORS} tensors, got {len(students)}"]
    return []


def _norms(n_forget: Tensor, rows: int, normalize: int) -> tuple[Tensor, Tensor]:
    """(retain norm, forget norm) as 0-d float32 tensors on n_forget's device."""
    if normalize == 0:
        return 1.0 / (rows - n_forget).clamp(min=1).float(), 1.0 / n_forget.clamp(min=1).float()
    value = torch.full((), (2.0 if normalize == 1 else 1.0) / rows, device=n_forget.device)
    return value, value


def _torch_forward(students, retains, forgets, is_forget, retain_weight, forget_weight, normalize, compute_grad):
    forget_rows = is_forget.bool()
    rows = forget_rows.shape[0]
    norm_retain, norm_forget = _norms(forget_rows.sum(), rows, normalize)
    coef = torch.where(forget_rows, _grad_weight(forget_weight) * norm_forget,
                       _grad_weight(retain_weight) * norm_retain)
    retain_loss = forget_loss = torch.zeros((), device=is_forget.device)
    grads = []
    for student, retain, forget in zip(students, retains, forgets):
        cols = student.shape[1]
        diff = student.float() - torch.where(forget_rows[:, None], forget.float(), retain.float())
        row_sq = diff.square().sum(dim=1)
        retain_loss = retain_loss + torch.where(forget_rows, 0.0, row_sq).sum() / cols * norm_retain
        forget_loss = forget_loss + torch.where(forget_rows, row_sq, 0.0).sum() / cols * norm_forget
        if compute_grad:
            grads.append((diff * (coef * (2.0 / cols))[:, None]).to(student.dtype))
    loss = retain_weight * retain_loss + forget_weight * forget_loss
    return loss.float(), retain_loss.float(), forget_loss.float(), grads


def _grad_weight(w: float) -> float:
    return w if w != 0.0 else 1.0  # as csrc/common/unlearn_loss.h


def _row_scale(is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight) -> Tensor:
    """(rows,) float32: what each row's saved gradient is multiplied by in backward."""
    zero = torch.zeros((), device=is_forget.device)
    g = grad_loss if grad_loss is not None else zero
    scale_retain = (g * retain_weight + (grad_retain if grad_retain is not None else zero)) / _grad_weight(retain_weight)
    scale_forget = (g * forget_weight + (grad_forget if grad_forget is not None else zero)) / _grad_weight(forget_weight)
    return torch.where(is_forget.bool(), scale_forget, scale_retain)


def _torch_scale_grad_(grads, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight):
    scale = _row_scale(is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight)
    for grad in grads:
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
    students: list[Tensor], retain_targets: list[Tensor], forget_targets: list[Tensor], is_forget: Tensor,
    retain_weight: float, forget_weight: float, normalize: int, compute_grad: bool, inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(loss, retain_loss, forget_loss, grads) of (rows, cols_i) inputs, is_forget (rows,) uint8.

    grads are d loss / d student_i when compute_grad, else an empty list: the op's gradient
    workspace. With inplace_backward, eager backward rescales them in place (the caller must not
    read them); without, backward is functional.
    """
    name = backends.select("unlearn_loss", backend, students[0].device, lambda n: _not_supported(n, students))
    return _impl(name, _torch_forward, "forward", "unlearn_loss_forward")(
        students, retain_targets, forget_targets, is_forget, retain_weight, forget_weight, normalize, compute_grad)


def _forward_fake(students, retain_targets, forget_targets, is_forget, retain_weight, forget_weight, normalize,
                  compute_grad, inplace_backward, backend):
    scalar = students[0].new_empty((), dtype=torch.float32)
    return scalar, scalar.clone(), scalar.clone(), [torch.empty_like(s) for s in students] if compute_grad else []


def _scale_grad(
    grads: list[Tensor], is_forget: Tensor, grad_loss: Optional[Tensor], grad_retain: Optional[Tensor],
    grad_forget: Optional[Tensor], retain_weight: float, forget_weight: float, backend: str,
) -> None:
    name = backends.select("unlearn_loss backward", backend, is_forget.device)
    _impl(name, _torch_scale_grad_, "scale_grad_", "unlearn_loss_scale_grad")(
        grads, is_forget, grad_loss, grad_retain, grad_forget, retain_weight, forget_weight)


def _setup_context(ctx, inputs, output):
    students, _, _, is_forget, retain_weight, forget_weight, _, _, inplace_backward, backend = inputs
    grads = output[3]
    ctx.tensors = len(students)
    ctx.save_for_backward(*grads, is_forget)
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero-filled tensors
    ctx.retain_weight, ctx.forget_weight = retain_weight, forget_weight
    ctx.inplace_backward, ctx.backend = inplace_backward, backend


def _backward(ctx, grad_loss, grad_retain, grad_forget, _grad_of_grads):
    *grads, is_forget = ctx.saved_tensors
    scalars = (_as_f32(grad_loss), _as_f32(grad_retain), _as_f32(grad_forget), ctx.retain_weight, ctx.forget_weight)
    if ctx.inplace_backward and all(type(g) is torch.Tensor for g in grads):
        # Eager: rescale the saved gradients in place, skipped on the device when the scale is 1.
        # They are consumed: a second backward through the same graph is refused by autograd's
        # version check ("modified by an inplace operation"); sum the outputs instead.
        SCALE_GRAD.eager(grads, is_forget, *scalars, ctx.backend)
        for g in grads:
            torch.autograd.graph.increment_version(g)  # a Triton kernel's write is invisible to autograd
    else:
        # Traced (torch.compile, export) or asked: a functional multiply. Under torch.compile
        # Inductor fuses it into the consumer of the gradient: no pass of its own either.
        scale = _row_scale(is_forget, *scalars)[:, None]
        grads = [(g.float() * scale).to(g.dtype) for g in grads]
    none = [None] * ctx.tensors  # the targets' (lists, as the inputs are)
    return grads, none, list(none), None, None, None, None, None, None, None


def _as_f32(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None else g.float().contiguous()


UNLEARN_LOSS = custom.register("unlearn_loss", _forward, _forward_fake, setup_context=_setup_context,
                               backward=_backward)
SCALE_GRAD = custom.register("unlearn_loss_scale_grad_", _scale_grad, lambda *args: None, mutates_args=("grads",))


class _EagerLoss(torch.autograd.Function):
    """The eager path of the torch and Triton backends: autograd.Function sees only tensors passed
    as arguments, so the lists come flat: n students, n retain targets, n forget targets."""

    @staticmethod
    def forward(ctx, n, rest, compute_grad, backend, *tensors):
        is_forget, retain_weight, forget_weight, normalize = rest
        lists = (list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:]))
        inputs = (*lists, is_forget, retain_weight, forget_weight, normalize, compute_grad, True, backend)
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output[:3]

    @staticmethod
    def backward(ctx, grad_loss, grad_retain, grad_forget):
        grads = _backward(ctx, grad_loss, grad_retain, grad_forget, None)[0]
        return (None, None, None, None, *grads, *([None] * (2 * ctx.tensors)))
