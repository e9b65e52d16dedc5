"""MAGE's token embedding with token dropping: the gather of the kept positions, the word and
position embeddings and their LayerNorm as one op.

    E[b, 0]     = LN(word[class_id] + pos[0])
    E[b, 1 + j] = LN(word[id] + pos[1 + keep[b, j]]),  id = mask_id if masked[b, j] else tokens[b, keep[b, j]]

(jpmorganchase/i2i_mage models_mage.py BertEmbeddings, eps 1e-6; its dropout stays in the
model). Dropped positions are never embedded. The sum and the statistics are float32 whatever
the weights' dtype. Forward saves each row's mean and rstd; backward recomputes the row from the
ids, runs LayerNorm's backward and adds each row's gradient into the word and position rows it
read (float32 sums, cast to the weights' dtype at the end). Row 0's word row is class_id's, and
every masked row adds into mask_id's, so those rows collect many gradients.

Determinism: the kernels give the same bits on every run, with no atomics. The CPU's sum each
word or position row in one task, in row order, for any thread count. The cuda and triton backward
write each row's dx (float32), sort the rows by the word row and the position row they read (a
stable torch.sort and searchsorted on the device: fixed shapes, no host synchronisation) and sum
each weight row's sources in a fixed order in a segment-sum kernel, one block (program) a weight
row and column tile. The torch backend repeats itself on the CPU; on CUDA its index_add_ adds with
atomics (outside torch's deterministic mode), so its weight gradients may differ in the last bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom, reference
from .unlearn_loss import FLOAT_DTYPES


def token_embed(tokens: Tensor, keep: Tensor, masked: Tensor, word_weight: Tensor, pos_weight: Tensor,
                ln_weight: Tensor, ln_bias: Tensor, *, class_id: int, mask_id: int, eps: float = 1e-6,
                backend: Optional[str] = None) -> Tensor:
    """(B, 1 + K, D): LayerNorm(word_weight[ids] + pos_weight[positions]) of the class token and
    the kept positions, in word_weight's dtype, computed in float32.

    tokens: (B, L) int64, the image's VQ token ids in raster order, in [0, V).
    keep: (B, K) int64, the kept image positions in [0, L); output row 1 + j is keep[b, j]'s
    (the caller passes them ascending). keep = arange(L) for every row is the whole image (eval).
    masked: (B, K) bool, which kept positions carry mask_id instead of their token.
    word_weight: (V, D); pos_weight: (1 + L, D), row 0 the class position; ln_weight, ln_bias:
    (D,). float32, bfloat16 or float16, all one dtype, all on tokens' device.
    class_id, mask_id: ints in [0, V). eps: LayerNorm's (biased variance, as F.layer_norm).

    Row 0 of each sample is LN(word_weight[class_id] + pos_weight[0]); row 1 + j is
    LN(word_weight[id] + pos_weight[1 + keep[b, j]]) with id = mask_id if masked[b, j] else
    tokens[b, keep[b, j]]. Gradients reach word_weight (every row used, class_id's and mask_id's
    included), pos_weight, ln_weight and ln_bias; tokens, keep and masked get none. On CPU tensors
    tokens and keep out of range are a ValueError; on a GPU (no host synchronisation to check them)
    the cuda and triton kernels write such a row as NaN and add no gradient from it (the torch
    backend fails as indexing does).
    """
    _check(tokens, keep, masked, word_weight, pos_weight, ln_weight, ln_bias, class_id, mask_id, eps)
    requested = backends.requested_backend(backend)
    args = (tokens, keep, masked, word_weight, pos_weight, ln_weight, ln_bias, int(class_id), int(mask_id), float(eps))
    if custom.traced():
        return TOKEN_EMBED.op(*args, requested)[0]
    name = _select("token_embed", requested, tokens.device, word_weight.shape[1])
    if name in backends.native.EXTENSIONS:  # autograd in C++
        return backends.native.ops(name).token_embed(*args)
    return TOKEN_EMBED.eager(*args, name)[0]


CUDA_MAX_DIM = 4096  # csrc/cuda/token_embed.h's kTokenEmbedMaxDim: 512 threads of 8 elements a row


def _select(op: str, requested: str, device: torch.device, dim: int) -> str:
    """The backend for a row width dim: any but cuda's past CUDA_MAX_DIM (the usual choice, once per device)."""
    if dim <= CUDA_MAX_DIM:
        return backends.select(op, requested, device)
    why = [f"the cuda kernel takes D <= {CUDA_MAX_DIM}, got {dim}"]
    return backends.select(op, requested, device, lambda name: why if name == "cuda" else [])


def _check(tokens, keep, masked, word_weight, pos_weight, ln_weight, ln_bias, class_id, mask_id, eps) -> None:
    arguments = (("tokens", tokens), ("keep", keep), ("masked", masked), ("word_weight", word_weight),
                 ("pos_weight", pos_weight), ("ln_weight", ln_weight), ("ln_bias", ln_bias))
    for name, t in arguments:
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = tokens.device
    for name, t in arguments[1:]:
        if t.device != device:
            raise InvalidValue(f"{name} must be on tokens' device {device}, got {t.device}")
    for name, t, dtype in (("tokens", tokens, torch.int64), ("keep", keep, torch.int64),
                           ("masked", masked, torch.bool)):
        if t.dtype != dtype:
            raise InvalidType(f"{name} must be {dtype}, got {t.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise InvalidValue(f"tokens must be (B, L) with B, L >= 1, got {tuple(tokens.shape)}")
    batch, length = tokens.shape
    if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] == 0:
        raise InvalidValue(f"keep must be (B={batch}, K) with K >= 1, got {tuple(keep.shape)}")
    if masked.shape != keep.shape:
        raise InvalidValue(f"masked must have keep's shape {tuple(keep.shape)}, got {tuple(masked.shape)}")
    if word_weight.dtype not in FLOAT_DTYPES:
        raise InvalidType(f"word_weight must be float32, bfloat16 or float16, got {word_weight.dtype}")
    if word_weight.dim() != 2 or word_weight.shape[0] == 0 or word_weight.shape[1] == 0:
        raise InvalidValue(f"word_weight must be (V, D) with V, D >= 1, got {tuple(word_weight.shape)}")
    vocab, dim = word_weight.shape
    for name, t, shape in (("pos_weight", pos_weight, (1 + length, dim)), ("ln_weight", ln_weight, (dim,)),
                           ("ln_bias", ln_bias, (dim,))):
        if tuple(t.shape) != shape:
            what = f" (1 + L positions, D = word_weight's width)" if name == "pos_weight" else ""
            raise InvalidValue(f"{name} must have shape {shape}{what}, got {tuple(t.shape)}")
        if t.dtype != word_weight.dtype:
            raise InvalidType(f"{name} must have word_weight's dtype {word_weight.dtype}, got {t.dtype}")
    for name, v in (("class_id", class_id), ("mask_id", mask_id)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise InvalidValue(f"{name} must be an int in [0, {vocab}) (word_weight's rows), got {v!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise InvalidValue(f"eps must be a number >= 0, got {eps!r}")
    # The values only where reading them is cheap: on a GPU it would take a host synchronisation (or
    # a device-side assert, which leaves the CUDA context unusable); there the kernels make a row
    # whose keep entry or token is out of range NaN instead, and add no gradient from it.
    if device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(tokens):  # fake: no values
        for name, t, high in (("tokens", tokens, vocab), ("keep", keep, length)):
            low_seen, high_seen = (int(v) for v in torch.aminmax(t))
            if low_seen < 0 or high_seen >= high:
                raise InvalidValue(f"{name} must lie in [0, {high}), got values from {low_seen} to {high_seen}")


# ---------------------------------------------------------------------------------------------
# The torch backend: the algorithm in plain tensor ops, forward and backward (the kernels' spec).


def _rows(tokens, keep, masked, word, pos, class_id, mask_id) -> tuple[Tensor, Tensor, Tensor]:
    """(x (B, 1 + K, D) float32, word ids, positions): the rows before the norm."""
    ids, positions = reference.token_embed_ids(tokens, keep, masked, class_id, mask_id)
    return word[ids].float() + pos[positions].float(), ids, positions


def _torch_forward(tokens, keep, masked, word, pos, ln_weight, ln_bias, class_id, mask_id, eps):
    x, _, _ = _rows(tokens, keep, masked, word, pos, class_id, mask_id)
    mean = x.mean(-1)
    rstd = torch.rsqrt(x.var(-1, unbiased=False) + eps)
    y = (x - mean[..., None]) * rstd[..., None] * ln_weight.float() + ln_bias.float()
    return y.to(word.dtype), mean, rstd


def _torch_backward(grad, tokens, keep, masked, word, pos, ln_weight, mean, rstd, class_id, mask_id):
    x, ids, positions = _rows(tokens, keep, masked, word, pos, class_id, mask_id)
    x_hat = (x - mean[..., None]) * rstd[..., None]
    dy = grad.float()
    d_ln_weight = (dy * x_hat).sum((0, 1))
    d_ln_bias = dy.sum((0, 1))
    dx_hat = dy * ln_weight.float()
    dx = (dx_hat - dx_hat.mean(-1, keepdim=True) - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True)) * rstd[..., None]
    dx = dx.reshape(-1, dx.shape[-1])
    d_word = torch.zeros(word.shape, dtype=torch.float32, device=word.device).index_add_(0, ids.reshape(-1), dx)
    d_pos = torch.zeros(pos.shape, dtype=torch.float32, device=pos.device).index_add_(0, positions.reshape(-1), dx)
    dtype = word.dtype
    return d_word.to(dtype), d_pos.to(dtype), d_ln_weight.to(dtype), d_ln_bias.to(dtype)


def _impl(name: str, torch_fn, kernel: str):
    if name == "torch":
        return torch_fn
    if name == "triton":
        from ..kernels import token_embed as triton_kernels

        return getattr(triton_kernels, kernel)
    return getattr(backends.native.ops(name), f"token_embed_{kernel}")


# ---------------------------------------------------------------------------------------------
# The custom ops (custom.register). The kernels take dense tensors: copies only where the
# caller's are not.


def _forward(tokens: Tensor, keep: Tensor, masked: Tensor, word_weight: Tensor, pos_weight: Tensor,
             ln_weight: Tensor, ln_bias: Tensor, class_id: int, mask_id: int, eps: float, backend: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, 1 + K, D), mean (B, 1 + K) float32, rstd (B, 1 + K) float32)."""
    name = _select("token_embed", backend, tokens.device, word_weight.shape[1])
    tensors = (tokens, keep, masked, word_weight, pos_weight, ln_weight, ln_bias)
    if name != "torch":
        tensors = tuple(t.contiguous() for t in tensors)
    return _impl(name, _torch_forward, "forward")(*tensors, class_id, mask_id, eps)


def _forward_fake(tokens, keep, masked, word_weight, pos_weight, ln_weight, ln_bias, class_id, mask_id, eps, backend):
    rows = (keep.shape[0], 1 + keep.shape[1])
    stats = keep.new_empty(rows, dtype=torch.float32)
    return word_weight.new_empty((*rows, word_weight.shape[1])), stats, stats.clone()


def _backward_kernel(grad: Tensor, tokens: Tensor, keep: Tensor, masked: Tensor, word_weight: Tensor,
                     pos_weight: Tensor, ln_weight: Tensor, mean: Tensor, rstd: Tensor, class_id: int, mask_id: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d word_weight, d pos_weight, d ln_weight, d ln_bias), each its weight's dtype."""
    name = _select("token_embed backward", backend, tokens.device, word_weight.shape[1])
    tensors = (grad, tokens, keep, masked, word_weight, pos_weight, ln_weight, mean, rstd)
    if name != "torch":
        tensors = tuple(t.contiguous() for t in tensors)
    return _impl(name, _torch_backward, "backward")(*tensors, class_id, mask_id)


def _backward_fake(grad, tokens, keep, masked, word_weight, pos_weight, ln_weight, mean, rstd, class_id, mask_id,
                   backend):
    return (torch.empty_like(word_weight), torch.empty_like(pos_weight), torch.empty_like(ln_weight),
            torch.empty_like(ln_weight))


def _setup_context(ctx, inputs, output):
    tokens, keep, masked, word_weight, pos_weight, ln_weight, _, class_id, mask_id, _, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(tokens, keep, masked, word_weight, pos_weight, ln_weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.class_id, ctx.mask_id, ctx.backend = class_id, mask_id, backend


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    tokens, keep, masked, word_weight, pos_weight, ln_weight, mean, rstd = ctx.saved_tensors
    call = BACKWARD.op if custom.traced() else BACKWARD.eager
    grads = call(grad, tokens, keep, masked, word_weight, pos_weight, ln_weight, mean, rstd, ctx.class_id,
                 ctx.mask_id, ctx.backend)
    needs = ctx.needs_input_grad[3:7]
    d_word, d_pos, d_ln_weight, d_ln_bias = (g if need else None for g, need in zip(grads, needs))
    return None, None, None, d_word, d_pos, d_ln_weight, d_ln_bias, None, None, None, None


TOKEN_EMBED = custom.register("token_embed", _forward, _forward_fake, setup_context=_setup_context,
                              backward=_backward)
BACKWARD = custom.register("token_embed_backward", _backward_kernel, _backward_fake)
