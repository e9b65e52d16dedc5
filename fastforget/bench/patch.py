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


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    images, params, ids_keep = make_inputs(args.batch_size, args.image_size, args.patch_size, args.dim,
                                           args.mask_ratio, dtype, device)
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
    work = flops(images, params, ids_keep)
    ceiling = matmul_tflops(device, dtype)
    rows = harness.run(providers, device, work / 1e12, reps=args.reps)
    shape = f"B={args.batch_size} {args.image_size}px p={args.patch_size} D={args.dim} mask={args.mask_ratio}"
    print(harness.format_table(f"masked_patch_embed forward+backward, {shape} {args.dtype} on {device}", rows,
                               "TFLOP/s", ceiling, "matmul rate"))
    if args.csv:
        harness.append_csv(args.csv, "patch", shape.replace(" ", ";"), args.dtype, str(device), rows, "TFLOP/s",
                           ceiling)
    return 0
