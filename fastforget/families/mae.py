"""The MAE family: a masked autoencoder ViT (fastforget.models.mae, facebookresearch/mae's keys).

The method on MAE (Li et al., ICLR 2024): the encoder (patch embedding, cls token, blocks, final
norm) trains; one random mask per row, shared by student and teacher; make_teacher_batch routes
forget rows to noise images; one teacher pass; the loss on the two latents (B, 1 + K, D).

The baselines, as the reference code defines them (alpha = forget_weight):
- max-loss: the whole model trains; retain reconstruction loss - alpha * forget reconstruction loss.
- noisy-label: the whole model trains; forget rows are reconstructed towards noise images (made as
  make_teacher_batch makes them), retain rows towards themselves.
- retain-label: the whole model trains; retain rows match the original model's outputs, forget rows
  the original model's outputs for the batch's retain rows.
- random-encoder: only the encoder trains; forget rows' target is Gaussian noise with the mean and
  std of the teacher's latents (of clean images); retain rows as ours.
The reference's baseline loss weights its forget term by (1 + label), which is zero on forget rows
(label -1 there): it never trains on them. Here every baseline weights the forget term by alpha,
the intended semantics.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..distributed import Dist, rank_rows
from ..models import mae as mae_model
from ..ops import make_teacher_batch, random_masking
from .base import DemoSettings, Family, Recipe, record_config, training_autocast


@dataclass
class MaskStep:
    """One step's masks for this rank's rows: MAE's random_masking of uniform noise."""
    ids_keep: Tensor  # (B, K)
    ids_restore: Tensor  # (B, L)
    mask: Tensor  # (B, L), 1 = removed


class Encoder(nn.Module):
    """The student's encoder as a module of its own (what DDP wraps): E(images, ids_keep)."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, images: Tensor, step: MaskStep) -> Tensor:
        return self.mae.encode(images, step.ids_keep)


class Reconstructor(nn.Module):
    """The whole MAE as the whole-model baselines train it: (images, masks) -> predicted patches."""

    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, images: Tensor, step: MaskStep) -> Tensor:
        return self.mae.forward_decoder(self.mae.encode(images, step.ids_keep), step.ids_restore)



def _masked_error(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """(B,): each row's mean squared error over its removed patches (MAE's loss, per sample)."""
    return (((pred.float() - target.float()) ** 2).mean(-1) * mask).sum(1) / mask.sum(1)


def _set_means(per_row: Tensor, is_forget: Tensor) -> tuple[Tensor, Tensor]:
    """(retain mean, forget mean) of per-row values; an empty set gives 0 (no host sync)."""
    f = is_forget.float()
    return ((per_row * (1 - f)).sum() / (1 - f).sum().clamp_min(1), (per_row * f).sum() / f.sum().clamp_min(1))


def noise_images(images: Tensor, is_forget: Tensor, gen: torch.Generator, d: Dist, noise: str) -> Tensor:
    """The teacher batch: retain rows as they are, forget rows noise images (this rank's rows of the
    global batch's stream)."""
    return make_teacher_batch(images, is_forget, noise=noise, clamp=(0.0, 1.0), generator=gen,
                              first_row=d.rank * images.shape[0])


RANDOM, HOLE, WINDOW = "random", "hole", "window"  # pretraining's mask families


def square_noise(gen: torch.Generator, batch: int, grid: tuple[int, int], d: Dist, hole: bool) -> tuple[Tensor, float]:
    """This rank's rows of mask noise removing a random square (hole) or all but one (window), and
    the mask ratio that keeps exactly the rest; drawn for the global batch like rank_rows."""
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


class _Pretrain(nn.Module):
    def __init__(self, mae: nn.Module):
        super().__init__()
        self.mae = mae

    def forward(self, imgs: Tensor, noise: Tensor, mask_ratio: float) -> Tensor:
        return self.mae(imgs, mask_ratio, noise)[0]


class MAE(Family):
    name = "mae"
    model_type = mae_model.MaskedAutoencoderViT
    configs = mae_model.CONFIGS
    tasks = ("inpaint", "outpaint")
    normalize = "reference"  # the reference code's 2/B sums: exact under DDP
    unlearn_recipe = Recipe(blr=1e-4)  # AdamW (0.9, 0.95), wd 0.05, warmup + cosine, clip 3 (main_unlearn.py)
    pretrain_recipe = Recipe(blr=1.5e-4)
    options = {"mask_ratio": 0.75, "noise": "normal"}
    folder_augment = "crop-flip"  # main_unlearn.py's RandomResizedCrop(0.2-1) and flip
    # 80 pretraining epochs, one step in four with an inpainting-shaped hole; 200 unlearning epochs
    # at base lr 2e-2 (chosen on the training images' losses and reconstructions).
    demo = DemoSettings(model="mae_vit_tiny", batch_size=128, pretrain_epochs=80,
                        pretrain={"blr": 1.5e-3, "task_masks": True}, unlearn_epochs=200, unlearn={"blr": 2e-2})

    # -- models

    def create(self, name: str, **overrides) -> nn.Module:
        return record_config(mae_model.create_mae(name, **overrides), self.name, name, overrides)

    def load(self, path: str, name: Optional[str] = None, checkpoint: Optional[dict] = None, **overrides) -> nn.Module:
        model = mae_model.load_mae(path, name, checkpoint=checkpoint, **overrides)
        return record_config(model, self.name, model.config_name, model.overrides)

    def owns(self, state: dict) -> bool:
        # MAGE keeps MAE's unused patch_embed and decoder_pred: its token embedding tells them apart
        return "patch_embed.proj.weight" in state and "decoder_pred.weight" in state \
            and "token_emb.word_embeddings.weight" not in state

    def image_shape(self, model) -> tuple[int, int]:
        return model.patch_embed.proj.in_channels, model.patch_embed.img_size[0]

    # -- the method

    def trainable(self, model, whole: bool) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(whole)
        for p in model.encoder_parameters():
            p.requires_grad_(True)
        model.pos_embed.requires_grad_(False)  # MAE's positions are fixed
        model.decoder_pos_embed.requires_grad_(False)
        return Reconstructor(model) if whole else Encoder(model)

    def teacher(self, model, device: torch.device, whole: bool) -> nn.Module:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return teacher.to(torch.bfloat16) if device.type == "cuda" else teacher

    def draw(self, model, images, is_forget, gen, d, cfg) -> MaskStep:
        noise = rank_rows(torch.rand, gen, images.shape[0], model.num_patches, d=d)
        ids_keep, ids_restore, mask = random_masking(images.shape[0], model.num_patches, cfg.mask_ratio,
                                                     device=d.device, noise=noise)
        return MaskStep(ids_keep, ids_restore, mask)

    def teacher_features(self, teacher, images, is_forget, step, gen, d, cfg) -> Tensor:
        if cfg.method == "random-encoder":  # its target's statistics come from the clean batch
            return teacher.encode(images, step.ids_keep)
        return teacher.encode(noise_images(images, is_forget, gen, d, cfg.noise), step.ids_keep)

    def baseline_loss(self, method, model, module, teacher, images, is_forget, step, gen, d, cfg) -> dict:
        alpha = cfg.forget_weight
        with training_autocast(d.device):
            pred = module(images, step)
        if method == "max-loss":
            retain, forget = _set_means(_masked_error(pred, model.target(images), step.mask), is_forget)
            return {"loss": retain - alpha * forget, "retain_loss": retain, "forget_loss": forget}
        if method == "noisy-label":
            target = model.target(noise_images(images, is_forget, gen, d, cfg.noise))
        else:  # retain-label: forget rows take the original's output for a retain row of the batch
            with torch.no_grad():
                original_pred = teacher.forward_decoder(teacher.encode(images, step.ids_keep), step.ids_restore)
            target = torch.where(is_forget[:, None, None], original_pred[retain_rows(is_forget)], original_pred)
        retain, forget = _set_means(_masked_error(pred, target, step.mask), is_forget)
        return {"loss": retain + alpha * forget, "retain_loss": retain, "forget_loss": forget}

    # -- pretraining and eval

    def pretrain_mode(self, cfg, step: int) -> str:
        return (RANDOM, RANDOM, RANDOM, HOLE)[step % 4] if cfg.task_masks else RANDOM

    def pretrain_step(self, model, cfg, d):
        def loss_fn(batch, gen, module):
            imgs, family = batch
            if family == RANDOM:
                noise, ratio = rank_rows(torch.rand, gen, imgs.shape[0], model.num_patches, d=d), cfg.mask_ratio
            else:
                noise, ratio = square_noise(gen, imgs.shape[0], model.patch_embed.grid_size, d, hole=family == HOLE)
            with training_autocast(d.device):
                return {"loss": module(imgs, noise, ratio)}
        return _Pretrain(model), loss_fn

    def removed_patches(self, model, task: str, ratio: float) -> Tensor:
        """(L,) bool, True for the patches the task removes: a centre square of side `ratio` of the
        grid (inpaint), or all but it (outpaint)."""
        grid_h, grid_w = model.patch_embed.grid_size
        side_h, side_w = max(1, round(grid_h * ratio)), max(1, round(grid_w * ratio))
        centre = torch.zeros(grid_h, grid_w, dtype=torch.bool)
        top, left = (grid_h - side_h) // 2, (grid_w - side_w) // 2
        centre[top:top + side_h, left:left + side_w] = True
        return (centre if task == "inpaint" else ~centre).reshape(-1)

    def removed_region(self, model, task: str, ratio: float) -> Tensor:
        channels = model.patch_embed.proj.in_channels
        per_patch = self.removed_patches(model, task, ratio).float()[None, :, None]
        return model.unpatchify(per_patch.expand(1, -1, model.patch_size ** 2 * channels))[:, :1]

    @torch.no_grad()
    def complete(self, model, images: Tensor, task: str, ratio: float, seed: int, steps=None) -> Tensor:
        removed = self.removed_patches(model, task, ratio)
        batch = images.shape[0]
        order = torch.cat([(~removed).nonzero()[:, 0], removed.nonzero()[:, 0]]).to(images.device)
        ids_keep = order[: int((~removed).sum())].expand(batch, -1).contiguous()
        ids_restore = torch.argsort(order).expand(batch, -1)
        recon = model.reconstruct(model.forward_decoder(model.encode(images, ids_keep), ids_restore)).clamp(0, 1)
        region = self.removed_region(model, task, ratio).to(images.device, images.dtype)
        return images * (1 - region) + recon * region

    @torch.no_grad()
    def embed(self, model, images: Tensor) -> Tensor:
        ids = torch.arange(model.num_patches, device=images.device).expand(images.shape[0], -1)
        return model.encode(images, ids)[:, 1:].mean(1)

    def demo_summary(self, models: dict, sets: dict, out: str, seed: int) -> tuple[dict, str]:
        """The removed patches' reconstruction MSE at random masks (mask ratio 0.75, [0, 1] pixels)
        on the test images, and reconstructions.png."""
        for model in models.values():
            model.eval()
        mse = {name: {split: {"mse": removed_patch_mse(model, s.images, DEMO_MASK_RATIO, seed + 1)}
                      for split, s in sets.items()} for name, model in models.items()}
        save_reconstructions(models, sets, os.path.join(out, "reconstructions.png"), seed + 2)
        return {"mask_ratio": DEMO_MASK_RATIO, "models": mse}, format_mse_report(mse)


def retain_rows(is_forget: Tensor) -> Tensor:
    """(B,): for row i, the batch's retain row i mod n_retain (retain rows first in a stable sort),
    computed on the device (no host sync). Retain-label's forget rows take their targets from it."""
    order = torch.argsort(is_forget.to(torch.uint8), stable=True)
    n_retain = (~is_forget).sum().clamp_min(1)
    return order[torch.remainder(torch.arange(is_forget.shape[0], device=is_forget.device), n_retain)]


# -- the demo's quick numbers: removed-patch MSE at random masks (mask ratio 0.75) ---------------

DEMO_MASK_RATIO = 0.75


@torch.no_grad()
def masked_reconstruction(model, images: Tensor, mask_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """(reconstruction in [0, 1], mask (B, L)) with masks drawn from seed: the same for every model."""
    noise = torch.rand(images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed))
    latent, mask, ids_restore = model.forward_encoder(images, mask_ratio, noise)
    return model.reconstruct(model.forward_decoder(latent, ids_restore)).clamp(0, 1), mask


def removed_patch_mse(model, images: Tensor, mask_ratio: float, seed: int) -> float:
    recon, mask = masked_reconstruction(model, images, mask_ratio, seed)
    per_patch = ((model.patchify(recon) - model.patchify(images)) ** 2).mean(-1)
    return float((per_patch * mask).sum() / mask.sum())


def _kept_pixels(model, images: Tensor, mask: Tensor) -> Tensor:
    """1 on the pixels of kept patches, 0 on removed ones, (B, C, H, W)."""
    return model.unpatchify((1 - mask)[..., None].expand(-1, -1, model.patchify(images).shape[-1]))


def format_mse_report(models: dict) -> str:
    base = models["original"]
    lines = [f"{'model':<12} {'forget MSE':>11} {'vs original':>12} {'retain MSE':>11} {'vs original':>12}"]
    for name, m in models.items():
        f, r = m["forget"]["mse"], m["retain"]["mse"]
        lines.append(f"{name:<12} {f:11.4f} {f / base['forget']['mse']:11.2f}x {r:11.4f} "
                     f"{100 * (r / base['retain']['mse'] - 1):+11.1f}%")
    return "\n".join(lines)


def save_reconstructions(models, sets, path: str, seed: int, per_set: int = 6) -> None:
    """Rows: originals, masked inputs (removed patches grey), then each model's reconstruction of
    the removed patches pasted into the kept ones, as MAE shows them; forget then retain columns,
    each row and group named on the image."""
    from ..eval.pictures import save_grid

    images = torch.cat([s.images[:per_set] for s in sets.values()])
    rows = [("ground truth", images)]
    for name, model in models.items():
        recon, mask = masked_reconstruction(model, images, DEMO_MASK_RATIO, seed)
        kept = _kept_pixels(model, images, mask)
        if len(rows) == 1:
            rows.append(("masked input", images * kept + 0.5 * (1 - kept)))
        rows.append((name, images * kept + recon * (1 - kept)))
    classes = {s: ", ".join(data.classes[c] for c in data.labels.unique().tolist()) for s, data in sets.items()}
    groups = [(f"{s} digits {classes[s]}", per_set) for s in sets]
    save_grid(path, rows, groups,
              title=f"test digits, {DEMO_MASK_RATIO:.0%} of patches removed (grey); each model fills them in")
