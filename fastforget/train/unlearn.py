"""`fastforget unlearn` and `fastforget pretrain`: the method, its baselines, MAE pretraining.

Unlearning (Li, Hsu, Chen, Marculescu, ICLR 2024), method "ours": only the encoder trains; the
decoder and the teacher (a frozen copy of the original encoder, in bf16 on the GPU, never in DDP)
do not. A step: one random mask per row shared by student and teacher; make_teacher_batch routes
forget rows to noise; ONE teacher pass; unlearn_loss on the two latents.

The baselines, as the reference code defines them for MAE (alpha = forget_weight):
- max-loss: the whole model trains; retain reconstruction loss - alpha * forget reconstruction loss.
- noisy-label: the whole model trains; forget rows are reconstructed towards noise images (made as
  make_teacher_batch makes them), retain rows towards themselves.
- retain-label: the whole model trains; retain rows match the original model's outputs, forget rows
  the original model's outputs for the batch's retain rows.
- random-encoder: only the encoder trains; forget rows' target is Gaussian noise with the mean and
  std of the teacher's latents; retain rows as ours.
The reference's baseline loss weights its forget term by (1 + label), which is zero on forget rows
(label -1 there): it never trains on them. Here every baseline weights the forget term by alpha,
the intended semantics.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models import create_mae, load_mae
from ..ops import make_teacher_batch, random_masking, unlearn_loss
from . import data as data_lib
from .augment import AUGMENTS, DRAWS, crop_flip, crop_flip_params, source_size
from .loop import Dist, LoopConfig, is_real, require, run, setup_distributed


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
    skip_bad_images: bool = False  # leave unreadable image files out (counted) instead of stopping
    forget_weight: float = 0.2
    # "reference" (the reference code's 2/B sums): its gradient over N ranks is exactly that of
    # the global batch, which per-rank set means are not.
    normalize: str = "reference"
    noise: str = "normal"
    mask_ratio: float = 0.75
    method: str = "ours"
    model: Optional[str] = None  # from the checkpoint when it records it
    device: Optional[str] = None
    augment: Optional[str] = None  # one of AUGMENTS; None: default_augment(data)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="unlearned"))

    def __post_init__(self):
        require(self, "method", self.method in METHODS, f"one of {METHODS}")
        self.augment = default_augment(self.data) if self.augment is None else self.augment
        require(self, "augment", self.augment in AUGMENTS, f"None or one of {AUGMENTS}")
        require(self, "forget_weight", is_real(self.forget_weight) and self.forget_weight >= 0, "a finite number >= 0")
        for name in ("retain_ratio", "proxy_ratio"):
            require(self, name, is_real(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        require(self, "mask_ratio", is_real(self.mask_ratio) and 0 <= self.mask_ratio < 1, "a number in [0, 1)")


METHODS = ("ours", "max-loss", "noisy-label", "retain-label", "random-encoder")
WHOLE_MODEL = ("max-loss", "noisy-label", "retain-label")  # the baselines that train the decoder too


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


class Reconstructor(nn.Module):
    """The whole MAE as the whole-model baselines train it: (images, masks) -> predicted patches."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        return self.mae.forward_decoder(self.mae.encode(images, ids_keep), ids_restore)


def _masked_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """(B,): each row's mean squared error over its removed patches (MAE's loss, per sample)."""
    return (((pred.float() - target.float()) ** 2).mean(-1) * mask).sum(1) / mask.sum(1)


def _set_means(per_row: Tensor, is_forget: Tensor) -> tuple[Tensor, Tensor]:
    """(retain mean, forget mean) of per-row values; an empty set gives 0 (no host sync)."""
    f = is_forget.float()
    return ((per_row * (1 - f)).sum() / (1 - f).sum().clamp_min(1), (per_row * f).sum() / f.sum().clamp_min(1))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _rank_batches(images: Tensor, cfg: LoopConfig, d: Dist, steps_per_epoch: int, epoch_order):
    """batches(step, micro) over a per-epoch order; each rank takes its slice of the global batch.

    epoch_order(epoch) -> (order, is_forget or None) on the CPU; it moves to the data's device
    once per epoch, so a step's batch is indexing there, with no host-to-device copy."""
    cache: dict = {}

    def batches(step: int, micro: int):
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in cache:
            cache.clear()
            order, is_forget = epoch_order(epoch)
            cache[epoch] = (order.to(images.device), None if is_forget is None else is_forget.to(d.device))
        order, is_forget = cache[epoch]
        start = ((within * cfg.accum_steps + micro) * d.world + d.rank) * cfg.batch_size
        out = (data_lib.unit_float(images[order[start:start + cfg.batch_size]].to(d.device, non_blocking=True)),)
        return out + ((is_forget[start:start + cfg.batch_size],) if is_forget is not None else ())
    return batches


def _rank_rows(gen: torch.Generator, batch: int, length: int, d: Dist) -> Tensor:
    """This rank's rows of the global batch's mask noise (uniform, (world * batch, length))."""
    noise = torch.rand(d.world * batch, length, generator=gen, device=d.device)
    return noise[d.rank * batch:(d.rank + 1) * batch]


def default_augment(data: str) -> str:
    """The reference's crop-flip for image folders, none for the digits (8x8 strokes, which a
    mirror or a fifth of the image would not keep)."""
    return "none" if data == "digits" else "crop-flip"


def _augmenter(augment: str, size: int, d: Dist) -> Callable[[Tensor, torch.Generator], Tensor]:
    """(images, the step's generator) -> the batch the model sees (train/augment.py)."""
    if augment == "none":
        return lambda imgs, gen: imgs
    return lambda imgs, gen: crop_flip(imgs, size, crop_flip_params(_rank_rows(gen, imgs.shape[0], DRAWS, d)))


def unlearning_step(cfg: UnlearnConfig, student: nn.Module, d: Dist) -> tuple[nn.Module, Callable]:
    """The trainer's step for cfg.method: marks what trains in student (on d.device), makes the
    frozen teacher, and returns (the module to train and wrap for DDP, loss_fn(batch, generator,
    module) -> {"loss", "retain_loss", "forget_loss"}) with batch = (images, is_forget)."""
    whole = cfg.method in WHOLE_MODEL
    for p in student.parameters():
        p.requires_grad_(whole)
    for p in student.encoder_parameters():
        p.requires_grad_(True)
    student.pos_embed.requires_grad_(False)  # MAE's positions are fixed
    student.decoder_pos_embed.requires_grad_(False)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if d.device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)
    length, alpha = student.num_patches, cfg.forget_weight
    augmented = _augmenter(cfg.augment, student.patch_embed.img_size[0], d)

    def noise_images(imgs, is_forget, gen):
        return make_teacher_batch(imgs, is_forget, noise=cfg.noise, clamp=(0.0, 1.0), generator=gen,
                                  first_row=d.rank * imgs.shape[0])

    def loss_fn(batch, gen, module):
        imgs, is_forget = batch
        imgs = augmented(imgs, gen)
        ids_keep, ids_restore, mask = random_masking(imgs.shape[0], length, cfg.mask_ratio, device=d.device,
                                                     noise=_rank_rows(gen, imgs.shape[0], length, d))
        if cfg.method in ("ours", "random-encoder"):
            with torch.no_grad():
                if cfg.method == "ours":  # the one routed teacher pass: clean retain rows, noise forget rows
                    retain_target = forget_target = teacher.encode(noise_images(imgs, is_forget, gen), ids_keep)
                else:
                    retain_target = teacher.encode(imgs, ids_keep)
                    forget_target = torch.randn(retain_target.shape, generator=gen, device=d.device) \
                        * retain_target.float().std() + retain_target.float().mean()
            with _autocast(d.device):
                latent = module(imgs, ids_keep)
            out = unlearn_loss(latent, retain_target, forget_target, is_forget, forget_weight=alpha,
                               normalize=cfg.normalize)
            return {"loss": out.loss, "retain_loss": out.retain_loss, "forget_loss": out.forget_loss}
        with _autocast(d.device):
            pred = module(imgs, ids_keep, ids_restore)
        if cfg.method == "max-loss":
            retain, forget = _set_means(_masked_error(pred, student.target(imgs), mask), is_forget)
            return {"loss": retain - alpha * forget, "retain_loss": retain, "forget_loss": forget}
        if cfg.method == "noisy-label":
            target = student.target(noise_images(imgs, is_forget, gen))
        else:  # retain-label: forget rows take the original's output for a retain row of the batch
            with torch.no_grad():
                original_pred = teacher.forward_decoder(teacher.encode(imgs, ids_keep), ids_restore)
            # Row i takes retain row i mod n_retain (retain rows first in a stable sort): no host sync.
            order = torch.argsort(is_forget.to(torch.uint8), stable=True)
            n_retain = (~is_forget).sum().clamp_min(1)
            pick = order[torch.remainder(torch.arange(imgs.shape[0], device=d.device), n_retain)]
            target = torch.where(is_forget[:, None, None], original_pred[pick], original_pred)
        retain, forget = _set_means(_masked_error(pred, target, mask), is_forget)
        return {"loss": retain + alpha * forget, "retain_loss": retain, "forget_loss": forget}

    return (Reconstructor(student) if whole else Encoder(student)), loss_fn


def unlearn(cfg: UnlearnConfig) -> dict:
    """Makes the checkpoint's model forget cfg.forget_classes; writes cfg.loop.out/checkpoint.pt."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    original = load_mae(cfg.checkpoint, cfg.model)
    name = original.config_name
    size = source_size(original.patch_embed.img_size[0], cfg.augment)
    dataset = data_lib.load(cfg.data, size, what="--data directory")
    proxy_data = data_lib.load(cfg.proxy_data, size, what="--proxy-data directory") if cfg.proxy_data else None
    for data in (dataset, proxy_data):
        if data is not None:
            data_lib.check_channels(data, original.patch_embed.proj.in_channels, name)
    sets = data_lib.select(dataset, cfg.forget_classes, cfg.retain_classes, cfg.proxy_classes, proxy_data,
                           cfg.retain_ratio, cfg.proxy_ratio, seed=cfg.loop.seed)
    # Image folders are read only now, and only the chosen files: a forget set, not the whole folder.
    sets = data_lib.UnlearnSets(*(data_lib.decode(s, cfg.skip_bad_images) for s in (sets.forget, sets.retain)))
    images = _stage(torch.cat([sets.forget.images, sets.retain.images]), d)

    n = 2 * max(len(sets.forget), len(sets.retain))
    steps_per_epoch = max(n // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)
    batches = _rank_batches(images, cfg.loop, d, steps_per_epoch,
                            lambda epoch: data_lib.stream(sets, epoch, cfg.loop.seed))
    student = original.to(d.device)
    module, loss_fn = unlearning_step(cfg, student, d)
    config = {"model": name, "overrides": {}}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("loop", "device", "checkpoint")}
    return run(cfg.loop, d, student, module, steps_per_epoch, batches, loss_fn,
               lambda: {"config": config, "method": cfg.method, "forget_classes": list(cfg.forget_classes),
                        "settings": settings})


@dataclass
class PretrainConfig:
    model: str = "mae_vit_tiny"
    data: str = "digits"
    mask_ratio: float = 0.75
    # Every other step's masks are task-shaped instead of random: a square hole (inpainting) or a
    # square window (outpainting), half the grid's side, at random places. An MAE trained only on
    # random masks cannot fill large holes, and one cannot unlearn what a model never does.
    task_masks: bool = False
    device: Optional[str] = None
    augment: Optional[str] = None  # one of AUGMENTS; None: default_augment(data)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="pretrained", blr=1.5e-4))

    def __post_init__(self):
        self.augment = default_augment(self.data) if self.augment is None else self.augment
        require(self, "augment", self.augment in AUGMENTS, f"None or one of {AUGMENTS}")
        require(self, "mask_ratio", is_real(self.mask_ratio) and 0 <= self.mask_ratio < 1, "a number in [0, 1)")


class _Pretrain(nn.Module):
    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        return self.mae(imgs, mask_ratio, noise)[0]


RANDOM, HOLE, WINDOW = "random", "hole", "window"  # pretraining's mask families


def _square_noise(gen: torch.Generator, batch: int, grid: tuple[int, int], d: Dist, hole: bool) -> tuple[Tensor, float]:
    """This rank's rows of mask noise removing a random square (hole) or all but one (window), and
    the mask ratio that keeps exactly the rest; drawn for the global batch like _rank_rows."""
    grid_h, grid_w = grid
    side_h, side_w = grid_h // 2, grid_w // 2
    rows = d.world * batch
    top = torch.randint(0, grid_h - side_h + 1, (rows, 1, 1), generator=gen, device=d.device)
    left = torch.randint(0, grid_w - side_w + 1, (rows, 1, 1), generator=gen, device=d.device)
    r = torch.arange(grid_h, device=d.device)[None, :, None]
    c = torch.arange(grid_w, device=d.device)[None, None, :]
    inside = ((r >= top) & (r < top + side_h) & (c >= left) & (c < left + side_w)).reshape(rows, -1)
    removed = inside if hole else ~inside
    noise = torch.rand(removed.shape, generator=gen, device=d.device) * 0.5 + removed.float()
    area = side_h * side_w / (grid_h * grid_w)
    return noise[d.rank * batch:(d.rank + 1) * batch], (area if hole else 1.0 - area)


def pretrain(cfg: PretrainConfig) -> dict:
    """Trains an MAE from scratch with its own loss: the original model of the demo."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    model = create_mae(cfg.model).to(d.device)
    size = model.patch_embed.img_size[0]
    dataset = data_lib.load(cfg.data, source_size(size, cfg.augment), what="--data directory")
    data_lib.check_channels(dataset, model.patch_embed.proj.in_channels, cfg.model)
    dataset = data_lib.decode(dataset)
    augmented = _augmenter(cfg.augment, size, d)
    steps_per_epoch = max(len(dataset) // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)

    def epoch_order(epoch: int):
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.loop.seed * 7919 + epoch)), None

    images = _rank_batches(_stage(dataset.images, d), cfg.loop, d, steps_per_epoch, epoch_order)

    families = (RANDOM, RANDOM, RANDOM, HOLE) if cfg.task_masks else (RANDOM,)

    def batches(step: int, micro: int):  # + the step's mask family
        return images(step, micro) + (families[step % len(families)],)

    def loss_fn(batch, gen, module):
        imgs, family = batch
        imgs = augmented(imgs, gen)
        if family == RANDOM:
            noise, ratio = _rank_rows(gen, imgs.shape[0], model.num_patches, d), cfg.mask_ratio
        else:
            noise, ratio = _square_noise(gen, imgs.shape[0], model.patch_embed.grid_size, d, hole=family == HOLE)
        with _autocast(d.device):
            return {"loss": module(imgs, noise, ratio)}

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("loop", "device")}
    return run(cfg.loop, d, model, _Pretrain(model), steps_per_epoch, batches, loss_fn,
               lambda: {"config": {"model": cfg.model, "overrides": {}}, "settings": settings})
