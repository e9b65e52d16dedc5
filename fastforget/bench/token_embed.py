"""token_embed (MAGE's token embedding with token dropping) per provider, in `fastforget bench ops`.

Providers: `eager` (MAGE's path: BertEmbeddings, word + position embedding and LayerNorm, over
all 1 + L positions, then the gather of the class token and the kept ones), `compile`
(torch.compile of it), and each fastforget backend (only the kept rows embedded). Forward +
backward of the four weights. Bytes the op must move for R = B (1 + K) rows of D: forward reads a
word and a position row per output row and writes it; backward reads dy, the two rows again, and
writes the four gradients (V + 1 + L + 2 rows). GB/s is that over the median time, beside the
copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..ops import token_embed
from . import harness
from .timing import copy_bandwidth_gbs

MAGE_SHAPE = (64, 256, 128, 768, 2025)  # (B, L 16 x 16 tokens, K kept, D ViT-B, V codes + class + mask)
CLASS_ID, MASK_ID = 1100, 2024  # MAGE's fake class label and mask token ids


def mage_path(tokens, keep, masked, word, pos, ln_weight, ln_bias):
    """models_mage.py's order: the mask ids into the full sequence, BertEmbeddings of it, then keep."""
    batch = tokens.shape[0]
    full = torch.zeros_like(tokens, dtype=torch.bool).scatter(1, keep, masked)
    ids = torch.cat([torch.full_like(tokens[:, :1], CLASS_ID), torch.where(full, MASK_ID, tokens)], dim=1)
    x = F.layer_norm(F.embedding(ids, word) + pos, (word.shape[1],), ln_weight, ln_bias, 1e-6)
    rows = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)
    return x[torch.arange(batch, device=x.device)[:, None], rows]


def measure(shape, dtype: torch.dtype, device: torch.device, reps: int = 10) -> harness.Measured:
    batch, length, kept, dim, vocab = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, vocab - 2, (batch, length), generator=gen).to(device)
    keep = torch.rand(batch, length, generator=gen).argsort(1)[:, :kept].sort(1).values.to(device)
    masked = (torch.rand(batch, kept, generator=gen) < 0.5).to(device)
    weights = [torch.randn(vocab, dim, generator=gen), torch.randn(1 + length, dim, generator=gen),
               torch.ones(dim), torch.zeros(dim)]
    weights = [w.to(device, dtype).requires_grad_() for w in weights]
    rows = batch * (1 + kept)
    dy = torch.randn(batch, 1 + kept, dim, generator=gen).to(device, dtype)

    def step(fn):
        return lambda: torch.autograd.grad(fn(tokens, keep, masked, *weights), weights, dy)

    providers = {"eager": step(mage_path), "compile": step(torch.compile(mage_path))}
    providers.update(harness.backend_providers(device, lambda name: step(
        lambda *a: token_embed(*a, class_id=CLASS_ID, mask_id=MASK_ID, backend=name))))
    size = torch.finfo(dtype).bits // 8
    nbytes = (6 * rows + vocab + length + 3) * dim * size
    copy_gbs = copy_bandwidth_gbs(rows * dim * size, device)
    timed = harness.run(providers, device, nbytes / 1e9, reps=reps)
    return harness.measured("token_embed", f"token_embed forward+backward (V={vocab}, L={length})",
                            f"{batch}x{kept}x{dim}", dtype, device, timed, "GB/s", copy_gbs, "copy bandwidth")
