"""`fastforget bench patch`: masked-patch encoding forward + parameter gradients, per provider.

Providers: `eager` (MAE's path: convolve every patch, add positions, gather the kept ones),
`compile` (torch.compile of it), and each fastforget backend. TFLOP/s counts the work the op must
do, on the kept patches only (forward and the weight gradient: 4 B K (C p p) D), against the
matmul rate measured in the same run.
"""
from __future__ import annotations

import torch

from ..ops import masked_patch_embed, random_masking, reference
from . import harness
from .timing import matmul_tflops


def make_inputs(batch, image, patch, dim, mask_ratio, dtype, device, channels=3, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    length = (image // patch) ** 2
    images = torch.rand(batch, channels, image, image, generator=gen).to(device)
    params = [
        (torch.randn(dim, channels, patch, patch, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
        torch.zeros(dim).to(device, dtype).requires_grad_(),
        (torch.randn(1, 1 + length, dim, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
        (torch.randn(1, 1, dim, generator=gen) * 0.02).to(device, dtype).requires_grad_(),
    ]
    ids_keep = random_masking(batch, length, mask_ratio, generator=gen)[0].to(device)
    return images, params, ids_keep


def flops(images, params, ids_keep) -> float:
    weight = params[0]
    return 4.0 * ids_keep.numel() * weight[0].numel() * weight.shape[0]


def measure(batch: int, image: int, patch: int, dim: int, mask_ratio: float, dtype: torch.dtype,
            device: torch.device, reps: int = 10) -> harness.Measured:
    images, params, ids_keep = make_inputs(batch, image, patch, dim, mask_ratio, dtype, device)
    weight, bias, pos, cls = params

    def step(fn):
        def run():
            out = fn(images, weight, bias, pos, ids_keep, cls)
            return torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out))
        return run

    eager = reference.masked_patch_embed
    providers = {"eager": step(eager), "compile": step(torch.compile(eager))}
    providers.update(harness.backend_providers(
        device, lambda name: step(lambda *a: masked_patch_embed(*a, backend=name))))
    ceiling = matmul_tflops(device, dtype)
    timed = harness.run(providers, device, flops(images, params, ids_keep) / 1e12, reps=reps)
    shape = f"B={batch} {image}px p={patch} D={dim} mask={mask_ratio}"
    return harness.measured("patch", "masked_patch_embed forward+backward", shape, dtype, device, timed, "TFLOP/s",
                            ceiling, "matmul rate")


def main(args) -> int:
    return harness.report(measure(args.batch_size, args.image_size, args.patch_size, args.dim, args.mask_ratio,
                                  getattr(torch, args.dtype), harness.device_of(args), args.reps), args.csv)
