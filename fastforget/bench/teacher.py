"""`fastforget bench teacher`: the routed teacher batch, per provider.

Providers: `eager` (as the reference code makes it: randn_like * std + mean, where, clamp),
`compile` (torch.compile of it), and each fastforget backend. GB/s counts the bytes the op must
move: read the batch for its statistics, read the retain rows again, write the batch; against the
copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch

from ..ops import make_teacher_batch
from . import harness
from .timing import copy_bandwidth_gbs


def eager_teacher_batch(images, is_forget):
    noise = torch.randn_like(images) * images.std() + images.mean()
    return torch.where(is_forget.view(-1, 1, 1, 1), noise, images).clamp(0.0, 1.0)


def measure(batch: int, image: int, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(batch, 3, image, image, generator=gen).to(device, dtype)
    is_forget = (torch.arange(batch) % 2 == 0).to(device)

    providers = {"eager": lambda: eager_teacher_batch(images, is_forget),
                 "compile": (lambda fn: lambda: fn(images, is_forget))(torch.compile(eager_teacher_batch))}
    providers.update(harness.backend_providers(
        device, lambda name: lambda: make_teacher_batch(images, is_forget, backend=name)))
    retain_fraction = 1 - float(is_forget.float().mean())
    nbytes = images.numel() * images.element_size() * (2 + retain_fraction)
    copy_gbs = copy_bandwidth_gbs(images.numel() * images.element_size(), device)
    timed = harness.run(providers, device, nbytes / 1e9, reps=reps)
    shape = f"B={batch} 3x{image}x{image}"
    return harness.measured("teacher", "make_teacher_batch (normal noise, half forget)", shape, dtype, device, timed,
                            "GB/s", copy_gbs, "copy bandwidth")


def main(args) -> int:
    return harness.report(measure(args.batch_size, args.image_size, getattr(torch, args.dtype), harness.device_of(args),
                                  args.reps), args.csv)
