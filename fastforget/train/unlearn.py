"""`fastforget unlearn` and `fastforget pretrain`: the method's training and MAE pretraining.

Unlearning (Li, Hsu, Chen, Marculescu, ICLR 2024): only the encoder trains; the decoder and the
teacher (a frozen copy of the original encoder, in bf16 on the GPU, never in DDP) do not. A step:
one random mask per row shared by student and teacher; make_teacher_batch routes forget rows to
noise; ONE teacher pass; unlearn_loss on the two latents.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..models import create_mae, load_mae
from ..ops import make_teacher_batch, random_masking, unlearn_loss
from . import data as data_lib
from .loop import Dist, LoopConfig, run, setup_distributed


@dataclass
class UnlearnConfig:
    checkpoint: str
    data: str = "digits"
    forget_classes: Sequence[str] = ()
    retain_classes: Sequence[str] = ()
    proxy_classes: Sequence[str] = ()
    proxy_data: Optional[str] = None
    retain_ratio: float = 1.0
    proxy_ratio: float = 1.0
    forget_weight: float = 0.2
    # "reference" (the reference code's 2/B sums): its gradient over N ranks is exactly that of
    # the global batch, which per-rank set means are not.
    normalize: str = "reference"
    noise: str = "normal"
    mask_ratio: float = 0.75
    model: Optional[str] = None  # from the checkpoint when it records it
    device: Optional[str] = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="unlearned"))


class Encoder(nn.Module):
    """The student's encoder as a module of its own (what DDP wraps): E(images, ids_keep)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        return self.mae.encode(images, ids_keep)


# Data sets up to this size live on the GPU: a step's batch is then an index, with no host copy.
DEVICE_DATA_BYTES = 2 << 30


def _stage(images: Tensor, d: Dist) -> Tensor:
    """images where batches are cheapest to take from: the GPU when they fit, else pinned memory."""
    if d.device.type != "cuda":
        return images
    return images.to(d.device) if images.numel() * images.element_size() <= DEVICE_DATA_BYTES else images.pin_memory()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _rank_batches(images: Tensor, cfg: LoopConfig, d: Dist, steps_per_epoch: int, epoch_order):
    """batches(step, micro) over a per-epoch order; each rank takes its slice of the global batch."""
    def batches(step: int, micro: int):
        epoch, within = divmod(step, steps_per_epoch)
        order, is_forget = epoch_order(epoch)
        start = ((within * cfg.accum_steps + micro) * d.world + d.rank) * cfg.batch_size
        take = order[start:start + cfg.batch_size].to(images.device)
        out = (images[take].to(d.device, non_blocking=True),)
        return out + ((is_forget[start:start + cfg.batch_size].to(d.device),) if is_forget is not None else ())
    return batches


def _rank_rows(gen: torch.Generator, batch: int, length: int, d: Dist) -> Tensor:
    """This rank's rows of the global batch's mask noise (uniform, (world * batch, length))."""
    noise = torch.rand(d.world * batch, length, generator=gen, device=d.device)
    return noise[d.rank * batch:(d.rank + 1) * batch]


def unlearn(cfg: UnlearnConfig) -> dict:
    """Makes the checkpoint's model forget cfg.forget_classes; writes cfg.loop.out/checkpoint.pt."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    original = load_mae(cfg.checkpoint, cfg.model)
    name = cfg.model or torch.load(cfg.checkpoint, map_location="cpu", weights_only=True).get("config", {}).get("model")
    size = original.patch_embed.img_size[0]
    dataset = data_lib.load(cfg.data, size)
    proxy_data = data_lib.load(cfg.proxy_data, size) if cfg.proxy_data else None
    sets = data_lib.select(dataset, cfg.forget_classes, cfg.retain_classes, cfg.proxy_classes, proxy_data,
                           cfg.retain_ratio, cfg.proxy_ratio, seed=cfg.loop.seed)
    images = _stage(torch.cat([sets.forget.images, sets.retain.images]), d)

    student = original.to(d.device)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in student.encoder_parameters():
        p.requires_grad_(True)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if d.device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)

    n = 2 * max(len(sets.forget), len(sets.retain))
    steps_per_epoch = max(n // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)
    orders: dict[int, tuple[Tensor, Tensor]] = {}

    def epoch_order(epoch: int):
        if epoch not in orders:
            orders.clear()
            orders[epoch] = data_lib.stream(sets, epoch, cfg.loop.seed)
        return orders[epoch]

    batches = _rank_batches(images, cfg.loop, d, steps_per_epoch, epoch_order)
    length = student.num_patches

    def loss_fn(batch, gen, encoder):
        imgs, is_forget = batch
        ids_keep = random_masking(imgs.shape[0], length, cfg.mask_ratio, device=d.device,
                                  noise=_rank_rows(gen, imgs.shape[0], length, d))[0]
        teacher_in = make_teacher_batch(imgs, is_forget, noise=cfg.noise, clamp=(0.0, 1.0), generator=gen,
                                        first_row=d.rank * imgs.shape[0])
        with torch.no_grad():  # the one routed teacher pass: clean retain rows, noise forget rows
            target = teacher.encode(teacher_in, ids_keep)
        with _autocast(d.device):
            latent = encoder(imgs, ids_keep)
        out = unlearn_loss(latent, target, target, is_forget, forget_weight=cfg.forget_weight,
                           normalize=cfg.normalize)
        return {"loss": out.loss, "retain_loss": out.retain_loss, "forget_loss": out.forget_loss}

    config = {"model": name, "overrides": {}}
    return run(cfg.loop, d, student, Encoder(student), steps_per_epoch, batches, loss_fn,
               lambda: {"config": config, "method": "ours", "forget_classes": list(cfg.forget_classes)})


@dataclass
class PretrainConfig:
    model: str = "mae_vit_tiny"
    data: str = "digits"
    mask_ratio: float = 0.75
    device: Optional[str] = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="pretrained", blr=1.5e-4))


class _Pretrain(nn.Module):
    def __init__(self, mae: nn.Module, mask_ratio: float):
        super().__init__()
        self.mae, self.mask_ratio = mae, mask_ratio

    def forward(self, imgs: Tensor, noise: Tensor) -> Tensor:
        return self.mae(imgs, self.mask_ratio, noise)[0]


def pretrain(cfg: PretrainConfig) -> dict:
    """Trains an MAE from scratch with its own loss: the original model of the demo."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    model = create_mae(cfg.model).to(d.device)
    dataset = data_lib.load(cfg.data, model.patch_embed.img_size[0])
    steps_per_epoch = max(len(dataset) // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)

    def epoch_order(epoch: int):
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.loop.seed * 7919 + epoch)), None

    batches = _rank_batches(_stage(dataset.images, d), cfg.loop, d, steps_per_epoch, epoch_order)

    def loss_fn(batch, gen, module):
        imgs, = batch
        noise = _rank_rows(gen, imgs.shape[0], model.num_patches, d)
        with _autocast(d.device):
            return {"loss": module(imgs, noise)}

    return run(cfg.loop, d, model, _Pretrain(model, cfg.mask_ratio), steps_per_epoch, batches, loss_fn,
               lambda: {"config": {"model": cfg.model, "overrides": {}}})
