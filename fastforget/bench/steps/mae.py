"""`bench step`'s reference and pytorch providers for MAE.

- reference: the reference code's step (engine_unlearn.py) re-created: the student under fp16
  autocast with a GradScaler (CUDA), the teacher outside autocast in float32 and run twice over
  the whole batch (clean images, then noise images), MAE's patch embedding of every patch then
  argsort masking, timm 0.3's attention (an explicit softmax), compute_loss as written, AdamW (not
  fused), and loss.item() plus a device synchronise every step.
- pytorch: good plain PyTorch: bf16 autocast (CUDA), scaled_dot_product_attention, fused AdamW, no
  per-step host reads; still the teacher twice and no fastforget op.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...ops import reference
from ...ops.attention import sdpa_attention
from ...train.loop import make_optimizer, optimizer_step, param_groups
from ..timing import sync
from . import LR


def options(spec) -> dict:
    """The family's method options for the trainer's step (UnlearnConfig fields)."""
    return {"mask_ratio": spec.mask_ratio}


def flops(model, spec) -> float:
    return step_flops(model, spec.batch, spec.mask_ratio)


def _encoder_parts(model, batch: int, mask_ratio: float) -> tuple[float, float]:
    """Matmul FLOPs of one encoder forward over the kept patches: (patch embedding, blocks)."""
    length = model.num_patches
    kept = length - int(length * mask_ratio)
    tokens, width = 1 + kept, model.pos_embed.shape[-1]
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.proj.weight[0].numel()
    per_block = 2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width
    return float(batch * 2 * kept * patch * width), float(batch * len(model.blocks) * per_block)


def encoder_flops(model, batch: int, mask_ratio: float) -> float:
    """Matmul FLOPs of one encoder forward over the kept patches (patch embedding, blocks)."""
    return sum(_encoder_parts(model, batch, mask_ratio))


def step_flops(model, batch: int, mask_ratio: float) -> float:
    """The method's step: student forward (1x) and backward (2x; the patch embedding 1x, as images
    take no gradient), one teacher forward (1x)."""
    patch, blocks = _encoder_parts(model, batch, mask_ratio)
    return 3 * patch + 4 * blocks


# -- MAE as the reference code runs it ----------------------------------------------------------

def mae_encode(model, imgs: Tensor, ids_keep: Tensor, explicit_attention: bool) -> Tensor:
    """models_mae.py's forward_encoder on given kept ids: every patch embedded, positions added, the
    kept ones gathered, the cls token prepended; no fastforget op."""
    x = F.conv2d(model.normalize(imgs), model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                 stride=model.patch_size)
    x = x.flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in model.blocks:
        h = blk.norm1(x)
        # timm 0.3's explicit softmax (the reference code's), or plain PyTorch's SDPA: no fastforget op
        attend = reference.qkv_attention if explicit_attention else sdpa_attention
        x = x + blk.attn.proj(attend(blk.attn.qkv(h), blk.attn.num_heads))
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x)


def _kept_ids(noise: Tensor, mask_ratio: float) -> Tensor:
    """MAE's random_masking: the first (1 - ratio) L of argsort(noise)."""
    keep = noise.shape[1] - int(noise.shape[1] * mask_ratio)
    return torch.argsort(noise, dim=1)[:, :keep]


def _noise_images(imgs: Tensor) -> Tensor:
    """The reference's noise batch: Gaussian with the batch's mean and std, clamped to [0, 1]."""
    return (torch.randn_like(imgs) * imgs.std() + imgs.mean()).clamp(0.0, 1.0)


# -- the reference's and plain PyTorch's steps -------------------------------------------------

def _encoder_only(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for p in model.encoder_parameters():
        p.requires_grad_(True)
    return model


def baseline_step(spec, model, imgs: Tensor, is_forget: Tensor, plain: bool):
    """reference (plain=False) or pytorch (plain=True): the teacher twice over the whole batch."""
    cuda = imgs.device.type == "cuda"
    student = _encoder_only(model)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    if plain:
        optimizer = make_optimizer(student, 0.05, LR)
        student_cast = teacher_cast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    else:  # as MAE's engine: AdamW's default implementation, fp16 autocast with a loss scaler
        optimizer = torch.optim.AdamW(param_groups(student.named_parameters(), 0.05), lr=LR, betas=(0.9, 0.95))
        student_cast, teacher_cast = torch.autocast("cuda", dtype=torch.float16, enabled=cuda), contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and not plain)

    def forward(imgs, is_forget, ids_keep):
        with student_cast:
            latent = mae_encode(student, imgs, ids_keep, explicit_attention=not plain)
        with torch.no_grad(), teacher_cast:
            clean = mae_encode(teacher, imgs, ids_keep, explicit_attention=not plain)
            noisy = mae_encode(teacher, _noise_images(imgs), ids_keep, explicit_attention=not plain)
        return reference.reference_code_loss(latent, clean, noisy, is_forget)

    forward = torch.compile(forward) if spec.compiled else forward

    def step():
        ids_keep = _kept_ids(torch.rand(imgs.shape[0], model.num_patches, device=imgs.device), spec.mask_ratio)
        loss = forward(imgs, is_forget, ids_keep)
        if plain:
            loss.backward()
            optimizer_step(optimizer, params, 3.0)
            return
        loss.item()  # the reference logs every step: a host read
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        sync(imgs.device)
    return step
