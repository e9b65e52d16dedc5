"""`bench step`'s reference and pytorch providers for Palette.

- reference: the step of jpmorganchase's Palette fork (Network.forward with labels and
  fix_decoder, Palette.unlearn_step_fix_decoder) re-created: float32 throughout, the whole UNet
  deep-copied as the teacher, t and gamma drawn per step, two q_samples (with and without labels),
  the composites and concatenations as separate ops, the gamma embedding's frequencies built on
  the host and copied to the device in every forward, GroupNorm32 (float32, cast back) then
  scale-shift and SiLU as separate ops, the legacy attention (einsum and softmax) recomputed in
  backward (its checkpoint), weighted_mse_loss as F.mse_loss of masked copies of each feature,
  Adam with torch's defaults and loss.item() every step. The masks and conditions come from its data
  loader, so they are inputs here, made once; the EMA update it also runs (whose output is never
  evaluated) is left out.
- pytorch: that step as good plain PyTorch: bf16 autocast and channels_last (CUDA), the teacher
  under no_grad, SDPA attention, the frequencies kept on the device, fused Adam, no host reads;
  no fastforget op.
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ... import families
from ...distributed import Dist
from ...families.palette import hybrid_masks
from ...models.palette import AttentionBlock, ResBlock, embedding_frequencies
from ...train.loop import optimizer_step
from . import LR


def options(spec) -> dict:
    return {}


def flops(model, spec) -> float:
    """Counted on a fake copy (no memory, no compute): the student encoder's forward and backward
    (weight gradients; no input gradient at the first conv) and one teacher encoder forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    family = families.of(model)
    chans, size = family.image_shape(model)
    with FakeTensorMode():
        fake = family.create(model.config_name, **model.overrides)
        family.trainable(fake, whole=False)
        x = torch.randn(1, model.denoise_fn.in_channel, size, size)
        gammas = torch.rand(1)
        with FlopCounterMode(display=False) as counter:
            sum(f.float().sum() for f in fake.encoder_features(x, gammas)).backward()
            with torch.no_grad():
                fake.encoder_features(x, gammas)
    return float(counter.get_total_flops() * spec.batch)


# -- the UNet's encoder in plain torch ops ------------------------------------------------------

def _group_norm(norm, x: Tensor) -> Tensor:
    """GroupNorm32: in float32, cast back."""
    return F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).type(x.dtype)


def _res_block(block: ResBlock, x: Tensor, emb: Tensor) -> Tensor:
    norm_in, _, conv_in = block.in_layers
    h = F.silu(_group_norm(norm_in, x))
    if block.resample is not None:
        h, x = block.resample(h), block.resample(x)
    h = conv_in(h)
    scale, shift = block.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
    norm_out, _, dropout, conv_out = block.out_layers
    h = _group_norm(norm_out, h) * (1 + scale) + shift
    return block.skip_connection(x) + conv_out(dropout(F.silu(h)))


def _legacy_attention(qkv: Tensor, heads: int) -> Tensor:
    """QKVAttentionLegacy: heads split from (B, heads * 3 * ch, T), scores in float32."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1).type(q.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def _attention_block(block: AttentionBlock, x: Tensor, plain: bool) -> Tensor:
    b, c, *spatial = x.shape

    def attend(x):
        x = x.reshape(b, c, -1)
        qkv = block.qkv(_group_norm(block.norm, x))
        if plain:
            q, k, v = qkv.reshape(b, block.num_heads, 3, c // block.num_heads, -1).transpose(-1, -2).unbind(2)
            h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        else:
            h = _legacy_attention(qkv, block.num_heads)
        return (x + block.proj_out(h)).reshape(b, c, *spatial)

    # the reference's AttentionBlock always runs under its checkpoint: recomputed in backward
    return attend(x) if plain or not x.requires_grad else checkpoint(attend, x, use_reentrant=False)


def _embed(unet, gammas: Tensor, plain: bool) -> Tensor:
    # gamma_embedding: the reference builds its frequencies on the host and copies them in every forward
    freqs = unet.freqs if plain else embedding_frequencies(unet.inner_channel).to(gammas.device)
    args = gammas.reshape(-1, 1).float() * freqs[None]
    return unet.cond_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def encoder_features(unet, x: Tensor, gammas: Tensor, plain: bool) -> list[Tensor]:
    """denoise_fn(x, gammas, return_feat=True) in plain torch ops: the 13 features."""
    emb = _embed(unet, gammas, plain)
    h, feats = x, []
    for stage in list(unet.input_blocks) + [unet.middle_block]:
        for layer in stage:
            if isinstance(layer, ResBlock):
                h = _res_block(layer, h, emb)
            elif isinstance(layer, AttentionBlock):
                h = _attention_block(layer, h, plain)
            else:
                h = layer(h)
        feats.append(h)
    return feats


# -- the step -----------------------------------------------------------------------------------

def _weighted_mse_loss(student: list[Tensor], teacher: list[Tensor], labels: Tensor, alpha: float) -> Tensor:
    """The reference's loss: per feature, F.mse_loss of the row-masked copies, retain plus alpha
    forget, summed."""
    view = (-1, 1, 1, 1)
    r, f = ((labels + 1) / 2).view(view), ((1 - labels) / 2).view(view)
    return sum(F.mse_loss(s * r, t * r) + alpha * F.mse_loss(s * f, t * f) for s, t in zip(student, teacher))


def baseline_step(spec, model, imgs: Tensor, is_forget: Tensor, plain: bool):
    """reference (plain=False) or pytorch (plain=True) on the batch imgs in [0, 1]."""
    device = imgs.device
    cuda = device.type == "cuda"
    unet = model.denoise_fn
    family = families.of(model)
    family.trainable(model, whole=False)  # the decoder gets no gradient, as under the reference's DDP
    teacher = copy.deepcopy(unet).requires_grad_(False)  # the whole UNet, as the reference copies it
    # the data loader's part, once: images in [-1, 1], hybrid masks (uint8), conditions, labels
    y_0 = imgs * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)
    mask = hybrid_masks(gen, imgs.shape[0], imgs.shape[-1], Dist(device=device)).to(torch.uint8)
    y_cond = y_0 * (1 - mask) + mask * torch.randn(y_0.shape, generator=gen, device=device)
    labels = torch.where(is_forget, -1.0, 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if plain and cuda:
        model.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        y_0, y_cond, mask = (t.contiguous(memory_format=torch.channels_last) for t in (y_0, y_cond, mask))
    # the reference's torch.optim.Adam with its defaults (foreach on CUDA); fused for plain PyTorch
    optimizer = torch.optim.Adam(params, lr=LR, fused=True) if plain else torch.optim.Adam(params, lr=LR)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if plain and cuda else nullcontext()
    alpha = 0.1  # the reference's --forget_alpha default
    view = (-1, 1, 1, 1)

    def forward():
        b = y_0.shape[0]
        t = torch.randint(1, model.num_timesteps, (b,), device=device)
        low, high = model.gammas.gather(0, t - 1).view(-1, 1), model.gammas.gather(0, t).view(-1, 1)
        gammas = (high - low) * torch.rand((b, 1), device=device) + low
        noise = torch.randn_like(y_0)
        g = gammas.view(view)
        r, f = ((labels + 1) / 2).view(view), ((1 - labels) / 2).view(view)
        y_noisy = g.sqrt() * y_0 * r + (1 - g).sqrt() * noise + (1 - (1 - g).sqrt()) * noise * f  # q_sample, labels
        y_orig = g.sqrt() * y_0 + (1 - g).sqrt() * noise
        teacher_in = torch.cat([y_cond, y_noisy * mask + (1.0 - mask) * y_0], dim=1)
        student_in = torch.cat([y_cond, y_orig * mask + (1.0 - mask) * y_0], dim=1)
        with cast:
            with torch.no_grad():
                targets = encoder_features(teacher, teacher_in, gammas, plain)
            feats = encoder_features(unet, student_in, gammas, plain)
        return _weighted_mse_loss([s.float() for s in feats], [t.float() for t in targets], labels, alpha)

    forward = torch.compile(forward) if spec.compiled else forward

    def step():
        if plain:
            forward().backward()
            optimizer_step(optimizer, params, 0.0)
            return
        optimizer.zero_grad()
        loss = forward()
        loss.backward()
        optimizer.step()
        loss.item()  # logged every step: a host read
    return step
