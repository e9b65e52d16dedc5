"""The teacher batch: one routed input for the single frozen-teacher pass.

Retain rows are the images bit for bit; forget rows are noise as the reference code makes it
(normal with the batch's mean and std, uniform over the clamp range, or the batch's mean), then
clamped. So the teacher's output is the right target for every row at once. Two passes over
memory (statistics, output) and no host synchronisation; the noise is fastforget's Philox stream
(csrc/common/philox.h), identical on every backend for the same generator state.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom, reference
from .unlearn_loss import FLOAT_DTYPES

NOISES = ("normal", "uniform", "constant")


def make_teacher_batch(
    images: Tensor,
    is_forget: Tensor,
    *,
    noise: str = "normal",
    clamp: Optional[tuple[float, float]] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
    first_row: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """A new batch: images' retain rows copied, forget rows replaced by clamped noise.

    images: (B, ...) float32, bfloat16 or float16. is_forget: (B,) bool or 0/1 integers, same device.
    noise: "normal" (randn * std + mean, over the whole batch), "uniform" (over the clamp range,
    [0, 1) without one) or "constant" (the batch's mean). clamp: (low, high) or None. generator:
    a torch.Generator on images' device (default: the device's default generator); one int64 seed
    is drawn from it on the device. first_row: where these rows start in a larger batch whose shards
    draw one stream (data parallelism: each rank passes rank * its batch size); the statistics
    stay this shard's, as the reference code's are per process. No gradient flows through (the
    teacher is frozen).
    """
    _check(images, is_forget, noise, clamp, generator)
    if isinstance(first_row, bool) or not isinstance(first_row, int) or first_row < 0:
        raise InvalidValue(f"first_row must be a non-negative int, got {first_row!r}")
    stream = noise_stream(images.device, generator, first_row * (images.numel() // images.shape[0]))
    flags = is_forget if is_forget.dtype == torch.bool else is_forget != 0
    lo, hi = (float(clamp[0]), float(clamp[1])) if clamp is not None else (None, None)
    call = TEACHER_BATCH.op if custom.traced() else TEACHER_BATCH.eager  # no autograd: the implementation itself
    return call(images.detach().contiguous(), flags.contiguous().view(torch.uint8), stream, NOISES.index(noise), lo, hi,
                backends.requested_backend(backend))


def noise_stream(device, generator: Optional[torch.Generator], first_element: int) -> Tensor:
    """(seed, first element) as two int64 on the device: the seed drawn there from generator, the
    index filled in by a kernel, so nothing crosses to or from the host."""
    stream = torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64, generator=generator)
    return stream.index_fill_(0, torch.ones(1, dtype=torch.int64, device=device), first_element)


def _check(images, is_forget, noise, clamp, generator) -> None:
    for name, t in (("images", images), ("is_forget", is_forget)):
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if images.dtype not in FLOAT_DTYPES:
        raise InvalidType(f"images must be float32, bfloat16 or float16, got {images.dtype}")
    if images.dim() < 2 or images.shape[0] == 0 or images[0].numel() == 0:
        raise InvalidValue(f"images must be (B, ...) with B >= 1 and elements in each row, got shape {tuple(images.shape)}")
    if is_forget.dtype.is_floating_point or is_forget.dtype.is_complex:
        raise InvalidType(f"is_forget must be bool or 0/1 integers, got {is_forget.dtype}")
    if is_forget.shape != images.shape[:1]:
        raise InvalidValue(f"is_forget must have shape ({images.shape[0]},) (one flag per image), got {tuple(is_forget.shape)}")
    if is_forget.device != images.device:
        raise InvalidValue(f"is_forget must be on images' device {images.device}, got {is_forget.device}")
    if noise not in NOISES:
        raise InvalidValue(f"noise must be one of {NOISES}, got {noise!r}")
    if clamp is not None:
        if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in clamp) or not clamp[0] < clamp[1]):
            raise InvalidValue(f"clamp must be None or (low, high) with finite low < high, got {clamp!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise InvalidType(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise InvalidValue(f"generator must be on images' device type {images.device.type}, got {generator.device}")


def _torch_impl(images, is_forget, stream, noise, clamp_lo, clamp_hi):
    clamp = (clamp_lo, clamp_hi) if clamp_lo is not None else None
    return reference.make_teacher_batch(images, is_forget, NOISES[noise], clamp, stream)


def _forward(images: Tensor, is_forget: Tensor, stream: Tensor, noise: int, clamp_lo: Optional[float],
             clamp_hi: Optional[float], backend: str) -> Tensor:
    """images (rows, ...) contiguous, is_forget (rows,) uint8, stream (2,) int64 on images' device."""
    name = backends.select("make_teacher_batch", backend, images.device)
    if name == "torch":
        return _torch_impl(images, is_forget, stream, noise, clamp_lo, clamp_hi)
    if name == "triton":
        from ..kernels import teacher_batch as kernel

        return kernel.make_teacher_batch(images, is_forget, stream, noise, clamp_lo, clamp_hi)
    return backends.native.ops(name).make_teacher_batch(images, is_forget, stream, noise, clamp_lo, clamp_hi)


def _forward_fake(images, is_forget, stream, noise, clamp_lo, clamp_hi, backend):
    return torch.empty_like(images)


TEACHER_BATCH = custom.register("make_teacher_batch", _forward, _forward_fake)
