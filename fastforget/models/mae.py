"""A masked autoencoder ViT with the state-dict keys and semantics of facebookresearch/mae's
MaskedAutoencoderViT (models_mae.py), built on fastforget's ops.

Official checkpoints load unchanged (load_mae). Differences, none visible in the keys: images come
in [0, 1] and the model applies its input normalisation (pixel_mean, pixel_std) itself, folded
exactly into the patch-embedding weights; only the kept patches are embedded
(masked_patch_embed); attention reads the qkv projection as it is (qkv_attention: a fused kernel
on the CPU, torch's scaled_dot_product_attention on GPUs).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidValue
from ..nn import MaskedPatchEmbed
from ..weights import load_weights
from ..ops import masked_patch_embed, qkv_attention, random_masking

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(qkv_attention(self.qkv(x), self.num_heads))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm's ViT block (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
    """MAE's fixed 2-D sin-cos position embedding ((1 +) grid_h * grid_w, embed_dim)."""
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and decoder. Images in [0, 1], (B, in_chans, H, W)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_layer=None,
                 norm_pix_loss=False, pixel_mean: Optional[Sequence[float]] = IMAGENET_MEAN,
                 pixel_std: Optional[Sequence[float]] = IMAGENET_STD):
        super().__init__()
        norm_layer = norm_layer or nn.LayerNorm  # models_mae.py's default; its named configs pass eps 1e-6
        self.patch_embed = MaskedPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        # Input normalisation: buffers outside the state dict, so official checkpoints match exactly.
        mean = torch.tensor(pixel_mean if pixel_mean is not None else [0.0] * in_chans, dtype=torch.float32)
        std = torch.tensor(pixel_std if pixel_std is not None else [1.0] * in_chans, dtype=torch.float32)
        if mean.shape != (in_chans,) or std.shape != (in_chans,) or bool((std <= 0).any()):
            raise InvalidValue(f"pixel_mean and pixel_std must have {in_chans} values, std > 0")
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid_h, grid_w = self.patch_embed.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_h, grid_w, cls_token=True)).float()[None])
        self.decoder_pos_embed.data.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid_h, grid_w, cls_token=True)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # -- images and patches -------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def normalize(self, imgs: Tensor) -> Tensor:
        return (imgs - self.pixel_mean.view(1, -1, 1, 1)) / self.pixel_std.view(1, -1, 1, 1)

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C) in MAE's (p, q, c) order."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.patch_embed.proj.in_channels
        gh, gw = self.patch_embed.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def folded_patch_embedding(self) -> tuple[Tensor, Tensor]:
        """proj's weight and bias with the input normalisation folded in, exactly:
        conv((x - m) / s; w, b) = conv(x; w / s, b - sum(w * m / s))."""
        w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
        scale = (1.0 / self.pixel_std).view(1, -1, 1, 1)
        w_folded = w * scale
        return w_folded, b - (w_folded * self.pixel_mean.view(1, -1, 1, 1)).sum((1, 2, 3))

    # -- the encoder and decoder --------------------------------------------------------------

    def encode(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Latent (B, 1 + K, D) of the patches ids_keep keeps: the unlearning method's E(T(x))."""
        weight, bias = self.folded_patch_embedding()
        x = masked_patch_embed(imgs, weight, bias, self.pos_embed, ids_keep, self.cls_token,
                               backend=self.patch_embed.backend)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Optional[Tensor] = None):
        """(latent, mask, ids_restore) as MAE's; noise (B, L) reproduces its masks."""
        ids_keep, ids_restore, mask = random_masking(imgs.shape[0], self.num_patches, mask_ratio, noise=noise,
                                                     device=imgs.device)
        return self.encode(imgs, ids_keep), mask.to(imgs.dtype), ids_restore

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def target(self, imgs: Tensor) -> Tensor:
        """The patches the decoder predicts: normalised images, per-patch normalised with norm_pix_loss."""
        target = self.patchify(self.normalize(imgs))
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75, noise: Optional[Tensor] = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, pred: Tensor) -> Tensor:
        """Decoder output -> images in [0, 1] pixel space (without norm_pix_loss)."""
        c = self.patch_embed.proj.in_channels
        pixels = pred.view(*pred.shape[:2], -1, c) * self.pixel_std + self.pixel_mean
        return self.unpatchify(pixels.flatten(2))

    def encoder_parameters(self):
        """The parameters the unlearning method trains: patch embedding, cls token, blocks, norm."""
        for module in (self.patch_embed, self.blocks, self.norm):
            yield from module.parameters()
        yield self.cls_token


_LN = partial(nn.LayerNorm, eps=1e-6)  # what models_mae.py's named configs pass
CONFIGS = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                                  decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512,
                                 decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=_LN),
    # Small grayscale images (the embedded digits, 16x16): trains in seconds on a CPU.
    "mae_vit_tiny": dict(img_size=16, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4,
                         decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=2, norm_layer=_LN,
                         pixel_mean=(0.5,), pixel_std=(0.5,)),
}


def create_mae(name: str, **overrides) -> MaskedAutoencoderViT:
    """A model of a named config (CONFIGS), with any constructor argument overridden."""
    if name not in CONFIGS:
        raise InvalidValue(f"unknown model {name!r}; expected one of {sorted(CONFIGS)}")
    model = MaskedAutoencoderViT(**{**CONFIGS[name], **overrides})
    model.config_name, model.overrides = name, dict(overrides)  # what checkpoints record, to rebuild it
    return model


def load_mae(path: str, name: Optional[str] = None, *, checkpoint: Optional[dict] = None,
             **overrides) -> MaskedAutoencoderViT:
    """A model from a checkpoint file: a dict with a "model" state dict (official MAE files, and
    fastforget's own, which also record the config under "config"). Read with weights_only=True
    (checkpoint: the file's content, when already read); keys must match exactly, and a missing or
    unexpected one is reported by name."""
    checkpoint = load_weights(path, "model file") if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise InvalidValue(f"{path}: expected a dict with a 'model' entry (an MAE checkpoint)")
    config = checkpoint.get("config") or {}
    name = name or config.get("model")
    if name is None:
        raise InvalidValue(f"{path} does not record its model config; pass name= (one of {sorted(CONFIGS)})")
    model = create_mae(name, **{**config.get("overrides", {}), **overrides})
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    if missing and not unexpected and all(k.startswith(("decoder", "mask_token")) for k in missing):
        raise InvalidValue(f"{path} holds {name}'s encoder alone (as MAE's mae_pretrain_vit_*.pth files do): "
                         f"image-to-image unlearning needs the decoder too, e.g. MAE's mae_visualize_vit_*.pth; "
                         f"missing keys {missing}")
    if missing or unexpected:
        raise InvalidValue(f"{path} does not match {name}: missing keys {missing}, unexpected keys {unexpected}")
    return model
