"""`fastforget bench loss`: forward + backward of the forget/retain loss, per provider.

Providers: `eager` (the reference code's compute_loss with autograd), `compile` (torch.compile of
the same), and each fastforget backend that runs here. Bytes the op must move: read student and
one target per row, write the gradient; GB/s is that over the median time, beside the copy
bandwidth measured in the same run.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..ops import reference, unlearn_loss
from . import harness
from .timing import copy_bandwidth_gbs

DEFAULT_SHAPE = (256, 50, 1024)  # MAE ViT-L latents: batch, tokens, width


def make_inputs(shape, dtype, device, forget_fraction=0.5, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    retain = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    forget = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    is_forget = (torch.rand(shape[0], generator=gen) < forget_fraction).to(device)
    return student.requires_grad_(), retain, forget, is_forget


def bytes_moved(student) -> int:
    return 3 * student.numel() * student.element_size()


def providers(device: torch.device) -> dict:
    """name -> loss function of (student, retain, forget, is_forget), or the reason it is skipped."""
    def eager(s, r, f, m):
        return reference.reference_code_loss(s, r, f, m)

    found = {"eager": eager, "compile": torch.compile(eager)}
    found.update(harness.backend_providers(device, lambda name: lambda s, r, f, m: unlearn_loss(
        s, r, f, m, retain_weight=1.0, normalize="reference", backend=name).loss))
    return found


def measure(shape, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    inputs = make_inputs(tuple(shape), dtype, device)
    steps = {name: fn if isinstance(fn, str) else  # autograd.grad: the gradient itself, no accumulation
             (lambda fn=fn: torch.autograd.grad(fn(*inputs), inputs[0])) for name, fn in providers(device).items()}
    nbytes = bytes_moved(inputs[0])
    copy_gbs = copy_bandwidth_gbs(nbytes // 3, device)
    timed = harness.run(steps, device, nbytes / 1e9, reps=reps)
    return harness.measured("loss", "unlearn_loss forward+backward", "x".join(map(str, shape)), dtype, device, timed,
                            "GB/s", copy_gbs, "copy bandwidth")


# Palette's 13 encoder features at 256 px, per image: (channels, side)
PALETTE_FEATURES = [(64, 256)] * 3 + [(64, 128), (128, 128), (128, 128), (128, 64), (256, 64), (256, 64),
                                      (256, 32), (512, 32), (512, 32), (512, 32)]


def measure_features(batch: int, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    """Palette's loss over its 13 features in one call (normalize "batch"), against the reference's
    weighted_mse_loss: F.mse_loss of the row-masked copies, feature by feature."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    make = lambda c, s: torch.randn(batch, c, s, s, generator=gen).to(device, dtype)  # noqa: E731
    students = [make(c, s).requires_grad_() for c, s in PALETTE_FEATURES]
    targets = [make(c, s) for c, s in PALETTE_FEATURES]
    is_forget = (torch.arange(batch) % 2 == 0).to(device)
    labels = torch.where(is_forget, -1.0, 1.0).to(dtype)

    def eager(ss, ts):
        r, f = ((labels + 1) / 2).view(-1, 1, 1, 1), ((1 - labels) / 2).view(-1, 1, 1, 1)
        return sum(F.mse_loss(s * r, t * r) + 0.1 * F.mse_loss(s * f, t * f) for s, t in zip(ss, ts))

    def step(fn):
        return lambda: torch.autograd.grad(fn(students, targets), students)

    providers = {"eager": step(eager), "compile": step(torch.compile(eager))}
    providers.update(harness.backend_providers(device, lambda name: step(lambda ss, ts: unlearn_loss(
        ss, ts, ts, is_forget, forget_weight=0.1, normalize="batch", backend=name).loss)))
    nbytes = sum(bytes_moved(s) for s in students)
    copy_gbs = copy_bandwidth_gbs(nbytes // 3, device)
    timed = harness.run(providers, device, nbytes / 1e9, reps=reps)
    return harness.measured("loss", "unlearn_loss over Palette's 13 features, forward+backward",
                            f"B={batch} 13 features", dtype, device, timed, "GB/s", copy_gbs, "copy bandwidth")


def main(args) -> int:
    return harness.report(measure(args.shape, getattr(torch, args.dtype), harness.device_of(args), args.reps), args.csv)
