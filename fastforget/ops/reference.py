"""The readable PyTorch definitions of fastforget's ops: the ground truth for tests and benchmarks.

Slow on purpose: every step is a plain tensor op, so each line can be checked against the paper
(Li, Hsu, Chen, Marculescu, ICLR 2024) and the reference code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidValue


def unlearn_loss(
    student: Tensor,
    retain_target: Tensor,
    forget_target: Tensor,
    is_forget: Tensor,
    retain_weight: float = 1.0,
    forget_weight: float = 0.2,
    normalize: str = "set",
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, retain_loss, forget_loss), each a 0-d float32 tensor.

    student, retain_target, forget_target: (B, ...) of one shape. is_forget: (B,), nonzero = forget.
    d_b = mean over the non-batch elements of (student_b - target_b)^2, where target_b is the
    forget target on forget rows and the retain target on retain rows, in float32.
    normalize="set": each loss is the mean of d_b over its own rows (0 for an empty set).
    normalize="reference": each loss is (2/B) * sum of d_b over its rows, as the reference code's
    compute_loss (per-sample mean, weights 1 - label and 1 + label, mean over the batch).
    upcast=False computes in the inputs' own dtype: the "same-precision PyTorch" yardstick of the
    low-precision tests.
    """
    forget = is_forget.bool()
    batch = student.shape[0]
    target = torch.where(forget.view(-1, *([1] * (student.dim() - 1))), forget_target, retain_target)
    diff = student.float() - target.float() if upcast else student - target.to(student.dtype)
    d = diff.pow(2).reshape(batch, -1).mean(dim=1)
    if normalize == "set":
        n_forget = forget.sum()
        n_retain = batch - n_forget
        retain_loss = torch.where(forget, 0.0, d).sum() / n_retain.clamp(min=1)
        forget_loss = torch.where(forget, d, 0.0).sum() / n_forget.clamp(min=1)
    elif normalize == "reference":
        retain_loss = torch.where(forget, 0.0, d).sum() * (2.0 / batch)
        forget_loss = torch.where(forget, d, 0.0).sum() * (2.0 / batch)
    else:
        raise InvalidValue(f"normalize must be 'set' or 'reference', got {normalize!r}")
    loss = retain_weight * retain_loss + forget_weight * forget_loss
    return loss, retain_loss, forget_loss


def reference_code_loss(
    student: Tensor, retain_target: Tensor, forget_target: Tensor, is_forget: Tensor, forget_weight: float = 0.2
) -> Tensor:
    """The reference code's compute_loss as it is written: the baseline that benchmarks time.

    The target is the forget target on forget rows and the retain target on the others; label is 1
    on forget rows and -1 on retain rows; the per-sample mean squared error is weighted (1 - label)
    on retain rows and forget_weight * (1 + label) on forget rows, then averaged over the batch.
    It equals unlearn_loss(..., retain_weight=1, normalize="reference").loss.
    """
    label = is_forget.float() * 2 - 1
    target = torch.where(is_forget.bool().view(-1, *([1] * (student.dim() - 1))), forget_target, retain_target)
    per_sample = ((student.float() - target.float()) ** 2).reshape(student.shape[0], -1).mean(dim=1)
    return ((1 - label) * per_sample + forget_weight * (1 + label) * per_sample).mean()


# ---------------------------------------------------------------------------------------------
# The teacher batch and its noise stream (csrc/common/philox.h, in tensor arithmetic on int64).

_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32 bits of a * m for uint32 values a (held in int64) and a uint32 constant m,
    split in 16-bit halves so no product passes 2^63."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    a_hi, a_lo = a * m_hi, a * m_lo
    high = (a_hi + (a_lo >> 16)) >> 16
    low = (a_lo + ((a_hi & 0xFFFF) << 16)) & _MASK32
    return high, low


def philox4x32_10(counter: Tensor, seed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of non-negative int64 counters under an int64 seed: four uint32 (int64) blocks."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mul32(c0, 0xD2511F53)
        hi2, lo2 = _mul32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def teacher_noise(numel: int, noise: str, seed: Tensor, device, first: Tensor | int = 0) -> Tensor:
    """float32 noise for flat indices first .. first+numel-1: standard normal, or uniform in [0, 1)."""
    i = torch.arange(numel, device=device, dtype=torch.int64) + first
    if noise == "normal":
        r0, r1, r2, r3 = philox4x32_10(i >> 1, seed)
        odd = (i & 1) == 1
        a, b = torch.where(odd, r2, r0), torch.where(odd, r3, r1)
        u1 = ((a >> 8) + 1).float() * 2.0**-24
        u2 = (b >> 8).float() * 2.0**-24
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    r = torch.stack(philox4x32_10(i >> 2, seed), dim=1).gather(1, (i & 3)[:, None])[:, 0]
    return (r >> 8).float() * 2.0**-24


def make_teacher_batch(
    images: Tensor, is_forget: Tensor, noise: str = "normal", clamp: Optional[tuple[float, float]] = (0.0, 1.0),
    stream: Tensor | tuple[int, int] = (0, 0),
) -> Tensor:
    """Retain rows as they are; forget rows replaced by noise as the reference code makes it, from
    fastforget's Philox stream (seed, flat index of the first element), then everything clamped to
    `clamp` (None: no clamp).

    normal: randn * std(images) + mean(images), over the whole batch (std unbiased, as torch.std);
    uniform: uniform over the clamp range ([0, 1) without one); constant: mean(images) everywhere.
    """
    seed, first = torch.as_tensor(stream, dtype=torch.int64, device=images.device).reshape(2)
    x = images.double()
    mean, std = x.mean().float(), x.std().float()
    lo, hi = clamp if clamp is not None else (0.0, 1.0)
    if noise == "normal":
        values = teacher_noise(images.numel(), "normal", seed, images.device, first) * std + mean
    elif noise == "uniform":
        values = lo + teacher_noise(images.numel(), "uniform", seed, images.device, first) * (hi - lo)
    elif noise == "constant":
        values = mean.expand(images.numel())
    else:
        raise InvalidValue(f"noise must be 'normal', 'uniform' or 'constant', got {noise!r}")
    if clamp is not None:
        values = values.clamp(lo, hi)
    forget = is_forget.bool().view(-1, *([1] * (images.dim() - 1)))
    return torch.where(forget, values.view(images.shape).to(images.dtype), images)


# ---------------------------------------------------------------------------------------------
# MAE's masking and patch embedding (facebookresearch/mae, models_mae.py).


def random_masking(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's random_masking given its noise (B, L): keep the int(L (1 - mask_ratio)) patches of
    smallest noise. Returns ids_keep (B, K), ids_restore (B, L), mask (B, L) with 1 = removed."""
    batch, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def masked_patch_embed(
    images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor, ids_keep: Tensor,
    cls_token: Optional[Tensor] = None,
) -> Tensor:
    """MAE's path: convolve every patch, add positions, keep ids_keep, prepend cls + its position."""
    patch = weight.shape[-1]
    x = torch.nn.functional.conv2d(images.to(weight.dtype), weight, bias, stride=patch).flatten(2).transpose(1, 2)
    x = x + pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
    if cls_token is not None:
        cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
    return x


def qkv_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """timm's Attention between its qkv and proj Linears: qkv (B, T, 3 D) laid out (3, heads,
    head_dim) on the last axis -> (B, T, D) laid out (heads, head_dim), each head
    softmax(q k^T / sqrt(head_dim)) v, with the softmax written out."""
    batch, tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


# ---------------------------------------------------------------------------------------------
# MAGE's token embedding (jpmorganchase/i2i_mage, models_mage.py BertEmbeddings), kept rows only.


def token_embed_ids(tokens: Tensor, keep: Tensor, masked: Tensor, class_id: int, mask_id: int
                    ) -> tuple[Tensor, Tensor]:
    """(word ids, positions), each (B, 1 + K) int64: row 0 the class token at position 0, row
    1 + j the kept position keep[b, j] (its pos_weight row 1 + keep) carrying mask_id where
    masked[b, j], else its own token."""
    batch = tokens.shape[0]
    kept = torch.where(masked, torch.full_like(keep, mask_id), torch.gather(tokens, 1, keep))
    ids = torch.cat([torch.full((batch, 1), class_id, dtype=torch.int64, device=tokens.device), kept], dim=1)
    positions = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)
    return ids, positions


def token_embed(tokens: Tensor, keep: Tensor, masked: Tensor, word_weight: Tensor, pos_weight: Tensor,
                ln_weight: Tensor, ln_bias: Tensor, class_id: int, mask_id: int, eps: float = 1e-6,
                upcast: bool = True) -> Tensor:
    """LayerNorm(word_weight[ids] + pos_weight[positions]) (B, 1 + K, D) in word_weight's dtype.
    upcast=True sums and normalises in float32 or wider (the op's precision); upcast=False sums in
    the weights' dtype as MAGE does: the same-precision yardstick of the low-precision tests."""
    ids, positions = token_embed_ids(tokens, keep, masked, class_id, mask_id)
    dtype = torch.promote_types(word_weight.dtype, torch.float32) if upcast else word_weight.dtype
    x = torch.nn.functional.embedding(ids, word_weight.to(dtype)) + torch.nn.functional.embedding(
        positions, pos_weight.to(dtype))
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_weight.to(dtype), ln_bias.to(dtype),
                                          eps).to(word_weight.dtype)


# ---------------------------------------------------------------------------------------------
# The diffusion family's ops (Palette: jpmorganchase/i2i_Palette-Image-to-Image-Diffusion-Models).


def group_norm_silu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float = 1e-5,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, silu: bool = True,
                    upcast: bool = True) -> Tensor:
    """guided-diffusion's chain: GroupNorm32 (in float32, cast back to x's dtype), * (1 + scale)
    + shift per (image, channel), SiLU. upcast=True keeps everything in float32 to the end (the
    op's own precision); upcast=False rounds where the reference model does (after the norm, then
    in x's dtype): the same-precision yardstick of the low-precision tests."""
    h = torch.nn.functional.group_norm(x.float(), groups, None if weight is None else weight.float(),
                                       None if bias is None else bias.float(), eps)
    dtype = torch.float32 if upcast else x.dtype
    h = h.to(dtype)
    spread = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.to(dtype).reshape(spread))
    if shift is not None:
        h = h + shift.to(dtype).reshape(spread)
    if silu:
        h = h * torch.sigmoid(h)
    return h.to(x.dtype)


def make_diffusion_inputs(y_0: Tensor, y_cond: Tensor, mask: Tensor, gammas: Tensor, is_forget: Tensor,
                          noise: Tensor) -> tuple[Tensor, Tensor]:
    """(student input, teacher input), each cat(y_cond, noisy) with noisy = m * x_t + (1 - m) * y_0,
    as the reference's Network.forward builds them (q_sample with labels):
    student: x_t = sqrt(gamma) y_0 + sqrt(1 - gamma) noise, on every row;
    teacher: the same on retain rows; on forget rows x_t = noise itself (pure N(0, 1) in the hole)."""
    shape = (-1,) + (1,) * (y_0.dim() - 1)
    g = gammas.float().reshape(shape)
    m = mask.float()
    x_t = g.sqrt() * y_0.float() + (1 - g).sqrt() * noise.float()
    forget_x_t = torch.where(is_forget.bool().reshape(shape), noise.float(), x_t)
    student = m * x_t + (1 - m) * y_0.float()
    teacher = m * forget_x_t + (1 - m) * y_0.float()
    dtype = y_0.dtype
    return (torch.cat([y_cond.to(dtype), student.to(dtype)], dim=1),
            torch.cat([y_cond.to(dtype), teacher.to(dtype)], dim=1))


# ---------------------------------------------------------------------------------------------
# MAGE's tokenizer (VQGAN: taming-transformers' VectorQuantizer2).


def vq_quantize(z: Tensor, codebook: Tensor) -> Tensor:
    """(N,) int64: for each row of z (N, e) the index of its nearest codebook (K, e) entry by
    squared L2 distance, as taming's VectorQuantizer2 writes it (d = ||z||^2 + ||e||^2 - 2 z e^T,
    argmin over the codes), in float32; ties go to the lowest index (torch.argmin)."""
    z, e = z.float(), codebook.float()
    d = torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * z @ e.t()
    return torch.argmin(d, dim=1)
