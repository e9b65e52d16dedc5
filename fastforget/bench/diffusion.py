"""`fastforget bench diffusion-inputs`: the diffusion step's student and teacher inputs, per provider.

Providers: `eager` (as Palette's reference Network.forward makes them: noise drawn, two q_samples,
with and without labels, the composites and concatenations), `compile` (torch.compile of it), and
each fastforget backend (the noise drawn in the kernel). Bytes the op must move: read y_0, the
condition and the mask, write both outputs; GB/s is that over the median time, beside the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import torch

from ..ops import make_diffusion_inputs
from . import harness
from .timing import copy_bandwidth_gbs

DEFAULT_SHAPE = (12, 3, 256, 256)  # Palette at 256 px, per-GPU batch 12


def eager_inputs(y_0, y_cond, mask, gammas, labels):
    noise = torch.randn_like(y_0)
    g = gammas.view(-1, 1, 1, 1)
    r, f = ((labels + 1) / 2).view(-1, 1, 1, 1), ((1 - labels) / 2).view(-1, 1, 1, 1)
    y_noisy = g.sqrt() * y_0 * r + (1 - g).sqrt() * noise + (1 - (1 - g).sqrt()) * noise * f
    y_orig = g.sqrt() * y_0 + (1 - g).sqrt() * noise
    return (torch.cat([y_cond, y_orig * mask + (1.0 - mask) * y_0], dim=1),
            torch.cat([y_cond, y_noisy * mask + (1.0 - mask) * y_0], dim=1))


def measure(shape, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    batch, _, height, width = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    y_0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device, dtype)
    y_cond = torch.randn(shape, generator=gen).to(device, dtype)
    mask = (torch.rand(batch, 1, height, width, generator=gen) > 0.5).to(device)
    gammas = torch.rand(batch, generator=gen).to(device)
    is_forget = (torch.arange(batch) % 2 == 0).to(device)
    labels = torch.where(is_forget, -1.0, 1.0)
    step_gen = torch.Generator(device=device).manual_seed(1)

    providers = {"eager": lambda: eager_inputs(y_0, y_cond, mask.to(torch.uint8), gammas, labels),
                 "compile": (lambda fn: lambda: fn(y_0, y_cond, mask.to(torch.uint8), gammas, labels))(
                     torch.compile(eager_inputs))}
    providers.update(harness.backend_providers(device, lambda name: lambda: make_diffusion_inputs(
        y_0, y_cond, mask, gammas, is_forget, generator=step_gen, backend=name)))
    nbytes = y_0.numel() * y_0.element_size() * 6 + mask.numel()
    copy_gbs = copy_bandwidth_gbs(y_0.numel() * y_0.element_size() * 2, device)
    timed = harness.run(providers, device, nbytes / 1e9, reps=reps)
    return harness.measured("diffusion_inputs", "make_diffusion_inputs (Philox noise, half forget)",
                            "x".join(map(str, shape)), dtype, device, timed, "GB/s", copy_gbs, "copy bandwidth")


def main(args) -> int:
    return harness.report(measure(args.shape, getattr(torch, args.dtype), harness.device_of(args), args.reps), args.csv)
