"""`fastforget bench group-norm`: GroupNorm, scale-shift and SiLU, forward + backward, per provider.

Providers: `eager` (Palette's reference chain: GroupNorm32 in float32 and cast back, then
(1 + scale) h + shift and SiLU as their own ops, with autograd), `compile` (torch.compile of it),
and each fastforget backend. Bytes the op must move: forward reads x twice (statistics, output)
and writes y; backward reads x and dy twice and writes dx. GB/s is that over the median time,
beside the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import InvalidValue
from ..ops import group_norm_silu
from . import harness
from .timing import copy_bandwidth_gbs

DEFAULT_SHAPE = (12, 64, 256, 256)  # Palette's first level at 256 px, per-GPU batch 12
GROUPS = 32


def eager_chain(x, weight, bias, scale, shift):
    h = F.group_norm(x.float(), GROUPS, weight, bias, 1e-5).type(x.dtype)
    return F.silu(h * (1 + scale[..., None, None]) + shift[..., None, None])


def measure(shape, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    batch, channels = shape[:2]
    if channels % GROUPS:
        raise InvalidValue(f"--shape: the channels must be a multiple of the {GROUPS} groups, got {channels}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
    weight, bias = (torch.randn(channels, generator=gen).to(device).requires_grad_() for _ in range(2))
    scale, shift = (torch.randn(batch, channels, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    inputs = (x, weight, bias, scale, shift)
    dy = torch.randn(shape, generator=gen).to(device, dtype)

    def step(fn):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)

    providers = {"eager": step(eager_chain), "compile": step(torch.compile(eager_chain))}
    providers.update(harness.backend_providers(device, lambda name: step(
        lambda x, w, b, sc, sh: group_norm_silu(x, w, b, GROUPS, scale=sc, shift=sh, backend=name))))
    nbytes = 7 * x.numel() * x.element_size()
    copy_gbs = copy_bandwidth_gbs(x.numel() * x.element_size(), device)
    timed = harness.run(providers, device, nbytes / 1e9, reps=reps)
    return harness.measured("group_norm", f"group_norm_silu forward+backward ({GROUPS} groups, FiLM, SiLU)",
                            "x".join(map(str, shape)), dtype, device, timed, "GB/s", copy_gbs, "copy bandwidth")


def main(args) -> int:
    return harness.report(measure(args.shape, getattr(torch, args.dtype), harness.device_of(args), args.reps), args.csv)
