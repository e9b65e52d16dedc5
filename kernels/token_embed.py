"""MAGE's token embedding in Triton: one program per block of ROWS output rows, a row a tile line.

Forward gathers each row's word and position rows, sums them in float32, takes the statistics
(mean, then squared deviations) and writes the LayerNorm'd row with its mean and rstd. Backward is
deterministic, with no atomics: the row kernel recomputes the rows, runs LayerNorm's backward and
writes each row's dx (float32) and its two keys (the word and position rows it read); each program
sums the LayerNorm parameters' gradients over its STEPS blocks of rows into one partial row, summed
in program order by the launcher. A stable sort of the keys and searchsorted (device ops of fixed
shapes, no host synchronisation) give each word and position row its sources in row order, and
the segment-sum kernel adds them in a fixed order (SEG sources a step, each step a fixed tree) and
writes the gradient in the weights' dtype. A keep entry or token out of range makes its row NaN
and adds no gradient (refusing it would take a host synchronisation). The semantics are
fastforget/ops/token_embed.py's.
"""
import itertools

import torch
import triton
import triton.language as tl

from .launch import on_inputs_device

TILE = 4096  # elements a program's tile holds: rows of one block share the LayerNorm parameters
STEPS = 8  # backward: row blocks a program walks (its partial sums cover them all)
SEG = 64  # segment sum: sources a step (SEG x SEG_COLS = TILE: 32 float32 in flight a thread of 4 warps)
SEG_COLS = 64  # segment sum: columns a program (a heavy row, mask_id's, spreads over D / 64 programs)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _rows(block_d: int) -> int:
    return max(1, min(16, TILE // block_d))


def _warps(block_d: int) -> int:
    return 4 if block_d * _rows(block_d) <= 2048 else 8


@triton.jit
def _ids(tokens_ptr, keep_ptr, masked_ptr, r, rows, length, keep_count, vocab, class_id, mask_id):
    """(word id, position row, valid, bad) of output rows r: row 0 of a sample the class token,
    row 1 + j kept position keep[b, j], mask_id where masked. bad: its keep entry or token out of
    range (no host synchronisation to refuse it: the row comes out NaN and adds no gradient)."""
    valid = r < rows
    t = r % (1 + keep_count)
    b = r // (1 + keep_count)
    kept = valid & (t > 0)
    k = b.to(tl.int64) * keep_count + t - 1
    p = tl.load(keep_ptr + k, mask=kept, other=0)
    p_ok = (p >= 0) & (p < length)
    m = tl.load(masked_ptr + k, mask=kept, other=0) != 0
    token = tl.load(tokens_ptr + b.to(tl.int64) * length + p, mask=kept & p_ok & ~m, other=0)
    ids = tl.where(t == 0, class_id, tl.where(m, mask_id, token)).to(tl.int64)
    bad = kept & (~p_ok | (ids < 0) | (ids >= vocab))
    return tl.where(bad, 0, ids), tl.where((t == 0) | bad, 0, p + 1).to(tl.int64), valid, bad


@triton.jit
def _centred(word_ptr, pos_ptr, ids, positions, in_row, dim, d):
    """x - mean (zero outside the rows) and mean, float32."""
    x = tl.load(word_ptr + ids[:, None] * dim + d[None, :], mask=in_row, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + positions[:, None] * dim + d[None, :], mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / dim
    return tl.where(in_row, x - mean[:, None], 0.0), mean


@triton.jit
def token_forward_kernel(tokens_ptr, keep_ptr, masked_ptr, word_ptr, pos_ptr, lnw_ptr, lnb_ptr, out_ptr, mean_ptr,
                         rstd_ptr, rows, length, keep_count, dim, vocab, class_id, mask_id, eps, ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    ids, positions, valid, bad = _ids(tokens_ptr, keep_ptr, masked_ptr, r, rows, length, keep_count, vocab, class_id,
                                      mask_id)
    in_row = valid[:, None] & (d < dim)[None, :]
    xc, mean = _centred(word_ptr, pos_ptr, ids, positions, in_row, dim, d)
    rstd = tl.where(bad, float("nan"), 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / dim + eps))
    w = tl.load(lnw_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    b = tl.load(lnb_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + r.to(tl.int64)[:, None] * dim + d[None, :], y.to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + r, mean, mask=valid)
    tl.store(rstd_ptr + r, rstd, mask=valid)


@triton.jit
def token_backward_kernel(dy_ptr, tokens_ptr, keep_ptr, masked_ptr, word_ptr, pos_ptr, lnw_ptr, rstd_ptr, dx_ptr,
                          word_key_ptr, pos_key_ptr, partial_ptr, rows, length, keep_count, dim, vocab, class_id,
                          mask_id, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr):
    """dx (rows, dim) float32; each row's word key and position key, vocab and 1 + length for a
    row out of range (they sort past every weight row); partial (programs, 2, dim)."""
    d = tl.arange(0, BLOCK_D)
    w = tl.load(lnw_ptr + d, mask=d < dim, other=0.0).to(tl.float32)
    sum_dw = tl.zeros([BLOCK_D], dtype=tl.float32)  # of dy x_hat and dy over the program's rows
    sum_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for step in range(STEPS):
        r = (tl.program_id(0) * STEPS + step) * ROWS + tl.arange(0, ROWS)
        ids, positions, valid, bad = _ids(tokens_ptr, keep_ptr, masked_ptr, r, rows, length, keep_count, vocab,
                                          class_id, mask_id)
        in_row = (valid & ~bad)[:, None] & (d < dim)[None, :]
        x_hat, _ = _centred(word_ptr, pos_ptr, ids, positions, in_row, dim, d)  # the mean forward saved, bit for bit
        rstd = tl.load(rstd_ptr + r, mask=valid & ~bad, other=0.0)
        dy = tl.load(dy_ptr + r.to(tl.int64)[:, None] * dim + d[None, :], mask=in_row, other=0.0).to(tl.float32)
        x_hat = x_hat * rstd[:, None]
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / dim
        mean_gx = tl.sum(g * x_hat, axis=1) / dim
        dx = (g - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None]
        tl.store(dx_ptr + r.to(tl.int64)[:, None] * dim + d[None, :], dx, mask=in_row)
        tl.store(word_key_ptr + r, tl.where(bad, vocab, ids), mask=valid)
        tl.store(pos_key_ptr + r, tl.where(bad, length + 1, positions), mask=valid)
        sum_dw += tl.sum(dy * x_hat, axis=0)
        sum_db += tl.sum(dy, axis=0)
    out = partial_ptr + tl.program_id(0).to(tl.int64) * 2 * dim
    tl.store(out + d, sum_dw, mask=d < dim)
    tl.store(out + dim + d, sum_db, mask=d < dim)


@triton.jit
def token_segment_sum_kernel(dx_ptr, perm_ptr, offsets_ptr, grad_ptr, dim, SEG: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """grad[v, tile] = the sum of dx[perm[offsets[v]:offsets[v + 1]], tile] (zero when empty),
    float32, in a fixed order: SEG sources a step in segment order, each step summed as a fixed tree."""
    v = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    lo = tl.load(offsets_ptr + v)
    hi = tl.load(offsets_ptr + v + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(lo, hi, SEG):
        i = start + tl.arange(0, SEG)
        src = tl.load(perm_ptr + i, mask=i < hi, other=0)
        x = tl.load(dx_ptr + src[:, None] * dim + c[None, :], mask=(i < hi)[:, None] & (c < dim)[None, :], other=0.0)
        acc += tl.sum(x, axis=0)
    tl.store(grad_ptr + v.to(tl.int64) * dim + c, acc.to(grad_ptr.dtype.element_ty), mask=c < dim)


def _seg_cols(dim: int) -> int:
    return min(SEG_COLS, _block_d(dim))


@on_inputs_device
def forward(tokens, keep, masked, word, pos, ln_weight, ln_bias, class_id: int, mask_id: int, eps: float):
    """Contiguous inputs -> (out (B, 1 + K, D), mean (B, 1 + K), rstd (B, 1 + K))."""
    batch, keep_count = keep.shape
    dim = word.shape[1]
    rows = batch * (1 + keep_count)
    block_d = _block_d(dim)
    out = torch.empty(batch, 1 + keep_count, dim, dtype=word.dtype, device=word.device)
    mean = torch.empty(batch, 1 + keep_count, dtype=torch.float32, device=word.device)
    rstd = torch.empty_like(mean)
    grid = (triton.cdiv(rows, _rows(block_d)),)
    token_forward_kernel[grid](tokens, keep, masked.view(torch.uint8), word, pos, ln_weight, ln_bias, out, mean, rstd,
                               rows, tokens.shape[1], keep_count, dim, word.shape[0], class_id, mask_id, eps,
                               ROWS=_rows(block_d), BLOCK_D=block_d, num_warps=_warps(block_d))
    return out, mean, rstd


@on_inputs_device
def backward(grad, tokens, keep, masked, word, pos, ln_weight, mean, rstd, class_id: int, mask_id: int):
    """(d word, d pos, d ln_weight, d ln_bias), each in the weights' dtype, the same bits every run."""
    batch, keep_count = keep.shape
    length = tokens.shape[1]
    dim = word.shape[1]
    rows = batch * (1 + keep_count)
    block_d = _block_d(dim)
    device = word.device
    dx = torch.empty(rows, dim, dtype=torch.float32, device=device)
    keys = torch.empty(2, rows, dtype=torch.int64, device=device)  # word keys, position keys
    programs = triton.cdiv(rows, _rows(block_d) * STEPS)
    partial = torch.empty(programs, 2, dim, dtype=torch.float32, device=device)
    token_backward_kernel[(programs,)](grad, tokens, keep, masked.view(torch.uint8), word, pos, ln_weight, rstd, dx,
                                       keys[0], keys[1], partial, rows, length, keep_count, dim, word.shape[0],
                                       class_id, mask_id, ROWS=_rows(block_d), BLOCK_D=block_d, STEPS=STEPS,
                                       num_warps=_warps(block_d))
    # weight row v's sources: perm[k, offsets[k, v]:offsets[k, v + 1]], in row order (a stable sort)
    sorted_keys, perm = torch.sort(keys, dim=1, stable=True)
    perm = perm.contiguous()  # the kernel walks its rows
    bounds = torch.arange(max(word.shape[0], length + 1) + 1, dtype=torch.int64, device=device)
    offsets = torch.searchsorted(sorted_keys, bounds.repeat(2, 1))
    d_word, d_pos = torch.empty_like(word), torch.empty_like(pos)
    cols = _seg_cols(dim)
    for k, out in enumerate((d_word, d_pos)):
        token_segment_sum_kernel[(out.shape[0], triton.cdiv(dim, cols))](dx, perm[k], offsets[k], out, dim, SEG=SEG,
                                                                         BLOCK_C=cols, num_warps=4)
    sums = partial.sum(0)
    # copies: the gradients must not share storage (outputs of a custom op never alias)
    return d_word, d_pos, sums[0].to(word.dtype, copy=True), sums[1].to(word.dtype, copy=True)


def aot_variants():
    """As kernels/group_norm.py's: every dtype, the narrowest row block and MAGE's (ViT-B, D = 768,
    and ViT-L, 1024: one 1024-wide block), D a multiple of 16 (16-byte accesses); the segment sum's
    narrowest column tile and its widest."""
    ids = dict(tokens_ptr="*i64", keep_ptr="*i64", masked_ptr="*u8")
    sizes = dict(rows="i32", length="i32", keep_count="i32", dim="i32", vocab="i32", class_id="i32", mask_id="i32")
    for ty, block_d in itertools.product(("fp32", "bf16", "fp16"), (16, 1024)):
        params = dict(word_ptr=f"*{ty}", pos_ptr=f"*{ty}", lnw_ptr=f"*{ty}")
        shape = dict(ROWS=_rows(block_d), BLOCK_D=block_d)
        yield token_forward_kernel, dict(**ids, **params, lnb_ptr=f"*{ty}", out_ptr=f"*{ty}", mean_ptr="*fp32",
                                         rstd_ptr="*fp32", **sizes, eps="fp32"), shape, ("dim",), _warps(block_d)
        yield token_backward_kernel, dict(dy_ptr=f"*{ty}", **ids, **params, rstd_ptr="*fp32", dx_ptr="*fp32",
                                          word_key_ptr="*i64", pos_key_ptr="*i64", partial_ptr="*fp32", **sizes), \
            dict(shape, STEPS=STEPS), ("dim",), _warps(block_d)
        yield token_segment_sum_kernel, dict(dx_ptr="*fp32", perm_ptr="*i64", offsets_ptr="*i64", grad_ptr=f"*{ty}",
                                             dim="i32"), dict(SEG=SEG, BLOCK_C=_seg_cols(block_d)), ("dim",), 4
