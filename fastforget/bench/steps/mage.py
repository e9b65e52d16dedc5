"""`bench step`'s reference and pytorch providers for MAGE.

- reference: the step of jpmorganchase/i2i_mage's engine_unlearn.py re-created: the student's
  forward_encoder under fp16 autocast with a GradScaler (CUDA) tokenizes the batch with its own
  VQGAN; the teacher, a deep copy of the whole model, runs outside autocast in float32, twice over
  the whole batch (clean images, then noise images), each time tokenizing again (three VQGAN
  passes); the mask rate is drawn on the host, the masks by sort and cut-off with the
  `.sum()` check of the retry loop, the mask ids scattered and the kept rows gathered through
  nonzero(), the zero columns made on the host and copied over; all 257 positions embedded, then
  dropped; timm's attention with q.k^T and softmax in fp32; the VQGAN's GroupNorm and swish as
  separate ops and every intermediate kept; compute_loss in float64; clip_grad_norm_ per
  parameter, AdamW not fused; loss.item(), a device synchronise and a formatted print every step.
- pytorch: that step as good plain PyTorch: bf16 autocast (CUDA), the clean batch tokenized once
  and shared, the masks by ranks on the device, SDPA attention, fused AdamW and clipping, no host
  reads; still the teacher twice over the whole batch (and the noise batch tokenized whole), and
  no fastforget op.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random

import torch
from torch import Tensor
from torch.nn import functional as F

from ...models.mage import ResnetBlock
from ...ops import reference
from ...ops.attention import sdpa_attention
from ...train.loop import make_optimizer, optimizer_step, param_groups
from ..timing import sync
from . import LR


def options(spec) -> dict:
    return {}


def flops(model, spec) -> float:
    """The method's work a step, counted on a fake copy (no memory, no compute): the clean batch
    tokenized once and the forget half's noise images (every other row is a forget row), the
    student encoder's forward and backward, one teacher encoder forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from ... import families
    family = families.of(model)
    with FakeTensorMode():
        fake = family.create(model.config_name, **model.overrides)
        family.trainable(fake, whole=False)
        imgs = torch.rand(1, model.in_chans, model.img_size, model.img_size)
        with FlopCounterMode(display=False) as tokenizer:
            with torch.no_grad():
                fake.vqgan.encoder(imgs)
        masks = fake.draw_masks(1)
        tokens = torch.zeros(1, model.num_patches, dtype=torch.long)
        with FlopCounterMode(display=False) as encoder:
            fake.encode_tokens(tokens, masks.keep, masks.masked).float().sum().backward()
            with torch.no_grad():
                fake.encode_tokens(tokens, masks.keep, masks.masked)
    quantizer = 2 * model.num_patches * model.codebook_size * model.vqgan.quantize.embedding.weight.shape[1]
    per_image = 1.5 * (tokenizer.get_total_flops() + quantizer) + encoder.get_total_flops()
    return float(per_image * spec.batch)


# -- MAGE in plain torch ops ----------------------------------------------------------------------

def _swish_norm(norm, x: Tensor) -> Tensor:
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def _res_block(block: ResnetBlock, x: Tensor) -> Tensor:
    h = block.conv1(_swish_norm(block.norm1, x))
    h = block.conv2(_swish_norm(block.norm2, h))
    return h + (block.nin_shortcut(h) if block.in_channels != block.out_channels else x)


def tokenize(model, imgs: Tensor, keep_all: bool) -> Tensor:
    """vqgan.encode(x)[2][2] in plain ops: the encoder (keep_all: every intermediate held, as the
    reference's hs list), then taming's distances and argmin in fp32."""
    enc, held = model.vqgan.encoder, []
    keep = held.append if keep_all else (lambda _: None)
    h = enc.conv_in(imgs)
    for level in enc.down:
        for block in level.block:
            h = _res_block(block, h)
            keep(h)
        if level.resample_name:
            h = F.avg_pool2d(h, 2)
            keep(h)
    h = _res_block(enc.mid.block_2, _res_block(enc.mid.block_1, h))
    z = enc.conv_out(_swish_norm(enc.norm_out, h)).float()
    b, e, gh, gw = z.shape
    with torch.autocast(imgs.device.type, enabled=False):
        ids = reference.vq_quantize(z.permute(0, 2, 3, 1).reshape(-1, e), model.vqgan.quantize.embedding.weight.float())
    return ids.view(b, gh * gw)


def encode(model, ids: Tensor, keep: Tensor, explicit_attention: bool) -> Tensor:
    """forward_encoder's embedding and blocks on the full id sequence (B, 1 + L): all positions
    embedded, then the kept ones (keep: (B, 1 + K) positions) gathered."""
    emb = model.token_emb
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings.weight[None, :ids.shape[1]])
    x = emb.dropout(x)
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    for blk in model.blocks:
        attend = _fp32_scores_attention if explicit_attention else sdpa_attention
        x = x + blk.attn.proj(attend(blk.attn.qkv(blk.norm1(x)), blk.attn.num_heads))
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x)


def _fp32_scores_attention(qkv: Tensor, heads: int) -> Tensor:
    """models_mage.py's Attention: q.k^T outside autocast in fp32, the row max subtracted, softmax,
    then attn @ v in the ambient precision."""
    b, n, width = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    with torch.autocast(qkv.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = scores - scores.max(-1, keepdim=True).values
    return (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)


def _reference_masks(model, batch: int, device) -> tuple[Tensor, Tensor]:
    """forward_encoder's draw: r on the host, the masks by cut-off, re-drawn until the counts hold
    (its .sum() checks read the device)."""
    low, high, mu, std = model.mask_ratio
    while True:  # scipy's truncnorm.rvs(1) on the host (rejection, the same law)
        rate = random.gauss(mu, std)
        if low <= rate <= high:
            break
    length = model.num_patches
    dropped, masked = model.num_dropped, int(math.ceil(length * rate))
    while True:
        noise = torch.rand(batch, length, device=device)
        ordered = torch.sort(noise, dim=1).values
        drop = (noise <= ordered[:, dropped - 1:dropped]).float()
        all_mask = (noise <= ordered[:, masked - 1:masked]).float()
        if drop.sum() == batch * dropped and all_mask.sum() == batch * masked:
            return drop, all_mask


def _reference_encoder(model, imgs: Tensor, drop: Tensor, all_mask: Tensor) -> Tensor:
    """forward_encoder given the masks: tokenize (again), mask ids through nonzero, the host-made
    zero columns, every position embedded, the kept rows gathered through nonzero."""
    with torch.no_grad():
        ids = tokenize(model, imgs, keep_all=True)
    ids[all_mask.nonzero(as_tuple=True)] = model.mask_token_label
    zeros = lambda: torch.zeros(ids.shape[0], 1).to(imgs.device)  # noqa: E731  (a host tensor copied over)
    ids = torch.cat([zeros(), ids.float()], dim=1).long()
    ids[:, 0] = model.fake_class_label
    drop_full = torch.cat([zeros(), drop], 1)
    kept = (1 - drop_full).nonzero(as_tuple=True)[1].view(ids.shape[0], -1)
    return encode(model, ids, kept, explicit_attention=True)


def _plain_encoder(model, tokens: Tensor, kept: Tensor, masked: Tensor) -> Tensor:
    """kept (B, K) the kept positions, masked (B, L) the all-mask."""
    ids = torch.where(masked, model.mask_token_label, tokens)
    ids = torch.cat([torch.full_like(ids[:, :1], model.fake_class_label), ids], 1)
    keep = torch.cat([torch.zeros_like(kept[:, :1]), kept + 1], 1)
    return encode(model, ids, keep, explicit_attention=False)


def _compute_loss(latent: Tensor, clean: Tensor, noisy: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """engine_unlearn.compute_loss: float64 labels (+-100), (1 +- sign) weights over the batch."""
    sign = torch.where(labels < 100, -1.0, 1.0).to(latent.device)
    retain = ((1 + sign) * ((latent - clean) ** 2).mean((1, 2))).mean()
    forget = ((1 - sign) * ((latent - noisy) ** 2).mean((1, 2))).mean()
    return retain + alpha * forget


def _noise(imgs: Tensor) -> Tensor:
    return (torch.randn_like(imgs) * imgs.std() + imgs.mean()).clamp(0, 1)


def baseline_step(spec, model, imgs: Tensor, is_forget: Tensor, plain: bool):
    """reference (plain=False) or pytorch (plain=True) on the batch imgs in [0, 1]."""
    cuda = imgs.device.type == "cuda"
    model.requires_grad_(False)
    for p in model.encoder_parameters():
        p.requires_grad_(True)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the whole model, VQGAN and decoder
    params = [p for p in model.parameters() if p.requires_grad]
    labels = torch.where(is_forget, -100.0, 100.0).double().cpu()  # default_collate's float64, on the host
    alpha = 0.2
    if plain:
        optimizer = make_optimizer(model, 0.05, LR, (0.9, 0.95))
        cast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    else:
        optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 0.05), lr=LR, betas=(0.9, 0.95))
        cast = torch.autocast("cuda", dtype=torch.float16, enabled=cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and not plain)
    log = open(os.devnull, "w")

    def plain_forward(imgs):
        with torch.no_grad(), cast:
            tokens = tokenize(model, imgs, keep_all=False)
            noise_tokens = tokenize(model, _noise(imgs), keep_all=False)
        b, length = tokens.shape
        rate = model.mask_rate(device=imgs.device)
        order = torch.rand(b, length, device=imgs.device).argsort(1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=imgs.device).expand_as(order))
        masked = rank < torch.ceil(length * rate).clamp(model.num_dropped, length)
        kept = order[:, model.num_dropped:].sort(1).values
        with cast:
            latent = _plain_encoder(model, tokens, kept, masked)
            with torch.no_grad():
                clean = _plain_encoder(teacher, tokens, kept, masked)
                noisy = _plain_encoder(teacher, noise_tokens, kept, masked)
        sign = torch.where(is_forget, -1.0, 1.0)
        latent, clean, noisy = latent.float(), clean.float(), noisy.float()
        return (((1 + sign) * ((latent - clean) ** 2).mean((1, 2))).mean()
                + alpha * ((1 - sign) * ((latent - noisy) ** 2).mean((1, 2))).mean())

    if plain:
        forward = torch.compile(plain_forward) if spec.compiled else plain_forward

        def step():
            forward(imgs).backward()
            optimizer_step(optimizer, params, 3.0)
        return step

    def reference_forward(imgs):
        drop, all_mask = _reference_masks(model, imgs.shape[0], imgs.device)
        with cast:
            latent = _reference_encoder(model, imgs, drop, all_mask)
        with torch.no_grad():  # fp32, outside autocast
            clean = _reference_encoder(teacher, imgs, drop, all_mask)
            noisy = _reference_encoder(teacher, _noise(imgs), drop, all_mask)
        return _compute_loss(latent.double(), clean.double(), noisy.double(), labels, alpha)

    forward = torch.compile(reference_forward) if spec.compiled else reference_forward

    def step():
        loss = forward(imgs)
        if not math.isfinite(loss.item()):
            raise RuntimeError("the reference's step stops on a non-finite loss")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=False)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        sync(imgs.device)
        print(f"loss {loss.item():.4f} lr {optimizer.param_groups[0]['lr']:.6f}", file=log)
    return step
