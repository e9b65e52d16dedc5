"""Multi-head attention between a transformer block's qkv and proj Linears.

qkv_attention takes the qkv projection as it comes, (B, T, 3 D), and returns the proj input as it
goes, (B, T, D): no permute on the way in, no transpose copy on the way out, and backward writes
the gradient straight into qkv's layout.

Backends: `cpu`, a fused kernel for the short sequences of masked encoders (MAE's encoder sees
1 + L/4 tokens: 17 on 16 px digits, 50 at 224 px), where ATen's flash kernel spends more on its
blocking than on the math; `torch`, scaled_dot_product_attention, which on GPUs is FlashAttention
or cuDNN: fastforget has no CUDA or Triton kernel of its own for attention and does not need one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.flop_counter import register_flop_formula

from ..errors import InvalidType, InvalidValue
from . import backends, custom
from .unlearn_loss import FLOAT_DTYPES

# The CPU kernel keeps a pair's tiles in cache: longer sequences are flash attention's work.
CPU_MAX_TOKENS, CPU_MAX_HEAD_DIM = 512, 256


def qkv_attention(qkv: Tensor, num_heads: int, *, backend: Optional[str] = None) -> Tensor:
    """(B, T, D): each head's softmax(q k^T / sqrt(head_dim)) v, heads side by side.

    qkv (B, T, 3 D), its last axis laid out (3, num_heads, head_dim) as timm's Attention.qkv
    writes it; float32, bfloat16 or float16, any strides. Equal to scaled_dot_product_attention
    of the unbound, transposed q, k, v, transposed back and flattened.
    """
    _check(qkv, num_heads)
    requested = backends.requested_backend(backend, implemented=("cpu", "torch"))
    name = _backend(requested, str(qkv.device), cpu_refusal(qkv, num_heads))
    if name == "torch":
        return sdpa_attention(qkv, num_heads)
    if custom.traced():
        return ATTENTION.op(qkv, num_heads, name)[0]
    return backends.native.ops(name).qkv_attention(qkv, num_heads)  # the cpu kernel, autograd in C++


def _check(qkv, num_heads) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise InvalidValue(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(qkv, Tensor):
        raise InvalidType(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise InvalidType(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")
    if qkv.dim() != 3 or qkv.shape[0] == 0 or qkv.shape[1] == 0 or qkv.shape[2] == 0 or qkv.shape[2] % (3 * num_heads):
        raise InvalidValue(f"qkv must be (B, T, 3 * num_heads * head_dim) with B, T, head_dim >= 1 and "
                         f"num_heads = {num_heads}, got {tuple(qkv.shape)}")


def cpu_refusal(qkv: Tensor, num_heads: int) -> str:
    """Why the CPU kernel cannot take qkv's shape ('' when it can). Under torch.compile the
    comparisons are guards, so dynamic sequence lengths stay dynamic."""
    tokens, head_dim = qkv.shape[1], qkv.shape[2] // (3 * num_heads)
    reasons = []
    if tokens > CPU_MAX_TOKENS:
        reasons.append(f"{tokens} tokens: the kernel is for sequences up to {CPU_MAX_TOKENS} "
                       f"(longer ones are flash attention's work: backend 'torch')")
    if head_dim > CPU_MAX_HEAD_DIM:
        reasons.append(f"head_dim {head_dim}: the kernel takes up to {CPU_MAX_HEAD_DIM}")
    return "; ".join(reasons)


# Chosen outside the custom op, since the torch backend is plain autograd (flash attention's own
# backward); torch.compile takes the choice as a constant instead of tracing the backend checks.
@torch.compiler.assume_constant_result
def _backend(requested: str, device: str, cpu_refusal: str) -> str:
    return backends.select("qkv_attention", requested, torch.device(device),
                           lambda name: not_supported(name, cpu_refusal))


def not_supported(name: str, cpu_refusal: str) -> list[str]:
    """Why backend `name` refuses attention on these inputs (empty when it takes them)."""
    if name in ("cuda", "triton"):
        return [f"no {name} kernel for attention: torch's scaled_dot_product_attention (FlashAttention, "
                f"cuDNN) is the fast path on GPUs (backend 'torch')"]
    return [cpu_refusal] if name == "cpu" and cpu_refusal else []


def sdpa_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """The torch backend, plain PyTorch: scaled_dot_product_attention on views of qkv."""
    batch, tokens, width = qkv.shape
    # unbind on the qkv axis, then transpose each: backward stacks the three gradients straight
    # into qkv's layout (one pass), where permute(2, 0, 3, 1, 4) adds a strided copy.
    q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, tokens, 3, num_heads, -1).unbind(2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width // 3)


def _forward(qkv: Tensor, num_heads: int, backend: str) -> tuple[Tensor, Tensor]:
    """(out (B, T, D), lse (B, heads, T) float32: each query row's log-sum-exp of its scores)."""
    return backends.native.ops(backend).qkv_attention_forward(qkv.contiguous(), num_heads)


def _forward_fake(qkv, num_heads, backend):
    batch, tokens, width = qkv.shape
    return qkv.new_empty((batch, tokens, width // 3)), qkv.new_empty((batch, num_heads, tokens), dtype=torch.float32)


def _backward_kernel(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, backend: str) -> Tensor:
    """d loss / d qkv, in qkv's layout, from the probabilities recomputed with lse."""
    return backends.native.ops(backend).qkv_attention_backward(
        grad_out.contiguous(), qkv.contiguous(), out, lse, num_heads)


def _backward_fake(grad_out, qkv, out, lse, num_heads, backend):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.num_heads, ctx.backend = num_heads, backend


def _backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return ATTENTION_BACKWARD.op(grad_out, qkv, out, lse, ctx.num_heads, ctx.backend), None, None


# Traced only: eager calls take the extension's op (attention's kernels are native only).
ATTENTION = custom.register("qkv_attention", _forward, _forward_fake, setup_context=_setup_context,
                            backward=_backward)
ATTENTION_BACKWARD = custom.register("qkv_attention_backward", _backward_kernel, _backward_fake)


# FLOPs for torch's FlopCounterMode (and so for MFU counts): q k^T and p v, 2 T^2 head_dim each per
# head; backward 2x forward (dq, dk, dv, dp), not counting the recomputed scores, as torch counts
# its own flash attention.
def _forward_flops(qkv_shape) -> int:
    batch, tokens, width = qkv_shape
    return 4 * batch * tokens * tokens * (width // 3)


@register_flop_formula(torch.ops.fastforget.qkv_attention)
def _(qkv_shape, num_heads, backend, out_shape=None, **kwargs) -> int:
    return _forward_flops(qkv_shape)


@register_flop_formula(torch.ops.fastforget.qkv_attention_backward)
def _(grad_out_shape, qkv_shape, saved_out_shape, lse_shape, num_heads, backend, **kwargs) -> int:
    return 2 * _forward_flops(qkv_shape)
