"""The diffusion family's step inputs: the student's and the routed teacher's, in one pass.

For Palette's unlearning step (its Network.forward with labels): each row gets a noise level
gamma, the inpainting mask m and noise eps; the student sees cat(y_cond, m * x_t + (1 - m) * y_0)
with x_t = sqrt(gamma) y_0 + sqrt(1 - gamma) eps, and the teacher the same on retain rows and, on
forget rows, the hole filled with eps itself: the original model's features of the image with
its hole pure noise are the forget target. The reference builds these with ~25 elementwise
kernels (two q_samples, the label multiplies, two composites, two concatenations); here one pass
writes both. The noise is fastforget's Philox stream (as make_teacher_batch's), drawn nowhere:
the same generator state gives the same inputs on every backend, with no host synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom, reference
from .teacher_batch import noise_stream
from .unlearn_loss import FLOAT_DTYPES


def make_diffusion_inputs(y_0: Tensor, y_cond: Tensor, mask: Tensor, gammas: Tensor, is_forget: Tensor, *,
                          noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                          first_row: int = 0, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(student input, teacher input), each (B, C_cond + C, H, W) in y_0's dtype.

    y_0: (B, C, H, W) the clean images (float32, bfloat16 or float16); y_cond: (B, C_cond, H, W)
    the condition; mask: (B, 1, H, W) or (B, C, H, W), 1 in the hole (bool, integers or floats);
    gammas: (B,) the noise levels; is_forget: (B,) bool or 0/1 integers. noise: (B, C, H, W) eps,
    or None: standard normal from fastforget's Philox stream, keyed by one seed drawn from
    generator on the device. first_row: where these rows start in a larger batch whose shards draw
    one stream (data parallelism: rank * its batch size). No gradient flows through.
    """
    _check(y_0, y_cond, mask, gammas, is_forget, noise, generator, first_row)
    flags = is_forget if is_forget.dtype == torch.bool else is_forget != 0
    hole = (mask != 0).to(torch.uint8)  # 0/1 for every backend: the torch one multiplies by it
    stream = noise_stream(y_0.device, generator, first_row * (y_0.numel() // y_0.shape[0]))
    given = noise is not None
    args = (y_0.detach().contiguous(), y_cond.detach().contiguous(), hole.contiguous(),
            gammas.detach().float().contiguous(), flags.contiguous().view(torch.uint8),
            noise.detach().contiguous() if given else y_0.new_empty(0), stream, given)
    call = DIFFUSION_INPUTS.op if custom.traced() else DIFFUSION_INPUTS.eager  # no autograd: the implementation
    student, teacher = call(*args, backends.requested_backend(backend))
    return student, teacher


def _check(y_0, y_cond, mask, gammas, is_forget, noise, generator, first_row) -> None:
    named = (("y_0", y_0), ("y_cond", y_cond), ("mask", mask), ("gammas", gammas), ("is_forget", is_forget))
    for name, t in named + ((("noise", noise),) if noise is not None else ()):
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != y_0.device:
            raise InvalidValue(f"{name} must be on y_0's device {y_0.device}, got {t.device}")
    for name, t in (("y_0", y_0), ("y_cond", y_cond), ("gammas", gammas)) + ((("noise", noise),) if noise is not None
                                                                              else ()):
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidType(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if y_0.dim() != 4 or y_0.numel() == 0:
        raise InvalidValue(f"y_0 must be (B, C, H, W) with no zero size, got {tuple(y_0.shape)}")
    batch, channels, height, width = y_0.shape
    if y_cond.dim() != 4 or y_cond.shape[0] != batch or y_cond.shape[2:] != y_0.shape[2:] or y_cond.shape[1] == 0:
        raise InvalidValue(f"y_cond must be ({batch}, C_cond >= 1, {height}, {width}), got {tuple(y_cond.shape)}")
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] not in (1, channels) or mask.shape[2:] != y_0.shape[2:]:
        raise InvalidValue(f"mask must be ({batch}, 1 or {channels}, {height}, {width}), got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise InvalidType(f"mask must be bool, integers or floats, got {mask.dtype}")
    if gammas.shape != (batch,):
        raise InvalidValue(f"gammas must have shape ({batch},) (one noise level per image), got {tuple(gammas.shape)}")
    if is_forget.dtype.is_floating_point or is_forget.dtype.is_complex:
        raise InvalidType(f"is_forget must be bool or 0/1 integers, got {is_forget.dtype}")
    if is_forget.shape != (batch,):
        raise InvalidValue(f"is_forget must have shape ({batch},) (one flag per image), got {tuple(is_forget.shape)}")
    if noise is not None and noise.shape != y_0.shape:
        raise InvalidValue(f"noise must have y_0's shape {tuple(y_0.shape)}, got {tuple(noise.shape)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidType(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != y_0.device.type:
        raise InvalidValue(f"generator must be on y_0's device type {y_0.device.type}, got {generator.device}")
    if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
        raise InvalidValue(f"first_row must be a non-negative int, got {first_row!r}")


def _torch_impl(y_0, y_cond, mask, gammas, is_forget, noise, stream, given):
    if not given:
        seed, first = stream
        noise = reference.teacher_noise(y_0.numel(), "normal", seed, y_0.device, first).view(y_0.shape)
    return reference.make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise)


def _forward(y_0: Tensor, y_cond: Tensor, mask: Tensor, gammas: Tensor, is_forget: Tensor, noise: Tensor,
             stream: Tensor, given: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Contiguous inputs; mask uint8; noise (B, C, H, W) when given, else empty (the stream's)."""
    name = backends.select("make_diffusion_inputs", backend, y_0.device)
    if name == "torch":
        return _torch_impl(y_0, y_cond, mask, gammas, is_forget, noise, stream, given)
    if name == "triton":
        from ..kernels import diffusion_inputs as kernel

        return kernel.make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise, stream, given)
    return tuple(backends.native.ops(name).make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise, stream,
                                                                 given))


def _forward_fake(y_0, y_cond, mask, gammas, is_forget, noise, stream, given, backend):
    shape = (y_0.shape[0], y_cond.shape[1] + y_0.shape[1], *y_0.shape[2:])
    return y_0.new_empty(shape), y_0.new_empty(shape)


DIFFUSION_INPUTS = custom.register("make_diffusion_inputs", _forward, _forward_fake)
