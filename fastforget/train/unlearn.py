"""`fastforget unlearn` and `fastforget pretrain`, for a model of any family (fastforget.families).

Unlearning (Li, Hsu, Chen, Marculescu, ICLR 2024), method "ours": only the encoder trains; the
decoder and the teacher (a frozen copy of the original encoder, in bf16 on the GPU, never in DDP)
do not. A step: the family draws what the step needs for the global batch (masks; noise levels,
noise and inpainting masks) from the step's generator; ONE teacher pass on an input routed row by
row (retain rows as the student sees them, forget rows with noise); unlearn_loss on the two
encoders' features. random-encoder keeps ours' retain term and takes Gaussian noise with the
teacher features' statistics as its forget target. The whole-model baselines (max-loss,
noisy-label, retain-label) are each family's, as its reference defines them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import audit, families
from ..distributed import Dist, rank_rows
from ..families.base import noise_like, training_autocast
from ..ops import unlearn_loss
from ..ops.unlearn_loss import NORMALIZE
from . import batches as batches_lib, data as data_lib
from .augment import AUGMENTS, DRAWS, crop_flip, crop_flip_params, source_size
from .loop import LoopConfig, is_count, is_real, require, run, setup_distributed, step_generator

METHODS = ("ours", "max-loss", "noisy-label", "retain-label", "random-encoder")
WHOLE_MODEL = ("max-loss", "noisy-label", "retain-label")  # the baselines that train the decoder too
CONSTRAINABLE = ("ours", "random-encoder")  # the encoder methods: forget_target applies to them
# How the data are read, held or streamed, changes no number: a run may resume with them changed.
HOW_READ = ("data_memory_mb", "data_workers")


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
    retain_pick: str = "random"  # which real retain samples: random, or the first in class order (Palette's cut)
    class_list: Optional[str] = None  # image directories: a file naming the class folders (Places365's class.txt)
    per_class: Optional[int] = None  # image directories: each class's first files only (the reference's cap)
    skip_bad_images: bool = False  # leave unreadable image files out (counted) instead of stopping
    # Image folders: the MB of decoded images to hold in memory (None: half the free memory);
    # a larger set streams from disk, decoded by data_workers processes (None: batches.default_workers).
    data_memory_mb: Optional[float] = None
    data_workers: Optional[int] = None
    forget_weight: float = 0.2
    # A pull toward the original weights (0: none): after every step each trained parameter moves
    # lr * anchor of the way back, p -= lr * anchor * (p - p_original), as AdamW's decoupled weight
    # decay pulls toward zero. It bounds how far the encoder moves, and so trades forgetting for
    # retain quality (benchmarks/results/2026-12-02-mae-evidence.md).
    anchor: float = 0.0
    # The epsilon-constrained form (the formulation of Feng et al., with the forget loss as the
    # constraint): minimise the retain loss subject to forget loss <= forget_target * the original
    # model's forget loss (measured on the first step's batch before training). Solved by an exact
    # penalty: a step's forget term (weight forget_weight) is on only while the global batch's forget
    # loss is above the target, switched on the device. None: the published method, always on.
    forget_target: Optional[float] = None
    # None: the family's (MAE's "reference", the reference code's 2/B sums, exact under DDP;
    # Palette's "batch", its F.mse_loss of row-masked features).
    normalize: Optional[str] = None
    noise: Optional[str] = None  # MAE: the forget rows' noise images (normal, uniform, constant)
    mask_ratio: Optional[float] = None  # MAE: the share of patches removed
    method: str = "ours"
    model: Optional[str] = None  # from the checkpoint when it records it
    device: Optional[str] = None
    augment: Optional[str] = None  # one of AUGMENTS; None: the family's for the data
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="unlearned"))

    def __post_init__(self):
        require(self, "method", self.method in METHODS, f"one of {METHODS}")
        require(self, "retain_pick", self.retain_pick in data_lib.RETAIN_PICKS, f"one of {data_lib.RETAIN_PICKS}")
        require(self, "per_class", self.per_class is None or is_count(self.per_class, 1), "None or an int >= 1")
        batches_lib.check_memory_mb(self.data_memory_mb)
        batches_lib.check_workers(self.data_workers)
        require(self, "augment", self.augment is None or self.augment in AUGMENTS, f"None or one of {AUGMENTS}")
        require(self, "normalize", self.normalize is None or self.normalize in NORMALIZE, f"None or one of {NORMALIZE}")
        require(self, "forget_weight", is_real(self.forget_weight) and self.forget_weight >= 0, "a finite number >= 0")
        require(self, "anchor", is_real(self.anchor) and self.anchor >= 0, "a finite number >= 0 (0: off)")
        require(self, "forget_target", self.forget_target is None or (
            is_real(self.forget_target) and 0 < self.forget_target <= 1 and self.method in CONSTRAINABLE),
            f"None or a number in (0, 1], with method one of {CONSTRAINABLE}")
        for name in ("retain_ratio", "proxy_ratio"):
            require(self, name, is_real(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        require(self, "mask_ratio", self.mask_ratio is None or (is_real(self.mask_ratio) and 0 <= self.mask_ratio < 1),
                "a number in [0, 1)")

    def for_family(self, family: families.Family) -> "UnlearnConfig":
        """This config with the family's defaults filled in, and its options checked against it."""
        return replace(self, normalize=self.normalize or family.normalize,
                       augment=self.augment or family.default_augment(self.data),
                       noise=family.check_option("noise", self.noise),
                       mask_ratio=family.check_option("mask_ratio", self.mask_ratio),
                       loop=self.loop.with_recipe(family.unlearn_recipe))


def _augmenter(augment: str, size: int, d: Dist) -> Callable[[Tensor, torch.Generator], Tensor]:
    """(images, the step's generator) -> the batch the model sees (train/augment.py)."""
    if augment == "none":
        return lambda imgs, gen: imgs
    return lambda imgs, gen: crop_flip(imgs, size, crop_flip_params(rank_rows(torch.rand, gen, imgs.shape[0], DRAWS,
                                                                              d=d)))


def unlearning_step(cfg: UnlearnConfig, student: nn.Module, d: Dist) -> tuple[nn.Module, Callable]:
    """The trainer's step for cfg.method (cfg with its family's defaults, for_family): marks what
    trains in student (on d.device), makes the frozen teacher, and returns (the module to train and
    wrap for DDP, loss_fn(batch, generator, module) -> {"loss", "retain_loss", "forget_loss"}) with
    batch = (images, is_forget)."""
    family = families.of(student)
    whole = cfg.method in WHOLE_MODEL
    module = family.trainable(student, whole)
    teacher = family.teacher(student, d.device, whole=cfg.method == "retain-label")
    augmented = _augmenter(cfg.augment, family.image_shape(student)[1], d)
    target = ForgetTarget(cfg.forget_target, cfg.forget_weight, d) if cfg.forget_target else None

    def loss_fn(batch, gen, module):
        imgs, is_forget = batch
        imgs = augmented(imgs, gen)
        step = family.draw(student, imgs, is_forget, gen, d, cfg)
        if whole:
            return family.baseline_loss(cfg.method, student, module, teacher, imgs, is_forget, step, gen, d, cfg)
        with torch.no_grad():  # the one teacher pass
            retain_target = family.teacher_features(teacher, imgs, is_forget, step, gen, d, cfg)
            forget_target = noise_like(retain_target, gen) if cfg.method == "random-encoder" else retain_target
        with training_autocast(d.device):
            features = module(imgs, step)
        out = unlearn_loss(features, retain_target, forget_target, is_forget, forget_weight=cfg.forget_weight,
                           normalize=cfg.normalize)
        logged = {"loss": out.loss, "retain_loss": out.retain_loss, "forget_loss": out.forget_loss}
        return logged if target is None else target.constrained(out, logged)

    return module, loss_fn


class ForgetTarget:
    """forget_target's constraint, forget loss <= fraction * the original's, as an exact penalty:
    loss = retain_loss + forget_weight * [global forget loss > limit] * forget_loss. The switch is a
    device tensor (under DDP the forget loss is all-reduced first, so every rank switches alike):
    no host sync. The limit is set by the first batch it sees, which unlearn() makes the original
    model's on step 0's batch, before training (and before a resume loads the student's weights)."""

    def __init__(self, fraction: float, forget_weight: float, d: Dist):
        self.fraction, self.forget_weight, self.d = fraction, forget_weight, d
        self.limit: Optional[Tensor] = None

    def constrained(self, out, logged: dict) -> dict:
        forget = out.forget_loss.detach().clone()
        if self.d.world > 1:
            torch.distributed.all_reduce(forget)
            forget /= self.d.world
        if self.limit is None:
            self.limit = self.fraction * forget
        on = (forget > self.limit).float()
        return {**logged, "loss": out.retain_loss + self.forget_weight * on * out.forget_loss, "forget_on": on}


def anchored(module: nn.Module, anchor: float) -> Optional[Callable[[float], None]]:
    """after_step for cfg.anchor: the trained parameters pulled lr * anchor of the way back to
    their values now (the original's), all in one multi-tensor op on the device; None when 0."""
    if not anchor:
        return None
    params = [p for p in module.parameters() if p.requires_grad]
    originals = [p.detach().clone() for p in params]

    @torch.no_grad()
    def pull(lr: float) -> None:
        torch._foreach_lerp_(params, originals, min(lr * anchor, 1.0))

    return pull


def unlearn(cfg: UnlearnConfig) -> dict:
    """Makes the checkpoint's model forget cfg.forget_classes; writes cfg.loop.out/checkpoint.pt."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    original = families.load(cfg.checkpoint, cfg.model)
    family = families.of(original)
    cfg = cfg.for_family(family)
    channels, side = family.image_shape(original)
    size = source_size(side, cfg.augment)
    dataset = data_lib.load(cfg.data, size, what="--data directory", class_list=cfg.class_list,
                            per_class=cfg.per_class)
    proxy_data = data_lib.load(cfg.proxy_data, size, what="--proxy-data directory",
                               per_class=cfg.per_class) if cfg.proxy_data else None
    for data in (dataset, proxy_data):
        if data is not None:
            data_lib.check_channels(data, channels, original.config_name)
    sets = data_lib.select(dataset, cfg.forget_classes, cfg.retain_classes, cfg.proxy_classes, proxy_data,
                           cfg.retain_ratio, cfg.proxy_ratio, seed=cfg.loop.seed, retain_pick=cfg.retain_pick)
    # Image folders are read only now, and only the chosen files: a forget set, not the whole folder.
    feed = batches_lib.feed([sets.forget, sets.retain], cfg.data_memory_mb, cfg.data_workers, cfg.skip_bad_images, d)
    sets = data_lib.UnlearnSets(*feed.parts)
    n = 2 * max(len(sets.forget), len(sets.retain))
    steps_per_epoch = max(n // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)
    batches = feed.batches(lambda epoch: data_lib.stream(sets, epoch, cfg.loop.seed), steps_per_epoch, cfg.loop, d)
    student = original.to(d.device)
    module, loss_fn = unlearning_step(cfg, student, d)
    if cfg.forget_target:  # sets its limit: the original's forget loss on step 0's batch, before anything trains
        with torch.no_grad():
            loss_fn(batches(0, 0), step_generator(d.device, cfg.loop.seed, 0, 0), module)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("loop", "device", "checkpoint") + HOW_READ}
    record = audit.start(cfg.loop.out, cfg.checkpoint, cfg.method, {**settings, "loop": asdict(cfg.loop)}, cfg.data,
                         sets.forget, sets.retain) if d.main else None

    def begin(first_step: int) -> None:  # rank 0, once the loop accepted the run (and any resume)
        nonlocal record
        record = audit.begin(record, cfg.loop.out, first_step)

    metrics = run(cfg.loop, d, student, module, steps_per_epoch, batches, loss_fn,
                  lambda: {"config": student.fastforget_config, "method": cfg.method,
                           "forget_classes": list(cfg.forget_classes), "settings": settings}, on_start=begin,
                  after_step=anchored(module, cfg.anchor))
    if d.main:
        audit.finish(record, cfg.loop.out, metrics)
    return metrics


@dataclass
class PretrainConfig:
    model: str = "mae_vit_tiny"
    data: str = "digits"
    mask_ratio: Optional[float] = None  # MAE: the share of patches removed (0.75)
    # MAE: every fourth step's masks are task-shaped instead of random: a square hole, half the
    # grid's side, at random places. An MAE trained only on random masks cannot fill large holes,
    # and one cannot unlearn what a model never does.
    task_masks: bool = False
    class_list: Optional[str] = None  # image directories: as UnlearnConfig's
    per_class: Optional[int] = None
    skip_bad_images: bool = False
    data_memory_mb: Optional[float] = None  # as UnlearnConfig's
    data_workers: Optional[int] = None
    device: Optional[str] = None
    augment: Optional[str] = None  # one of AUGMENTS; None: the family's for the data
    overrides: dict = field(default_factory=dict)  # the model's constructor arguments
    # What trains, of the family's pretrain_parts (MAGE: "tokenizer", then "model"); None: the last.
    part: Optional[str] = None
    init: Optional[str] = None  # a checkpoint to start from (the previous part's), instead of a fresh model
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(out="pretrained"))

    def __post_init__(self):
        require(self, "augment", self.augment is None or self.augment in AUGMENTS, f"None or one of {AUGMENTS}")
        require(self, "mask_ratio", self.mask_ratio is None or (is_real(self.mask_ratio) and 0 <= self.mask_ratio < 1),
                "a number in [0, 1)")
        batches_lib.check_memory_mb(self.data_memory_mb)
        batches_lib.check_workers(self.data_workers)

    def for_family(self, family: families.Family) -> "PretrainConfig":
        parts = family.pretrain_parts
        require(self, "part", self.part is None or self.part in parts, f"None or one of {parts} for {family.name}")
        return replace(self, augment=self.augment or family.default_augment(self.data), part=self.part or parts[-1],
                       mask_ratio=family.check_option("mask_ratio", self.mask_ratio),
                       loop=self.loop.with_recipe(family.pretrain_recipe))


def pretrain(cfg: PretrainConfig) -> dict:
    """Trains a model from scratch with its family's own loss: the original model of the demo."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.loop.seed)
    family = families.of_model(cfg.model)
    cfg = cfg.for_family(family)
    model = (family.load(cfg.init, cfg.model) if cfg.init else family.create(cfg.model, **cfg.overrides)).to(d.device)
    channels, side = family.image_shape(model)
    dataset = data_lib.load(cfg.data, source_size(side, cfg.augment), what="--data directory",
                            class_list=cfg.class_list, per_class=cfg.per_class)
    data_lib.check_channels(dataset, channels, cfg.model)
    feed = batches_lib.feed([dataset], cfg.data_memory_mb, cfg.data_workers, cfg.skip_bad_images, d)
    dataset = feed.parts[0]
    augmented = _augmenter(cfg.augment, side, d)
    steps_per_epoch = max(len(dataset) // (cfg.loop.batch_size * cfg.loop.accum_steps * d.world), 1)

    def epoch_order(epoch: int):
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.loop.seed * 7919 + epoch)), None

    images = feed.batches(epoch_order, steps_per_epoch, cfg.loop, d)
    module, family_loss = family.pretrain_step(model, cfg, d)

    def batches(step: int, micro: int):
        return images(step, micro) + (family.pretrain_mode(cfg, step),)

    def loss_fn(batch, gen, module):  # the augmentation first, then the family's draws
        imgs, mode = batch
        return family_loss((augmented(imgs, gen), mode), gen, module)

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("loop", "device") + HOW_READ}
    return run(cfg.loop, d, model, module, steps_per_epoch, batches, loss_fn,
               lambda: {"config": model.fastforget_config, "settings": settings})
