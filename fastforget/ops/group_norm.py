"""GroupNorm, scale-shift and SiLU as one op: the memory-bound chain of a diffusion UNet's ResBlock.

    y = act(GN(x; weight, bias) * (1 + scale) + shift),   act = SiLU or the identity

GroupNorm's statistics are per (image, group) over the group's channels and positions, in float32
whatever x's dtype (as Palette's GroupNorm32); scale and shift are per (image, channel), the
ResBlock's FiLM from the noise-level embedding. The reference chain reads and writes x five times
in forward (norm, cast, multiply, add, SiLU) and more in backward; fused, forward reads x once
for the statistics and once more for the output, and backward recomputes what it needs from x
and the saved statistics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom
from .unlearn_loss import FLOAT_DTYPES


def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float = 1e-5, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, silu: bool = True,
                    backend: Optional[str] = None) -> Tensor:
    """act(GroupNorm(x) * (1 + scale) + shift) in x's dtype, GroupNorm computed in float32.

    x: (B, C, ...) float32, bfloat16 or float16, C a multiple of groups. weight, bias: (C,) or None
    (no affine). scale, shift: (B, C) or None, broadcast over the positions (the FiLM of
    guided-diffusion's scale-shift norm). silu=False leaves the activation out. Gradients reach x,
    weight, bias, scale and shift.
    """
    _check(x, weight, bias, groups, eps, scale, shift)
    requested = backends.requested_backend(backend)
    args = (x, weight, bias, scale, shift, groups, float(eps), bool(silu))
    if custom.traced():
        return GROUP_NORM.op(*args, requested)[0]
    name = backends.select("group_norm_silu", requested, x.device)
    if name in backends.native.EXTENSIONS:  # autograd in C++
        return backends.native.ops(name).group_norm_silu(*args)
    return GROUP_NORM.eager(*args, name)[0]


def _check(x, weight, bias, groups, eps, scale, shift) -> None:
    if not isinstance(x, Tensor):
        raise InvalidType(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidType(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise InvalidValue(f"groups must be a positive int, got {groups!r}")
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0 or x.shape[1] % groups:
        raise InvalidValue(f"x must be (B, C, ...) with B >= 1, positions >= 1 and C a multiple of groups {groups}, "
                           f"got {tuple(x.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise InvalidValue(f"eps must be a number >= 0, got {eps!r}")
    batch, channels = x.shape[:2]
    for name, t, shape in (("weight", weight, (channels,)), ("bias", bias, (channels,)),
                           ("scale", scale, (batch, channels)), ("shift", shift, (batch, channels))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise InvalidValue(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidType(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != x.device:
            raise InvalidValue(f"{name} must be on x's device {x.device}, got {t.device}")


# ---------------------------------------------------------------------------------------------
# The torch backend: the algorithm in plain tensor ops, forward and backward (the kernels' spec).


def _grouped(x: Tensor, groups: int) -> Tensor:
    return x.reshape(x.shape[0], groups, -1)


def _channel(t: Optional[Tensor], x: Tensor, per_image: bool) -> Optional[Tensor]:
    """A (C,) or (B, C) parameter as float32 broadcastable against x (B, C, ...)."""
    if t is None:
        return None
    view = (t.shape[0], x.shape[1]) if per_image else (1, x.shape[1])
    return t.float().reshape(*view, *([1] * (x.dim() - 2)))


def _normalized(x, weight, bias, groups, mean, rstd) -> tuple[Tensor, Tensor]:
    """(x_hat, n = x_hat * weight + bias), float32, x's shape."""
    x_hat = ((_grouped(x.float(), groups) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    n = x_hat
    if weight is not None:
        n = n * _channel(weight, x, False)
    if bias is not None:
        n = n + _channel(bias, x, False)
    return x_hat, n


def _torch_forward(x, weight, bias, scale, shift, groups, eps, silu):
    g = _grouped(x.float(), groups)
    mean = g.mean(-1)
    rstd = torch.rsqrt(g.var(-1, unbiased=False) + eps)
    _, z = _normalized(x, weight, bias, groups, mean, rstd)
    if scale is not None:
        z = z * (1 + _channel(scale, x, True))
    if shift is not None:
        z = z + _channel(shift, x, True)
    y = torch.nn.functional.silu(z) if silu else z
    return y.to(x.dtype), mean, rstd


def _torch_backward(grad, x, weight, bias, scale, shift, mean, rstd, groups, silu):
    x_hat, n = _normalized(x, weight, bias, groups, mean, rstd)
    dz = grad.float()
    if silu:
        z = n * (1 + _channel(scale, x, True)) if scale is not None else n
        z = z + _channel(shift, x, True) if shift is not None else z
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    positions = tuple(range(2, x.dim()))
    d_shift = dz.sum(positions) if shift is not None else None
    d_scale = (dz * n).sum(positions) if scale is not None else None
    dn = dz * (1 + _channel(scale, x, True)) if scale is not None else dz
    d_weight = (dn * x_hat).sum((0,) + positions) if weight is not None else None
    d_bias = dn.sum((0,) + positions) if bias is not None else None
    dx_hat = dn * _channel(weight, x, False) if weight is not None else dn
    gd, gx = _grouped(dx_hat, groups), _grouped(x_hat, groups)
    dx = (gd - gd.mean(-1, keepdim=True) - gx * (gd * gx).mean(-1, keepdim=True)) * rstd[..., None]
    cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    return dx.reshape(x.shape).to(x.dtype), cast(d_weight, weight), cast(d_bias, bias), cast(d_scale, scale), \
        cast(d_shift, shift)


def _layout(x: Tensor) -> torch.memory_format:
    """channels_last for a (B, C, H, W) x laid out so (the CPU kernels take it as it is; outputs
    keep it on every backend), else contiguous."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _dense(x: Tensor, name: str) -> Tensor:
    """x as backend `name`'s kernels take it: the cpu's and torch's in its layout, the GPUs' contiguous."""
    return x.contiguous(memory_format=_layout(x) if name in ("cpu", "torch") else torch.contiguous_format)


def _impl(name: str, torch_fn, kernel: str):
    if name == "torch":
        return torch_fn
    if name == "triton":
        from ..kernels import group_norm as triton_kernels

        return getattr(triton_kernels, kernel)
    return getattr(backends.native.ops(name), f"group_norm_silu_{kernel}")


# ---------------------------------------------------------------------------------------------
# The custom ops (custom.register).


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
             shift: Optional[Tensor], groups: int, eps: float, silu: bool, backend: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean (B, G) float32, rstd (B, G) float32) of a contiguous x."""
    name = backends.select("group_norm_silu", backend, x.device)
    dense = lambda t: None if t is None else t.contiguous()  # noqa: E731
    y, mean, rstd = _impl(name, _torch_forward, "forward")(_dense(x, name), dense(weight), dense(bias), dense(scale),
                                                             dense(shift), groups, eps, silu)
    return y.contiguous(memory_format=_layout(x)), mean, rstd


def _forward_fake(x, weight, bias, scale, shift, groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=_layout(x)), stats, stats.clone()


def _backward_kernel(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor, rstd: Tensor, groups: int,
                     silu: bool, backend: str) -> list[Tensor]:
    """[d x, then d weight, d bias, d scale, d shift of those given]."""
    name = backends.select("group_norm_silu backward", backend, x.device)
    dense = lambda t: None if t is None else t.contiguous()  # noqa: E731
    x_dense = _dense(x, name)
    grads = _impl(name, _torch_backward, "backward")(grad.contiguous(memory_format=_layout(x_dense)), x_dense,
                                                       dense(weight), dense(bias), dense(scale), dense(shift), mean,
                                                       rstd, groups, silu)
    return [grads[0].contiguous(memory_format=_layout(x))] + [g for g in grads[1:] if g is not None]


def _backward_fake(grad, x, weight, bias, scale, shift, mean, rstd, groups, silu, backend):
    return [torch.empty_like(x, memory_format=_layout(x))] + [torch.empty_like(t) for t in (weight, bias, scale, shift)
                                                              if t is not None]


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, groups, _, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.groups, ctx.silu, ctx.backend = groups, silu, backend


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    call = BACKWARD.op if custom.traced() else BACKWARD.eager
    present = iter(call(grad, x, weight, bias, scale, shift, mean, rstd, ctx.groups, ctx.silu, ctx.backend))
    grads = [next(present)] + [None if t is None else next(present) for t in (weight, bias, scale, shift)]
    return (*grads, None, None, None, None)


GROUP_NORM = custom.register("group_norm_silu", _forward, _forward_fake, setup_context=_setup_context,
                             backward=_backward)
BACKWARD = custom.register("group_norm_silu_backward", _backward_kernel, _backward_fake)
