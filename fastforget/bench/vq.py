"""vq_quantize (MAGE's VQGAN tokenizer) per provider, in `fastforget bench ops`.

Providers: `eager` (taming's VectorQuantizer2: the (N, K) distance matrix, then its argmin),
`compile` (torch.compile of it), and each fastforget backend (the GEMM with the argmin in its
epilogue). Work: the 2 N K e FLOPs of the distances' GEMM; TFLOP/s beside the float32 matmul rate
measured in the same run (the kernels multiply in float32, as the reference does).
"""
from __future__ import annotations

import torch

from ..ops import reference, vq_quantize
from . import harness
from .timing import matmul_tflops

MAGE_SHAPE = (64 * 256, 1024, 256)  # (N rows: 64 images of 16 x 16 tokens, K codes, e)


def measure(shape, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    rows, codes, dim = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    codebook = torch.randn(codes, dim, generator=gen).to(device)  # an nn.Embedding's float32
    z = torch.randn(rows, dim, generator=gen).to(device, dtype)
    providers = {"eager": lambda: reference.vq_quantize(z, codebook),
                 "compile": (lambda fn: lambda: fn(z, codebook))(torch.compile(reference.vq_quantize))}
    providers.update(harness.backend_providers(device, lambda name: lambda: vq_quantize(z, codebook, backend=name)))
    timed = harness.run(providers, device, 2 * rows * codes * dim / 1e12, reps=reps)
    return harness.measured("vq_quantize", f"vq_quantize ({codes} codes of {dim})", f"{rows}x{dim}", dtype, device,
                            timed, "TFLOP/s", matmul_tflops(device, torch.float32), "float32 matmul rate")
