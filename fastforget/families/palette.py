"""The diffusion family: Palette, guided-diffusion's UNet for inpainting (fastforget.models.palette,
the keys of jpmorganchase/i2i_Palette-Image-to-Image-Diffusion-Models, branch i2i).

The method on Palette (its Network.forward with fix_decoder): the encoder (cond_embed, the input
blocks, the middle block) trains, the decoder stays bit for bit. A step draws for every row a
noise level t in {1, ..., T - 1} and gamma between the levels t - 1 and t, the reference's
hybrid training mask (a random box and brush strokes), the condition's noise eps' and the noise
eps; the student sees cat(y_cond, m x_t + (1 - m) y_0), the teacher the same with forget rows'
holes pure eps (make_diffusion_inputs, one pass); the loss compares the encoders' 13 feature maps,
each as F.mse_loss of the row-masked features (normalize "batch"), summed. The teacher holds no
decoder.

The baselines, as the reference defines them (its README table and Network.forward's branches):
- max-loss: the whole UNet trains on mse(m eps r, m eps_hat r) - alpha mse(m eps f, m eps_hat f),
  its input the real x_t;
- noisy-label: the whole UNet, input the teacher's (forget holes pure eps), target eps: the model
  learns that a noise hole is noise;
- retain-label: the whole UNet; retain rows distil the original's eps_hat, forget rows the
  original's eps_hat for the batch's retain rows (noise when there are none), over the whole image;
- random-encoder: ours' retain term; forget rows' target Gaussian noise with each teacher
  feature's (whole batch's) mean and std.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..distributed import Dist, rank_rows
from ..models import palette as palette_model
from ..ops import make_diffusion_inputs, unlearn_loss
from .base import DemoSettings, Family, Recipe, record_config, training_autocast
from .mae import retain_rows


@dataclass
class DiffusionStep:
    """One step's draws for this rank's rows, and the inputs they make."""
    gammas: Tensor  # (B,) noise levels
    mask: Tensor  # (B, 1, H, W) bool, True in the hole
    student_input: Tensor  # (B, C_cond + C, H, W)
    teacher_input: Tensor  # the same, forget rows' holes pure noise
    noise: Optional[Tensor]  # eps (B, C, H, W), drawn explicitly when a baseline's target needs it


class Encoder(nn.Module):
    """The UNet's encoder as a module of its own (what DDP wraps): the 13 feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, step: DiffusionStep) -> list[Tensor]:
        return self.model.encoder_features(step.student_input, step.gammas)


class Denoiser(nn.Module):
    """The whole UNet as the whole-model baselines train it: (input, gammas) -> eps_hat."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, gammas: Tensor) -> Tensor:
        return self.model(x, gammas)



# -- the reference's training masks, drawn on the device for the global batch ---------------------

STROKES, VERTICES = 3, 11  # brush_stroke_mask: 1-3 strokes of 4-11 segments


def hybrid_masks(gen: torch.Generator, batch: int, size: int, d: Dist) -> Tensor:
    """(batch, 1, size, size) bool: this rank's rows of the global batch's "hybrid" masks, a box
    united with brush strokes, as Palette's data/util/mask.py draws them at 256 px (random_bbox:
    a box of 128 - delta px 20 px from the edges; brush_stroke_mask: 1-3 strokes of 4-11 vertices
    around 2 pi / 5, radius N(r, r / 2) with r = the diagonal / 8, widths 12-40 px), scaled to
    size. Drawn from the step's generator on the device, with no host round trip; the distribution
    is the reference's, not its numpy stream. The reference's random flips are no-ops, so none."""
    rows, dev, s = d.world * batch, d.device, size / 256
    max_side, margin, delta = max(1, round(128 * s)), round(20 * s), round(40 * s)

    def integers(low: int, high: int, shape) -> Tensor:  # randint(low, high) for `rows` rows, float
        return torch.randint(low, max(high, low + 1), (rows, *shape), generator=gen, device=dev).float()

    coord = torch.arange(size, device=dev, dtype=torch.float32)
    box = torch.ones(rows, size, size, dtype=torch.bool, device=dev)
    for axis in (1, 2):  # rows then columns: top (left) and the shrunk side, each drawn as random_bbox
        start = integers(margin, size - margin - max_side, ())
        shrink = integers(0, delta // 2 + 1, ())
        start, side = start + shrink, max_side - shrink
        inside = (coord[None] >= start[:, None]) & (coord[None] < (start + side)[:, None])
        box &= inside[:, :, None] if axis == 1 else inside[:, None, :]

    radius = math.sqrt(2 * size * size) / 8
    strokes = integers(1, 4, ())  # loop_num = randint(1, max_loops=4)
    vertices = integers(4, 12, (STROKES,))  # num_vertex per stroke
    uniform = lambda *shape: torch.rand((rows, *shape), generator=gen, device=dev)  # noqa: E731
    spread = 2 * math.pi / 15
    low = 2 * math.pi / 5 - uniform(STROKES, 1) * spread
    high = 2 * math.pi / 5 + uniform(STROKES, 1) * spread
    angles = low + (high - low) * uniform(STROKES, VERTICES)
    even = torch.arange(VERTICES, device=dev) % 2 == 0
    angles = torch.where(even, 2 * math.pi - angles, angles)
    lengths = (torch.randn((rows, STROKES, VERTICES), generator=gen, device=dev) * (radius // 2) + radius)
    lengths = lengths.clamp(0, 2 * radius)
    widths = (12 + 28 * uniform(STROKES)) * s
    x, y = integers(0, size, (STROKES,)), integers(0, size, (STROKES,))
    px, py = coord[None, None, None, :], coord[None, None, :, None]
    radius2 = ((widths / 2) ** 2)[..., None, None]  # (rows, strokes, 1, 1)
    stroke_live = torch.arange(STROKES, device=dev)[None] < strokes[:, None]
    strokes_mask = torch.zeros(rows, size, size, dtype=torch.bool, device=dev)
    for v in range(VERTICES):  # segment v of every stroke at once, each a capsule of its stroke's width
        nx = (x + lengths[..., v] * torch.cos(angles[..., v])).clamp(0, size).floor()
        ny = (y + lengths[..., v] * torch.sin(angles[..., v])).clamp(0, size).floor()
        live = ((v < vertices) & stroke_live)[..., None, None]
        ax, ay, dx, dy = x[..., None, None], y[..., None, None], (nx - x)[..., None, None], (ny - y)[..., None, None]
        along = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-9)).clamp(0, 1)
        dist2 = (px - ax - along * dx) ** 2 + (py - ay - along * dy) ** 2
        strokes_mask |= (live & (dist2 <= radius2)).any(1)
        x, y = nx, ny
    masks = (box | strokes_mask)[:, None]
    return masks[d.rank * batch:(d.rank + 1) * batch]


def centre_box(size: int, ratio: float, device=None) -> Tensor:
    """(1, 1, size, size) float: the test mask, a centre square of side int(size * ratio)
    (the reference's "center" mask at ratio 0.5: the box [H/4, 3H/4))."""
    side = max(1, int(size * ratio))
    top = (size - side) // 2
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., top:top + side, top:top + side] = 1.0
    return mask


class Palette(Family):
    name = "palette"
    model_type = palette_model.Palette
    configs = palette_model.CONFIGS
    tasks = ("inpaint",)  # the reference wires centre-box inpainting only
    normalize = "batch"  # weighted_mse_loss: F.mse_loss of the row-masked features
    # config/inpainting_places2_unlearn.json: Adam, lr 5e-5, no weight decay, no schedule, no clip
    unlearn_recipe = Recipe(blr=None, lr=5e-5, weight_decay=0.0, betas=(0.9, 0.999), schedule="constant",
                            warmup_fraction=0.0, clip_grad=0.0)
    pretrain_recipe = unlearn_recipe
    options = {}
    folder_augment = "none"  # Resize, ToTensor, Normalize: no augmentation
    # Chosen on the training images only (120 forget and 120 retain training digits, 3 sampler
    # seeds; benchmarks/results/2026-12-01-palette-demo.md has the runs behind it): 90 pretraining
    # epochs at lr 2e-3 (45 gave FID 136 where 90 gives 76); unlearning at lr 1e-3, alpha 1, 200
    # epochs (lr 2e-4 and alpha 0.1 forgot x1.22; alpha 0.5 for 100 epochs x1.87 to x2.22).
    demo = DemoSettings(model="palette_tiny", batch_size=64, pretrain_epochs=90, pretrain={"lr": 2e-3},
                        unlearn_epochs=200, unlearn={"lr": 1e-3, "forget_weight": 1.0}, eval_seeds=(0, 1, 2))

    # -- models

    def create(self, name: str, **overrides) -> nn.Module:
        return record_config(palette_model.create_palette(name, **overrides), self.name, name, overrides)

    def load(self, path: str, name: Optional[str] = None, checkpoint: Optional[dict] = None, **overrides) -> nn.Module:
        model = palette_model.load_palette(path, name, checkpoint=checkpoint, **overrides)
        return record_config(model, self.name, model.config_name, model.overrides)

    def owns(self, state: dict) -> bool:
        return any(k.removeprefix("module.").startswith("denoise_fn.input_blocks.") for k in state)

    def image_shape(self, model) -> tuple[int, int]:
        return model.denoise_fn.out_channel, model.denoise_fn.image_size

    # -- the method

    def trainable(self, model, whole: bool) -> nn.Module:
        model.requires_grad_(whole)
        for module in model.denoise_fn.encoder_modules():
            module.requires_grad_(True)
        return Denoiser(model) if whole else Encoder(model)

    def teacher(self, model, device: torch.device, whole: bool) -> nn.Module:
        """The frozen original UNet, in the student's mode (the reference's teacher follows
        netG.train(): its dropout, when the config has one, is live); its decoder is not even copied
        unless retain-label needs the whole UNet."""
        unet = model.denoise_fn
        decoder = {name: unet._modules[name] for name in ("output_blocks", "out")}
        if not whole:  # copied without the decoder, which is put back at once
            unet._modules.update(output_blocks=nn.ModuleList(), out=nn.Identity())
        try:
            teacher = copy.deepcopy(unet).requires_grad_(False)
        finally:
            unet._modules.update(decoder)
        return teacher.to(torch.bfloat16) if device.type == "cuda" else teacher

    def draw(self, model, images, is_forget, gen, d, cfg) -> DiffusionStep:
        return self._draw(model, images, is_forget, gen, d, explicit_noise=cfg.method in ("max-loss", "noisy-label"))

    def _draw(self, model, images, is_forget, gen, d, explicit_noise: bool) -> DiffusionStep:
        """The draws in a fixed order (t, then gamma's place between levels, the masks, the
        condition's noise, then the noise: drawn when a target needs it, else Philox in the op)."""
        batch, size, shape = images.shape[0], images.shape[-1], images.shape[1:]
        y_0 = images * 2 - 1  # [0, 1] -> Palette's [-1, 1]
        t = rank_rows(lambda size, **kw: torch.randint(1, model.num_timesteps, size, **kw), gen, batch, d=d)
        gammas = model.sample_gammas(t, rank_rows(torch.rand, gen, batch, d=d))
        mask = hybrid_masks(gen, batch, size, d)
        y_cond = torch.where(mask, rank_rows(torch.randn, gen, batch, *shape, d=d), y_0)
        noise = rank_rows(torch.randn, gen, batch, *shape, d=d) if explicit_noise else None
        student, teacher = make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise=noise, generator=gen,
                                                 first_row=d.rank * batch)
        return DiffusionStep(gammas, mask, student, teacher, noise)

    def teacher_features(self, teacher, images, is_forget, step, gen, d, cfg) -> list[Tensor]:
        return teacher.encoder_features(step.teacher_input.to(next(teacher.parameters()).dtype), step.gammas)

    def baseline_loss(self, method, model, module, teacher, images, is_forget, step, gen, d, cfg) -> dict:
        alpha = cfg.forget_weight
        if method == "retain-label":
            with torch.no_grad():
                original = teacher(step.student_input.to(next(teacher.parameters()).dtype), step.gammas)
                has_retain = (~is_forget).any()
                substitute = torch.where(has_retain, original[retain_rows(is_forget)],
                                         torch.randn(original.shape, generator=gen, device=original.device))
            with training_autocast(d.device):
                predicted = module(step.student_input, step.gammas)
            out = unlearn_loss(predicted, original, substitute, is_forget, forget_weight=alpha, normalize="batch")
        else:  # max-loss: the real x_t, the forget term ascended; noisy-label: noise holes, their noise the target
            x = step.student_input if method == "max-loss" else step.teacher_input
            with training_autocast(d.device):
                predicted = module(x, step.gammas)
            hole = step.mask.to(predicted.dtype)
            target = hole * step.noise
            out = unlearn_loss(hole * predicted, target, target, is_forget, forget_weight=-alpha if method == "max-loss"
                               else alpha, normalize="batch")
        return {"loss": out.loss, "retain_loss": out.retain_loss, "forget_loss": out.forget_loss}

    # -- pretraining and eval

    def pretrain_step(self, model, cfg, d):
        """Palette's own training: mse(m eps, m eps_hat) on hybrid masks, x_t at a random level."""
        def loss_fn(batch, gen, module):
            imgs, _ = batch
            everyone = torch.zeros(imgs.shape[0], dtype=torch.bool, device=imgs.device)
            step = self._draw(model, imgs, everyone, gen, d, explicit_noise=True)
            with training_autocast(d.device):
                predicted = module(step.student_input, step.gammas)
            hole = step.mask.to(predicted.dtype)
            return {"loss": F.mse_loss((hole * predicted).float(), (hole * step.noise).float())}
        return Denoiser(model), loss_fn

    def removed_region(self, model, task: str, ratio: float) -> Tensor:
        return centre_box(model.denoise_fn.image_size, ratio)

    @torch.no_grad()
    def complete(self, model, images: Tensor, task: str, ratio: float, seed: int, steps: Optional[int] = None) -> Tensor:
        """The reference's test: y_cond = the image with noise in the centre box, then the sampler
        from y_t = y_cond, the known pixels put back at every step (steps: a strided schedule)."""
        gen = torch.Generator(device=images.device).manual_seed(seed)
        y_0 = images * 2 - 1
        mask = centre_box(images.shape[-1], ratio, images.device).expand(images.shape[0], 1, -1, -1)
        y_cond = y_0 * (1 - mask) + mask * torch.randn(y_0.shape, generator=gen, device=images.device)
        out = model.inpaint(y_cond, y_0, mask, gen, steps=steps)
        return ((out + 1) / 2).clamp(0, 1)

    def generation_note(self, steps: Optional[int]) -> str:
        if steps is None:
            return ""
        return (f"sampler: a strided schedule of {steps} steps, for speed; not the reference's sampler, which takes "
                "every step of the model's own schedule")

    @torch.no_grad()
    def embed(self, model, images: Tensor) -> Tensor:
        """The middle block's features of the clean image (condition = image, noise level 1), pooled."""
        y_0 = images * 2 - 1
        gammas = torch.ones(images.shape[0], device=images.device)
        return model.encoder_features(torch.cat([y_0, y_0], dim=1), gammas)[-1].mean((2, 3))
