"""The VQ-GAN family: MAGE, a VQGAN tokenizer and a masked-token ViT (fastforget.models.mage, the
keys of jpmorganchase/i2i_mage, branch i2i).

The method on MAGE (its engine_unlearn.py): token_emb (word and position embeddings, LayerNorm),
the blocks and the final norm train; the VQGAN, the decoder and the MLM head stay frozen (the head
reads the word embeddings, so it sees their updates, as in the reference). A step draws one mask
rate for the global batch and per-row noise (128 of 256 tokens dropped, ceil(256 r) masked); the
student embeds the clean tokens (dropout on); the teacher sees, under the same masks, the clean
tokens on retain rows and the noise image's tokens on forget rows, in one pass. The clean batch is
tokenized once (the reference does it twice, in fp16 and fp32), noise images for the forget rows
only. The loss compares the two (B, 1 + K, D) latents, class row included (normalize "reference":
the reference's 2/B sums).

Reading the forget count to size the noise tokenization is the step's one host read.

The baselines, as the reference's engine_baseline.py defines them (alpha = forget_weight):
- max-loss: the whole MAGE trains on the label-smoothed CE of the masked tokens, retain minus
  alpha times forget, both over the batch's masked count;
- noisy-label: the same CE with forget rows' targets Gaussian in code-index space (the batch's
  token mean and std, rounded and clamped to the codebook), retain plus alpha times forget;
- retain-label: the whole MAGE; retain rows match the original's logits, forget rows the
  original's logits of a retain row of the batch (noise when there is none), MSE over all of them;
- random-encoder: ours' retain term; forget rows' target Gaussian noise with the teacher's (clean)
  latent statistics.
The reference's baseline loss weights its forget term by (1 + label), zero on forget rows, so its
random-encoder and retain-label never train on them; here the forget term is weighted by alpha.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..distributed import rank_rows
from ..models import mage as mage_model
from ..models.mae import IMAGENET_MEAN
from ..ops import unlearn_loss, vq_quantize
from .base import DemoSettings, Family, Recipe, record_config, training_autocast
from .mae import HOLE, RANDOM, noise_images, retain_rows, square_noise


@dataclass
class TokenStep:
    """One step's draws for this rank's rows, and the tokens they make."""
    tokens: Tensor  # (B, L) the clean images' tokens
    masks: mage_model.TokenMasks
    teacher_tokens: Optional[Tensor]  # (B, L): forget rows the noise images' tokens (ours); else None
    dropout: Optional[Tensor] = None  # (B, 1 + K, D) the student's embedding dropout scale


class Encoder(nn.Module):
    """MAGE's encoder path as a module of its own (what DDP wraps): the latent of the clean tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, step: TokenStep) -> Tensor:
        return self.model.encode_tokens(step.tokens, step.masks.keep, step.masks.masked, step.dropout)


class Generator(nn.Module):
    """The whole MAGE as the whole-model baselines train it: tokens and masks -> logits (B, 1 + L, V)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, step: TokenStep, codebook_only: bool = False) -> Tensor:
        return full_logits(self.model, step, codebook_only)


def full_logits(model, step: TokenStep, codebook_only: bool = False) -> Tensor:
    """The whole model's logits under the step's masks (codebook_only: the codebook's columns)."""
    masks = step.masks
    zero = masks.drop.new_zeros(masks.drop.shape[0], 1)
    latent = model.encode_tokens(step.tokens, masks.keep, masks.masked, step.dropout)
    return model.forward_decoder(latent, torch.cat([zero, masks.drop], 1), torch.cat([zero, masks.all], 1),
                                 codebook_only)


def draw_masks(model, batch: int, gen: torch.Generator, d, hole: bool = False) -> tuple[mage_model.TokenMasks, Tensor]:
    """This rank's rows of the global batch's draws: per-row mask noise, one mask rate, then the
    student's embedding dropout. hole: a random square of half the grid's side is dropped and
    masked first (pretraining's task-shaped steps), the rest as usual."""
    if hole:  # MAE's square noise, reversed: MAGE drops and masks the smallest values
        noise = 1.5 - square_noise(gen, batch, model.grid, d, hole=True)[0]
    else:
        noise = rank_rows(torch.rand, gen, batch, model.num_patches, d=d)
    masks = model.masks_from_noise(noise, model.mask_rate(gen, d.device))
    kept, dim = 1 + masks.keep.shape[1], model.token_emb.word_embeddings.embedding_dim
    dropout = rank_rows(lambda shape, **kw: model.token_emb.dropout_scale(shape, **kw), gen, batch, kept, dim, d=d)
    return masks, dropout


def tokenize(model, images: Tensor, device: torch.device) -> Tensor:
    """The frozen tokenizer's tokens, its convs in the training precision, its quantizer in fp32."""
    with torch.no_grad(), training_autocast(device):
        return model.tokenize(images)


def fill_value(channels: int) -> Tensor:
    """The reference's grey for removed pixels: ImageNet's mean (one channel: its mean)."""
    mean = torch.tensor(IMAGENET_MEAN)
    return mean if channels == 3 else mean.mean().expand(channels)


class MAGE(Family):
    name = "mage"
    model_type = mage_model.MaskedGenerativeEncoderViT
    configs = mage_model.CONFIGS
    tasks = ("inpaint", "outpaint")
    normalize = "reference"  # compute_loss: (2/B) sums of per-row means over all 129 x D entries
    # main_unlearn.py: AdamW (0.9, 0.95), wd 0.05 (timm's rule), blr 1e-4, 6 epochs with 5 of
    # warmup then cosine, clip 3.0.
    unlearn_recipe = Recipe(blr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), schedule="cosine",
                            warmup_fraction=5 / 6, clip_grad=3.0)
    pretrain_recipe = Recipe(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), schedule="cosine",
                             warmup_fraction=0.05, clip_grad=3.0)
    pretrain_parts = ("tokenizer", "model")
    options = {"noise": "normal"}
    folder_augment = "crop-flip"  # RandomResizedCrop(0.2-1, bicubic) and flip
    # Chosen on 120 forget and 120 retain training digits, 3 decoding seeds
    # (benchmarks/results/2026-12-01-mage-demo.md): the tokenizer 20 epochs at Adam's lr 1e-3; MAGE
    # 100 epochs at lr 4e-3 (a better inpainter than at 2e-3: retain FID 130 against 219); unlearning
    # at lr 1e-3, alpha 0.5, 45 epochs (alpha 1 cost this original's retain digits 1.44x).
    demo = DemoSettings(model="mage_tiny", batch_size=64, pretrain_epochs=100, pretrain={"lr": 4e-3},
                        unlearn_epochs=45, unlearn={"lr": 1e-3, "forget_weight": 0.5}, eval_seeds=(0, 1, 2),
                        pretrain_first=(("tokenizer", 20, {"lr": 1e-3, "schedule": "constant", "weight_decay": 0.0,
                                                           "clip_grad": 0.0, "warmup_fraction": 0.0}),))

    # -- models

    def create(self, name: str, **overrides) -> nn.Module:
        return record_config(mage_model.create_mage(name, **overrides), self.name, name, overrides)

    def load(self, path: str, name: Optional[str] = None, checkpoint: Optional[dict] = None, **overrides) -> nn.Module:
        model = mage_model.load_mage(path, name, checkpoint=checkpoint, **overrides)
        return record_config(model, self.name, model.config_name, model.overrides)

    def owns(self, state: dict) -> bool:
        return any(k.removeprefix("module.").startswith("token_emb.word_embeddings") for k in state)

    def image_shape(self, model) -> tuple[int, int]:
        return model.in_chans, model.img_size

    # -- the method

    def trainable(self, model, whole: bool) -> nn.Module:
        model.requires_grad_(whole)
        for p in model.encoder_parameters():
            p.requires_grad_(True)
        for p in (model.vqgan, model.pos_embed, model.decoder_pos_embed):  # frozen in the reference too
            p.requires_grad_(False)
        return Generator(model) if whole else Encoder(model)

    def teacher(self, model, device: torch.device, whole: bool) -> nn.Module:
        """The frozen original in eval mode (no embedding dropout), without a second VQGAN (the
        student's frozen one tokenizes for both) and, unless retain-label needs it, without the
        decoder."""
        dropped = ["vqgan"] + ([] if whole else ["decoder_blocks", "decoder_norm", "mlm_layer", "decoder_embed"])
        kept = {name: model._modules[name] for name in dropped}
        model._modules.update({name: nn.Identity() for name in dropped})
        try:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
        finally:
            model._modules.update(kept)
        return teacher.to(torch.bfloat16) if device.type == "cuda" else teacher

    def draw(self, model, images, is_forget, gen, d, cfg) -> TokenStep:
        """The masks (per-row noise, then one rate for the global batch), then the noise images;
        the clean tokens once, the noise images' for the forget rows only, in one tokenizer pass."""
        masks, dropout = draw_masks(model, images.shape[0], gen, d)
        if cfg.method != "ours":
            return TokenStep(tokenize(model, images, d.device), masks, None, dropout)
        batch = noise_images(images, is_forget, gen, d, cfg.noise)
        rows = is_forget.nonzero()[:, 0]  # the one host read: how many noise images to tokenize
        both = tokenize(model, torch.cat([images, batch[rows]]), d.device)
        tokens = both[:images.shape[0]]
        return TokenStep(tokens, masks, tokens.index_copy(0, rows, both[images.shape[0]:]), dropout)

    def teacher_features(self, teacher, images, is_forget, step, gen, d, cfg) -> Tensor:
        tokens = step.tokens if step.teacher_tokens is None else step.teacher_tokens  # random-encoder: clean
        return teacher.encode_tokens(tokens, step.masks.keep, step.masks.masked)

    def baseline_loss(self, method, model, module, teacher, images, is_forget, step, gen, d, cfg) -> dict:
        alpha = cfg.forget_weight
        if method == "retain-label":
            with torch.no_grad():
                original = full_logits(teacher, step).float()
                has_retain = (~is_forget).any()
                substitute = torch.where(has_retain, original[retain_rows(is_forget)],
                                         torch.randn(original.shape, generator=gen, device=original.device))
            with training_autocast(d.device):
                logits = module(step)
            out = unlearn_loss(logits.float(), original, substitute, is_forget, forget_weight=alpha,
                               normalize="reference")
            return {"loss": out.loss, "retain_loss": out.retain_loss, "forget_loss": out.forget_loss}
        with training_autocast(d.device):
            logits = module(step, codebook_only=True)[:, 1:]
        mask, f = step.masks.all, is_forget.float()[:, None]
        if method == "noisy-label":  # forget rows: Gaussian ids with the batch's token statistics
            ids = step.tokens.float()
            noisy = torch.randn(ids.shape, generator=gen, device=ids.device) * ids.std() + ids.mean()
            forget_target = noisy.clamp(0, model.codebook_size - 1).round().long()
        else:
            forget_target = step.tokens
        total = mask.sum().clamp_min(1)  # the reference's denominator for both terms
        retain = (mage_model.label_smoothed_ce(logits, step.tokens) * mask * (1 - f)).sum() / total
        forget = (mage_model.label_smoothed_ce(logits, forget_target) * mask * f).sum() / total
        sign = -1.0 if method == "max-loss" else 1.0
        return {"loss": retain + sign * alpha * forget, "retain_loss": retain, "forget_loss": forget}

    # -- pretraining and eval

    def pretrain_mode(self, cfg, step: int) -> str:
        return (RANDOM, RANDOM, RANDOM, HOLE)[step % 4] if cfg.part == "model" and cfg.task_masks else RANDOM

    def pretrain_step(self, model, cfg, d):
        """part "tokenizer": the VQGAN as a VQ-VAE (pixel MSE, codebook and 0.25 commitment terms,
        straight-through), the ViT untouched; part "model": MAGE's own loss with the tokenizer
        frozen (label-smoothed CE of the masked tokens)."""
        if cfg.part == "tokenizer":
            model.requires_grad_(False)
            vqgan = model.vqgan.requires_grad_(True)

            def tokenizer_loss(batch, gen, module):
                imgs, _ = batch
                with training_autocast(d.device):
                    return vq_vae_loss(module, imgs)
            return vqgan, tokenizer_loss
        self.trainable(model, whole=True)
        generator_module = Generator(model)

        def loss_fn(batch, gen, module):
            imgs, mode = batch
            tokens = tokenize(model, imgs, d.device)
            masks, dropout = draw_masks(model, imgs.shape[0], gen, d, hole=mode == HOLE)
            step = TokenStep(tokens, masks, None, dropout)
            with training_autocast(d.device):
                logits = module(step, codebook_only=True)
            return {"loss": mage_model.masked_token_loss(logits, tokens, step.masks.all, model.codebook_size)}
        return generator_module, loss_fn

    # eval: the reference's testpaint (centre hole, or a border), MaskGIT decoding, composite

    def _boxes(self, model, task: str, ratio: float):
        """(pixel removed (H, W) bool, token unknown (L,) bool): the reference's hole (a centre
        square of side int(H ratio)) or border (width int(H ratio / 2)), the token mask wider by
        the reference's margin: one token at its 16 x 16 grid, a sixteenth of the side (grid // 16
        tokens: none on the digits' 8 x 8 grid, where one token would be an eighth)."""
        size, grid = model.img_size, model.grid[0]
        patch, margin = size // grid, grid // 16
        pixels = torch.zeros(size, size, dtype=torch.bool)
        tokens = torch.zeros(grid, grid, dtype=torch.bool)
        if task == "inpaint":
            start, width = int(size * 0.5 * (1 - ratio)), int(size * ratio)
            pixels[start:start + width, start:start + width] = True
            lo, hi = max(0, start // patch - margin), min(grid, (start + width) // patch + margin)
            tokens[lo:hi, lo:hi] = True
        else:
            border = int(size * ratio * 0.5)
            pixels[:] = True
            pixels[border:size - border, border:size - border] = False
            lo, hi = border // patch + margin, (size - border) // patch - margin
            tokens[:] = True
            tokens[lo:hi, lo:hi] = False
        return pixels, tokens.reshape(-1)

    def removed_region(self, model, task: str, ratio: float) -> Tensor:
        return self._boxes(model, task, ratio)[0].float()[None, None]

    @torch.no_grad()
    def complete(self, model, images: Tensor, task: str, ratio: float, seed: int, steps: Optional[int] = None) -> Tensor:
        """The reference's test: the removed pixels grey, tokenized; the unknown tokens decoded in
        20 MaskGIT steps at temperature 6 (steps: another count); the generated image blended in over
        the removed region widened by 14/256 of the side and blurred (radius 7/256), as testpaint."""
        pixels, unknown = self._boxes(model, task, ratio)
        pixels, unknown = pixels.to(images.device), unknown.to(images.device)
        grey = fill_value(images.shape[1]).to(images.device, images.dtype)[None, :, None, None]
        masked = torch.where(pixels, grey, images)
        gen = torch.Generator(device=images.device).manual_seed(seed)
        ids = model.decode_iterative(model.tokenize(masked), unknown.expand(images.shape[0], -1), gen,
                                     steps=steps or 20, temperature=6.0)
        generated = model.decode_tokens(ids).clamp(0, 1)
        blend = composite_mask(pixels, images.shape[-1]).to(images.device, images.dtype)
        return generated * blend + images * (1 - blend)

    def generation_note(self, steps: Optional[int]) -> str:
        if steps is None:
            return ""
        return f"decoding: {steps} MaskGIT steps, not the reference's 20"

    @torch.no_grad()
    def embed(self, model, images: Tensor) -> Tensor:
        """The encoder's latent of the clean image's tokens (nothing dropped or masked), pooled."""
        tokens = model.tokenize(images)
        keep = torch.arange(tokens.shape[1], device=images.device).expand_as(tokens)
        return model.encode_tokens(tokens, keep, torch.zeros_like(tokens, dtype=torch.bool))[:, 1:].mean(1)


def composite_mask(pixels: Tensor, size: int) -> Tensor:
    """testpaint's blend: the removed region widened by 14 px at 256 and Gaussian-blurred (PIL
    radius 7), both scaled to the image's side."""
    margin = max(1, round(14 * size / 256))
    widened = F.max_pool2d(pixels.float()[None, None], 2 * margin + 1, stride=1, padding=margin)
    sigma = 7 * size / 256
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(widened, (radius,) * 4, mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1)).clamp(0, 1)


def vq_vae_loss(vqgan, images: Tensor, beta: float = 0.25) -> dict:
    """A VQ-VAE's loss for the tokenizer: pixel MSE through the straight-through codes, plus the
    codebook term and beta times the commitment term (taming's VectorQuantizer2, legacy)."""
    z = vqgan.encoder(images).float()
    b, e, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, e)
    codebook = vqgan.quantize.embedding.weight
    ids = vq_quantize(flat.detach(), codebook.detach())
    z_q = F.embedding(ids, codebook)  # not codebook[ids]: its backward adds with CPU atomics (run to run noise)
    codes = F.mse_loss(z_q, flat.detach()) + beta * F.mse_loss(flat, z_q.detach())
    z_st = (flat + (z_q - flat).detach()).view(b, h, w, e).permute(0, 3, 1, 2)
    recon = F.mse_loss(vqgan.decoder(z_st.contiguous()).float(), images.float())
    usage = torch.bincount(ids, minlength=codebook.shape[0]).gt(0).float().mean()
    return {"loss": recon + codes, "recon": recon.detach(), "codes_used": usage}
