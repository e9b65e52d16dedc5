"""What the method needs from a kind of model: the interface every family module implements.

The trainer, eval, demo and benchmarks are written once, against this interface, and never name a
family. A family supplies:

- its models: named configs, how they are built (with the reference's constructor names as
  overrides) and loaded (the official checkpoints' keys), and the images they take;
- the method's parts: what trains (its encoder, or the whole model for the whole-model
  baselines), the frozen teacher, what one step draws for the global batch (from the step's
  generator, each rank taking its rows, so DDP and --resume stay exact), the student's features
  and the one routed teacher pass's, and its baselines' whole-model losses;
- its own recipe (optimizer settings the reference trains with) and loss normalisation;
- pretraining from scratch (the demo's original models), and how it generates for eval's tasks.

Features are one tensor (MAE's latent) or a list of them (Palette's 13 encoder maps); the loss
op takes either.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import InvalidValue


@dataclass(frozen=True)
class DemoSettings:
    """`fastforget demo`'s run for a family on the embedded digits, chosen on the training images
    only, never on the test split."""
    model: str  # the config pretrained from scratch
    batch_size: int
    pretrain_epochs: float
    pretrain: dict  # LoopConfig fields (blr or lr, ...) and PretrainConfig options (task_masks)
    unlearn_epochs: float
    unlearn: dict  # LoopConfig fields and UnlearnConfig options (forget_weight, ...)
    eval_seeds: tuple = (0,)  # the sampler's seeds; each metric is their mean
    # Parts pretrained before the model (Family.pretrain_parts but the last): (part, epochs, options).
    pretrain_first: tuple = ()


@dataclass(frozen=True)
class Recipe:
    """The optimizer and schedule a reference trains with (the loop's settings left unset take
    these). lr, when set, is absolute; otherwise lr = blr * global batch / 256."""
    blr: Optional[float] = 1e-4
    lr: Optional[float] = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # warmup then half-cycle cosine, or "constant"
    warmup_fraction: float = 0.05
    clip_grad: float = 3.0  # 0: no clipping


class Family:
    """One kind of model. Subclasses fill in every method; see the module docstring."""

    name: str = ""
    model_type: type = nn.Module  # the class of its models
    configs: Mapping[str, dict] = {}
    tasks: Sequence[str] = ()  # eval's tasks it generates for
    normalize: str = "reference"  # unlearn_loss's normalisation, as the reference's loss
    unlearn_recipe: Recipe = Recipe()
    pretrain_recipe: Recipe = Recipe(blr=1.5e-4)
    pretrain_parts: Sequence[str] = ("model",)  # what pretraining trains, in order (PretrainConfig.part)
    # Method options only some families take (name -> default); giving another family one is an error.
    options: Mapping[str, Any] = {}
    folder_augment: str = "none"  # image folders' default augmentation, as the reference trains
    demo: Optional[DemoSettings] = None

    def default_augment(self, data: str) -> str:
        """The digits are never augmented (8x8 strokes, which a mirror or a fifth of the image
        would not keep); image folders as the reference trains."""
        return "none" if data == "digits" else self.folder_augment

    # -- models ------------------------------------------------------------------------------

    def create(self, name: str, **overrides) -> nn.Module:
        raise NotImplementedError

    def load(self, path: str, name: Optional[str] = None, checkpoint: Optional[dict] = None, **overrides) -> nn.Module:
        """A model from a checkpoint file (checkpoint: its content, already read)."""
        raise NotImplementedError

    def owns(self, state: dict) -> bool:
        """Whether a state dict is one of this family's models (its keys)."""
        raise NotImplementedError

    def image_shape(self, model: nn.Module) -> tuple[int, int]:
        """(channels, side) of the [0, 1] images the model takes."""
        raise NotImplementedError

    # -- the method --------------------------------------------------------------------------

    def trainable(self, model: nn.Module, whole: bool) -> nn.Module:
        """Marks what trains (the encoder; the whole model for the whole-model baselines) and
        returns the module that trains, which DDP wraps; forward(images, step) -> features (the
        encoder) or the family's baseline outputs (whole)."""
        raise NotImplementedError

    def teacher(self, model: nn.Module, device: torch.device, whole: bool) -> nn.Module:
        """The frozen original: its encoder alone unless the baseline needs the whole model;
        bfloat16 on the GPU."""
        raise NotImplementedError

    def draw(self, model: nn.Module, images: Tensor, is_forget: Tensor, gen: torch.Generator, d, cfg) -> Any:
        """What one step draws for this rank's rows of the global batch."""
        raise NotImplementedError

    def teacher_features(self, teacher: nn.Module, images: Tensor, is_forget: Tensor, step: Any,
                         gen: torch.Generator, d, cfg):
        """The one teacher pass (no grad): its input routed row by row for cfg.method."""
        raise NotImplementedError

    def baseline_loss(self, method: str, model: nn.Module, module: nn.Module, teacher: nn.Module, images: Tensor,
                      is_forget: Tensor, step: Any, gen: torch.Generator, d, cfg) -> dict[str, Tensor]:
        """{"loss", "retain_loss", "forget_loss"} of a whole-model baseline (max-loss,
        noisy-label, retain-label); module is trainable(model, whole=True), maybe DDP-wrapped."""
        raise NotImplementedError

    # -- pretraining and eval ----------------------------------------------------------------

    def pretrain_step(self, model: nn.Module, cfg, d) -> tuple[nn.Module, Callable]:
        """(the module that trains, loss_fn(batch, generator, module) -> {"loss"}) for training
        from scratch on images alone; batch = (images, pretrain_mode(cfg, step))."""
        raise NotImplementedError

    def pretrain_mode(self, cfg, step: int):
        """What kind of step pretraining takes at `step` (MAE: random or task-shaped masks): a
        small constant, so a compiled loss sees few values."""
        return None

    def removed_region(self, model: nn.Module, task: str, ratio: float) -> Tensor:
        """(1, 1, H, W) float: 1 where the task removes the image."""
        raise NotImplementedError

    def complete(self, model: nn.Module, images: Tensor, task: str, ratio: float, seed: int,
                 steps: Optional[int] = None) -> Tensor:
        """The model's completion of images (in [0, 1]) for the task: the given pixels kept, the
        removed region generated (seed fixes any randomness; steps: a sampler's, where it has one)."""
        raise NotImplementedError

    def generation_note(self, steps: Optional[int]) -> str:
        """What eval's results say of how complete() generated with `steps` ('' when nothing)."""
        return ""

    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        """(B, F) features of images from the model's encoder (eval's `--features encoder`)."""
        raise NotImplementedError

    def demo_summary(self, models: dict, sets: dict, out: str, seed: int) -> tuple[dict, str]:
        """A family's own quick demo numbers beside the paper's metrics (report entries, a table),
        with any picture of them written under out; none by default."""
        return {}, ""

    # -- shared helpers ----------------------------------------------------------------------

    def check_option(self, name: str, value):
        """A method option's value: the family's default when not given; given to a family that
        does not take it, an error that names it."""
        if name not in self.options:
            if value is not None:
                raise InvalidValue(f"{name} (--{name.replace('_', '-')}) does not apply to the {self.name} family")
            return None
        return self.options[name] if value is None else value

    def config_of(self, name: str) -> dict:
        if name not in self.configs:
            raise InvalidValue(f"unknown {self.name} model {name!r}; expected one of {sorted(self.configs)}")
        return self.configs[name]


def record_config(model: nn.Module, family: str, name: str, overrides: dict) -> nn.Module:
    """What checkpoints record, so the model can be rebuilt: its family, config name and overrides."""
    model.config_name = name
    model.fastforget_config = {"family": family, "model": name, "overrides": dict(overrides)}
    return model


def training_autocast(device: torch.device):
    """The precision every training forward runs in: bf16 autocast on the GPU, float32 on the CPU
    (where bf16 autocast is slower)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def noise_like(target, gen: torch.Generator):
    """Random-encoder's forget target: for each tensor, Gaussian noise with that tensor's (whole
    batch's) mean and unbiased std, as the references draw it."""
    if isinstance(target, Tensor):
        return torch.randn(target.shape, generator=gen, device=target.device) * target.float().std() \
            + target.float().mean()
    return [noise_like(t, gen) for t in target]
