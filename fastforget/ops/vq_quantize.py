"""Vector quantisation: each row's nearest codebook entry, MAGE's (VQGAN's) tokenizer.

    indices[i] = argmin_j ||z_i - e_j||^2 = argmin_j (||e_j||^2 - 2 z_i . e_j)

taming-transformers' VectorQuantizer2 writes the (N, K) distance matrix (16384 x 1024 float32,
64 MB, for one MAGE batch of 64 images of 16 x 16 tokens) and reads it back for the argmin. The
kernels compute it as a tiled GEMM with the row argmin in the epilogue: each tile of distances
lives in registers or a small local buffer and only the (N,) indices reach memory. ||z_i||^2 is
the same for every j, so it is left out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InvalidType, InvalidValue
from . import backends, custom, reference
from .unlearn_loss import FLOAT_DTYPES


def vq_quantize(z: Tensor, codebook: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """(N,) int64: for each row of z the index of its nearest codebook entry by squared L2 distance.

    z: (N, e) float32, bfloat16 or float16 (N may be 0); codebook: (K, e), K >= 1, float32,
    bfloat16 or float16, on z's device; any strides. The distance is VQGAN's (taming's
    VectorQuantizer2): ||z||^2 + ||e_j||^2 - 2 z . e_j, argmin over j, a tie going to the lowest
    index (as torch.argmin); the kernels drop ||z||^2, which does not move the argmin.
    Everything accumulates in float32, 16-bit inputs widened to float32 before the products: a
    bfloat16 z gets the tokens of the float32 computation on the same bfloat16 values. Distances
    that differ only at float32 rounding level (near-ties) may pick the other code than the
    reference does, as any two summation orders may. Not differentiable (indices); no gradient
    flows through.
    """
    _check(z, codebook)
    call = VQ_QUANTIZE.op if custom.traced() else VQ_QUANTIZE.eager  # no autograd: the implementation itself
    return call(z.detach(), codebook.detach(), backends.requested_backend(backend))


def _check(z, codebook) -> None:
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, Tensor):
            raise InvalidType(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidType(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if z.dim() != 2 or z.shape[1] == 0:
        raise InvalidValue(f"z must be (N, e) with e >= 1, got {tuple(z.shape)}")
    if codebook.dim() != 2 or codebook.shape[0] == 0 or codebook.shape[1] != z.shape[1]:
        raise InvalidValue(f"codebook must be (K >= 1, {z.shape[1]}) (z's e = {z.shape[1]}), "
                           f"got {tuple(codebook.shape)}")
    if codebook.device != z.device:
        raise InvalidValue(f"codebook must be on z's device {z.device}, got {codebook.device}")


def _forward(z: Tensor, codebook: Tensor, backend: str) -> Tensor:
    """The indices, (N,) int64, on backend `backend` ('' for automatic)."""
    name = backends.select("vq_quantize", backend, z.device)
    z, codebook = z.contiguous(), codebook.contiguous()
    if name == "torch":
        return reference.vq_quantize(z, codebook)
    if name == "triton":
        from ..kernels import vq_quantize as kernel

        return kernel.vq_quantize(z, codebook)
    return backends.native.ops(name).vq_quantize(z, codebook)


def _forward_fake(z, codebook, backend):
    return z.new_empty((z.shape[0],), dtype=torch.int64)


VQ_QUANTIZE = custom.register("vq_quantize", _forward, _forward_fake)
