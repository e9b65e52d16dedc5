"""Masked-patch encoding in Triton: gather, GEMM and epilogue in one kernel.

out[b, t] = patch(b, ids_keep[b, k]) @ weight^T + bias + pos_embed[1 + ids_keep[b, k]] for the kept
patch k behind token t, and cls + pos_embed[0] for the cls token (t = 0 when present). Only the
kept patches are read from the images; the patch matrix never exists in memory.

Shapes: images (B, C, H, W) contiguous; weight (D, C, p, p) contiguous, flattened (c, i, j) as
Conv2d's; bias, cls (D,); pos (1 + L, D); ids_keep (B, K) int64; out (B, tokens, D).
"""
import torch
import triton
import triton.language as tl

from .launch import on_inputs_device, upcast_dot

# Tiles: 64 rows x 64 channels of output, features in steps of 32 (tensor-core friendly for
# bf16/fp16; tl.dot needs >= 16 everywhere). TODO(gpu): tune on the H200 (issue 6).
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
NUM_WARPS, NUM_STAGES = 4, 3


@triton.jit
def patch_embed_kernel(
    images_ptr, ids_ptr, weight_ptr, bias_ptr, pos_ptr, cls_ptr, out_ptr,
    rows, height, width, grid_w, keep, tokens, dim, features,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < rows
    n_ok = n < dim
    b = (r // tokens).to(tl.int64)
    t = r % tokens
    if HAS_CLS:
        is_cls = t == 0
        k = t - 1
    else:
        is_cls = t < 0
        k = t
    patch_row = row_ok & (is_cls == 0)
    l = tl.load(ids_ptr + b * keep + k, mask=patch_row, other=0)
    image_base = b * (features // (PATCH * PATCH)) * height * width + (l // grid_w) * PATCH * width + (l % grid_w) * PATCH

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for f0 in range(0, features, BLOCK_K):
        f = f0 + tl.arange(0, BLOCK_K)
        f_ok = f < features
        c = f // (PATCH * PATCH)
        i = (f // PATCH) % PATCH
        j = f % PATCH
        a = tl.load(images_ptr + image_base[:, None] + (c * height * width + i * width + j)[None, :],
                    mask=patch_row[:, None] & f_ok[None, :], other=0.0).to(weight_ptr.dtype.element_ty)
        w = tl.load(weight_ptr + n[None, :] * features + f[:, None], mask=f_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter's bf16 dot is wrong: the same products in float32 (launch.upcast_dot)
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    # Epilogue: position (row 0 for cls), then bias on patch rows or cls on the cls row.
    pos_row = tl.where(is_cls, 0, 1 + l)
    ok = row_ok[:, None] & n_ok[None, :]
    acc += tl.load(pos_ptr + pos_row[:, None] * dim + n[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_cls[:, None], 0.0, bias[None, :])
    if HAS_CLS:
        cls = tl.load(cls_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.where(is_cls[:, None], cls[None, :], 0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * dim + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


def input_precision(dtype) -> str:
    """fp32 products in tf32 only where torch allows it for matmuls (its newer fp32_precision
    setting when present: reading the old flag after the new one is set is an error)."""
    if dtype != torch.float32:
        return "ieee"
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@on_inputs_device
def masked_patch_embed(images, weight, bias, pos_embed, ids_keep, cls_token):
    batch, channels, height, width = images.shape
    dim, patch = weight.shape[0], weight.shape[-1]
    keep = ids_keep.shape[1]
    tokens = keep + (cls_token is not None)
    out = torch.empty((batch, tokens, dim), dtype=weight.dtype, device=images.device)
    rows = batch * tokens
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(dim, BLOCK_N))
    patch_embed_kernel[grid](
        images, ids_keep, weight, bias if bias is not None else weight, pos_embed,
        cls_token if cls_token is not None else weight, out,
        rows, height, width, width // patch, keep, tokens, dim, channels * patch * patch,
        PATCH=patch, HAS_BIAS=bias is not None, HAS_CLS=cls_token is not None,
        INPUT_PRECISION=input_precision(weight.dtype), UPCAST_DOT=upcast_dot(weight.dtype), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def aot_variants():
    """As kernels/unlearn_loss.py's: the variants of the MAE configs (p = 16 and 14)."""
    ints = dict(rows="i32", height="i32", width="i32", grid_w="i32", keep="i32", tokens="i32", dim="i32",
                features="i32")
    for image_ty, param_ty, precision in (("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32"), ("fp32", "bf16", "ieee"),
                                          ("bf16", "bf16", "ieee"), ("fp16", "fp16", "ieee")):
        for patch in (16, 14):
            for has_cls in (True, False):
                yield patch_embed_kernel, dict(
                    images_ptr=f"*{image_ty}", ids_ptr="*i64", weight_ptr=f"*{param_ty}", bias_ptr=f"*{param_ty}",
                    pos_ptr=f"*{param_ty}", cls_ptr=f"*{param_ty}", out_ptr=f"*{param_ty}", **ints), dict(
                    PATCH=patch, HAS_BIAS=True, HAS_CLS=has_cls, INPUT_PRECISION=precision, UPCAST_DOT=False,
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K), ("dim", "features", "width"), NUM_WARPS
