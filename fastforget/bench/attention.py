"""`fastforget bench attention`: qkv_attention forward + backward, per provider.

Providers: `eager` (timm 0.3's attention, as the reference code runs it: q k^T * scale, softmax,
times v), `compile` (torch.compile of it), and each fastforget backend: `torch` is
scaled_dot_product_attention (FlashAttention or cuDNN on GPUs), `cpu` the fused kernel. TFLOP/s
counts forward (4 B T^2 D) and backward (twice that), against the matmul rate measured in the same
run. At MAE's short sequences no provider comes near it: the work per head is a few thousand
FLOPs, so this table is about time, not the roofline.
"""
from __future__ import annotations

import torch

from ..ops import attention, backends, qkv_attention, reference
from . import harness
from .timing import matmul_tflops


def measure(batch: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            reps: int = 10) -> harness.Measured:
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen).to(device, dtype).requires_grad_()
    upstream = torch.randn(batch, tokens, heads * head_dim, generator=gen).to(device, dtype)

    def step(fn):
        return lambda: torch.autograd.grad(fn(qkv, heads), qkv, upstream)

    providers = {"eager": step(reference.qkv_attention), "compile": step(torch.compile(reference.qkv_attention))}
    providers.update(harness.backend_providers(
        device, lambda name: step(lambda x, h: qkv_attention(x, h, backend=name))))
    for name in backends.BACKENDS:  # backends that run here but not attention (no GPU kernel): why
        refused = attention.not_supported(name, attention.cpu_refusal(qkv, heads))
        if refused and not isinstance(providers[name], str):
            providers[name] = "; ".join(refused)
    flops = 3 * 4 * batch * tokens * tokens * heads * head_dim
    timed = harness.run(providers, device, flops / 1e12, reps=reps)
    shape = f"B={batch} T={tokens} H={heads} d={head_dim}"
    return harness.measured("attention", "qkv_attention forward+backward", shape, dtype, device, timed, "TFLOP/s",
                            matmul_tflops(device, dtype), "matmul rate")


def main(args) -> int:
    return harness.report(measure(args.batch_size, args.tokens, args.heads, args.head_dim, getattr(torch, args.dtype),
                                  harness.device_of(args), args.reps), args.csv)
