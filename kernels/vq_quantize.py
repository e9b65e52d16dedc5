"""Vector quantisation in Triton: a program per BLOCK_M rows, walking the codebook BLOCK_N codes
at a time.

Each code tile is a tl.dot over dim in BLOCK_K slices (float32 operands, input_precision="ieee":
FMA, not TF32, so the tokens are the float32 computation's), with the tile's squared norms summed
beside it; then ||e||^2 - 2 z.e, the tile's row min and argmin (the lowest code of a tie) and the
running (min, argmin) updated only by a strictly smaller distance, so earlier tiles win ties. The
semantics are fastforget/ops/vq_quantize.py's.
"""
import itertools

import torch
import triton
import triton.language as tl

from .launch import on_inputs_device

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small batches, and MAGE's 16384 rows.
# TODO(gpu): tune on the H200 (the float32 FMA GEMM's tile, warps and stages).
CONFIGS = ((64, 64, 32, 4), (128, 128, 32, 8))


@triton.jit
def vq_argmin_kernel(z_ptr, e_ptr, out_ptr, rows, codes, dim,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    z_rows = z_ptr + offs_m.to(tl.int64)[:, None] * dim
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for c0 in range(0, codes, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        code_ok = offs_n < codes
        e_cols = e_ptr + offs_n.to(tl.int64)[None, :] * dim
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        norm = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < dim
            z = tl.load(z_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            e = tl.load(e_cols + offs_k[:, None], mask=k_ok[:, None] & code_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(z, e, acc, input_precision="ieee")
            norm += tl.sum(e * e, axis=0)
        d = tl.where(code_ok[None, :], norm[None, :] - 2.0 * acc, float("inf"))
        tile_min = tl.min(d, axis=1)
        tile_arg = tl.argmin(d, axis=1)  # ties to the lowest index
        smaller = tile_min < best
        best = tl.where(smaller, tile_min, best)
        arg = tl.where(smaller, tile_arg + c0, arg)
    tl.store(out_ptr + offs_m, arg.to(tl.int64), mask=row_ok)


def _config(rows: int):
    return CONFIGS[1] if rows >= 8192 else CONFIGS[0]


@on_inputs_device
def vq_quantize(z, codebook):
    """Contiguous z (N, e) and codebook (K, e) -> (N,) int64 indices."""
    rows, dim = z.shape
    out = torch.empty(rows, dtype=torch.int64, device=z.device)
    if rows == 0:
        return out
    block_m, block_n, block_k, warps = _config(rows)
    vq_argmin_kernel[(triton.cdiv(rows, block_m),)](z, codebook, out, rows, codebook.shape[0], dim, BLOCK_M=block_m,
                                                    BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


def aot_variants():
    """Every tuning config for MAGE's dtypes (a float32 codebook beside a float32, bfloat16 or
    float16 z; a codebook in z's 16-bit dtype), e a multiple of 16 (MAGE's 256) or not."""
    pairs = (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"))
    for (zt, et), (block_m, block_n, block_k, warps), aligned in itertools.product(pairs, CONFIGS, (True, False)):
        signature = dict(z_ptr=f"*{zt}", e_ptr=f"*{et}", out_ptr="*i64", rows="i32", codes="i32", dim="i32")
        yield vq_argmin_kernel, signature, dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k), \
            ("dim",) if aligned else (), warps
