"""MAGE: a VQGAN tokenizer and a masked-token ViT, with the state-dict keys and semantics of the
reference code's MaskedGenerativeEncoderViT (jpmorganchase/i2i_mage, branch i2i: models_mage.py
and taming/, MaskGIT's VQGAN as the reference ports it).

Kept from the reference: images in [0, 1]; the tokenizer has no quant_conv or post_quant_conv,
bias-free 3x3 convs in its ResBlocks, GroupNorm(32, eps 1e-6) and swish, average-pool
downsampling, and the 1x1 nin_shortcut applied to h (not x) where the width changes; tokens are
the squared-L2 nearest codebook entries in raster order; the vocabulary is codebook + 1000 + 1
with the mask id last and the fake class id (codebook + 76) at position 0; learned positions for
all 1 + L positions, LayerNorm eps 1e-6 and dropout 0.1 (train mode only); pre-LN blocks with
exact GELU; the decoder pads every all-masked position with the class row's output, and the MLM
head is tied to the (detached) word embeddings. The unused parameters (cls_token, the sin-cos
pos_embeds, mask_token, patch_embed, decoder_pred) are kept so official checkpoints load strictly.

Changed, none visible in the keys: the quantizer is one fused op (fastforget.vq_quantize: the
distance GEMM with the argmin in its epilogue, fp32); only the kept positions are embedded
(fastforget.token_embed); masks are drawn on the device with fixed shapes (no nonzero, no retry
loop); GroupNorm + swish is fastforget.group_norm_silu; the encoder keeps no list of every
intermediate; attention is fastforget.qkv_attention (scaled_dot_product_attention on GPUs, whose
q.k^T and softmax accumulate in fp32 as the reference's upcast does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InvalidValue
from ..ops import group_norm_silu, token_embed, vq_quantize
from ..weights import load_weights
from .mae import Block, get_2d_sincos_pos_embed

NUM_CLASSES = 1000  # vocabulary rows for ImageNet's classes, between the codebook and the mask id


# -- the VQGAN tokenizer (taming's Encoder / Decoder / VectorQuantizer2, MaskGIT's variant) -------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _norm_swish(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class ResnetBlock(nn.Module):
    """h = conv2(swish(GN2(conv1(swish(GN1(x)))))), convs bias-free; out = x + h, or h + W h where
    the width changes (MaskGIT's quirk: the block input is dropped)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_swish(self.norm1, x))
        h = self.conv2(self.dropout(_norm_swish(self.norm2, h)))
        return h + (self.nin_shortcut(h) if self.in_channels != self.out_channels else x)


class Downsample(nn.Module):  # average pooling: no weights, no keys
    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    def __init__(self, blocks: list, resample: Optional[nn.Module], name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name if resample is not None else None
        if resample is not None:  # under the reference's name: down.i.downsample, up.i.upsample.conv
            setattr(self, name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class VQEncoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z=False, dropout=0.0, **_):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList()
        for i in range(len(ch_mult)):
            blocks = [ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], dropout)
                      for j in range(num_res_blocks)]
            last = i == len(ch_mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(), "downsample"))
        self.mid = _Mid(widths[-1], dropout)
        self.norm_out = _norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels if double_z else z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(_norm_swish(self.norm_out, self.mid(h)))


class VQDecoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, z_channels, dropout=0.0, **_):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = _Mid(widths[-1], dropout)
        levels, width = [], widths[-1]
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, widths[i], dropout))
                width = widths[i]
            levels.insert(0, _Level(blocks, Upsample(width) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_norm_swish(self.norm_out, h))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2's codebook (quantize.embedding.weight): tokens by squared L2."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: Tensor) -> Tensor:
        """(B, e, h, w) -> (B, h * w) int64 in raster order (row, then column)."""
        b, e, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b * h * w, e).float()
        return vq_quantize(flat, self.embedding.weight.float()).view(b, h * w)


class VQGAN(nn.Module):
    """taming's VQModel as MAGE uses it: encoder, decoder, quantize (no quant convs)."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        if ddconfig["z_channels"] != embed_dim:  # no quant_conv maps one onto the other
            raise InvalidValue(f"vqgan: z_channels ({ddconfig['z_channels']}) must equal embed_dim ({embed_dim})")
        self.encoder = VQEncoder(**ddconfig)
        self.decoder = VQDecoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.downsampling = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def tokenize(self, images: Tensor) -> Tensor:
        return self.quantize(self.encoder(images))

    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, L) ids -> images: the codebook entries as a (B, e, h, w) map through the decoder."""
        z = self.quantize.embedding(tokens).view(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)
        return self.decoder(z.contiguous())


# -- the masked-token ViT ---------------------------------------------------------------------------


class TokenEmbedding(nn.Module):
    """BertEmbeddings' parameters (word_embeddings, position_embeddings, LayerNorm, position_ids):
    LN(W_word[id] + W_pos[position]) for the kept positions only, then dropout."""

    def __init__(self, vocab_size: int, dim: int, positions: int, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, tokens: Tensor, keep: Tensor, masked: Tensor, class_id: int, mask_id: int,
                dropout: Optional[Tensor] = None) -> Tensor:
        """dropout: in train mode, the dropout's scale (0 or 1 / (1 - p)) drawn by the caller (the
        trainer draws it from the step's generator, so DDP and resume stay exact); None: nn.Dropout."""
        out = token_embed(tokens, keep, masked, self.word_embeddings.weight, self.position_embeddings.weight,
                          self.LayerNorm.weight, self.LayerNorm.bias, class_id=class_id, mask_id=mask_id,
                          eps=self.LayerNorm.eps)
        if dropout is None or not self.training:
            return self.dropout(out)
        return out * dropout.to(out.dtype)

    def dropout_scale(self, shape, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        """A dropout draw for outputs of `shape`: 0 with probability p, else 1 / (1 - p)."""
        p = self.dropout.p
        return (torch.rand(shape, generator=generator, device=device) >= p).float() / (1 - p)


class MlmLayer(nn.Module):
    def __init__(self, feat_dim: int, word_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(feat_dim, word_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(word_dim)  # eps 1e-5, torch's default, as the reference
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        """Logits over the first len(word_embeddings) entries of the vocabulary."""
        return self.ln(self.gelu(self.fc(x))) @ word_embeddings.t() + self.bias[..., :word_embeddings.shape[0]]


class _PatchEmbed(nn.Module):  # timm's PatchEmbed: kept for the keys, never run
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)


@dataclass
class TokenMasks:
    """One draw of MAGE's masks for B rows: `keep` (B, K) the kept image positions ascending,
    `masked` (B, K) which of them carry the mask id; drop (B, L) and all (B, L) are the
    reference's token_drop_mask_raw and token_all_mask_raw (float 0/1, drop within all)."""
    keep: Tensor
    masked: Tensor
    drop: Tensor
    all: Tensor


class MaskedGenerativeEncoderViT(nn.Module):
    """MAGE: VQGAN tokens, half dropped and more masked, a ViT encoder, a ViT decoder over all
    1 + L positions and the tied MLM head. Images in [0, 1], (B, in_channels, H, W)."""

    def __init__(self, img_size=256, patch_size=16, in_chans=None, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 mask_ratio_min=0.5, mask_ratio_max=1.0, mask_ratio_mu=0.55, mask_ratio_std=0.25,
                 vqgan: Optional[dict] = None, dropout=0.1):
        super().__init__()
        vq = dict(VQGAN_IMAGENET if vqgan is None else vqgan)
        n_embed, vq_dim = vq.pop("n_embed"), vq.pop("embed_dim")
        in_chans = vq["in_channels"] if in_chans is None else in_chans
        if vq["in_channels"] != in_chans or vq["out_ch"] != in_chans:
            raise InvalidValue(f"vqgan in_channels / out_ch ({vq['in_channels']}, {vq['out_ch']}) must be in_chans "
                               f"({in_chans})")
        self.vqgan = VQGAN(vq, n_embed, vq_dim).requires_grad_(False)
        if img_size % patch_size or patch_size != self.vqgan.downsampling:
            raise InvalidValue(f"patch_size ({patch_size}) must be the tokenizer's downsampling "
                               f"({self.vqgan.downsampling}: 2 ** (len(ch_mult) - 1)) and divide img_size ({img_size})")
        if not 0 < mask_ratio_min <= mask_ratio_max <= 1 or mask_ratio_std <= 0:
            raise InvalidValue("mask ratios must satisfy 0 < mask_ratio_min <= mask_ratio_max <= 1, std > 0")
        self.img_size, self.in_chans = img_size, in_chans
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = L = self.grid[0] * self.grid[1]
        self.codebook_size = n_embed
        vocab_size = n_embed + NUM_CLASSES + 1
        self.fake_class_label = n_embed + 1100 - 1024  # the reference's fixed class id
        self.mask_token_label = vocab_size - 1
        self.mask_ratio = (mask_ratio_min, mask_ratio_max, mask_ratio_mu, mask_ratio_std)
        self.num_dropped = int(math.ceil(L * mask_ratio_min))
        self.token_emb = TokenEmbedding(vocab_size, embed_dim, L + 1, dropout)

        self.patch_embed = _PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        norm = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm) for _ in range(depth)])
        self.norm = norm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.mlm_layer = MlmLayer(decoder_embed_dim, embed_dim, vocab_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for param, dim in ((self.pos_embed, self.pos_embed.shape[-1]),
                           (self.decoder_pos_embed, self.decoder_pos_embed.shape[-1])):
            param.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(dim, *self.grid, cls_token=True)).float()[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        for p in (self.cls_token, self.mask_token, self.decoder_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- tokens and masks ------------------------------------------------------------------------

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """(B, L) int64 VQ tokens in raster order, as the reference's vqgan.encode(x)[2][2]."""
        return self.vqgan.tokenize(images)

    def encoder_parameters(self):
        """What the method trains: token_emb (word, positions, LayerNorm), the blocks, the final norm."""
        for module in (self.token_emb, self.blocks, self.norm):
            yield from module.parameters()

    def mask_rate(self, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        """One r ~ TruncNormal(mu, std) on [min, max], a 0-d device tensor: the inverse CDF of a
        uniform draw (no host round trip; the reference's scipy draw has the same law)."""
        low, high, mu, std = self.mask_ratio
        cdf = lambda x: 0.5 * (1 + math.erf((x - mu) / (std * math.sqrt(2))))  # noqa: E731  (host floats)
        a, b = cdf(low), cdf(high)
        u = torch.rand((), generator=generator, device=device)
        p = (a + u * (b - a)).clamp(1e-7, 1 - 1e-7)
        return (mu + std * torch.special.ndtri(p)).clamp(low, high)

    def masks_from_noise(self, noise: Tensor, mask_rate: Tensor) -> TokenMasks:
        """MAGE's masks from per-row uniform noise (B, L) and a rate: the num_dropped smallest noise
        values are dropped, the ceil(L * rate) smallest masked (drop within masked), by rank, so a
        tie cannot change a count and no retry is needed."""
        L = noise.shape[1]
        order = noise.argsort(dim=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=noise.device).expand_as(order))
        num_masked = torch.ceil(L * mask_rate).clamp(self.num_dropped, L)
        keep = order[:, self.num_dropped:].sort(dim=1).values
        drop, masked_all = rank < self.num_dropped, rank < num_masked
        return TokenMasks(keep, masked_all.gather(1, keep), drop.float(), masked_all.float())

    def masks_from_raw(self, drop: Tensor, all_mask: Tensor) -> TokenMasks:
        """TokenMasks of the reference's token_drop_mask_raw / token_all_mask_raw (each row drops
        num_dropped positions)."""
        kept = drop.shape[1] - self.num_dropped
        keep = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :kept]
        keep = keep.sort(dim=1).values
        return TokenMasks(keep, all_mask.gather(1, keep) > 0, drop.float(), all_mask.float())

    def draw_masks(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> TokenMasks:
        return self.masks_from_noise(torch.rand(batch, self.num_patches, generator=generator, device=device),
                                     self.mask_rate(generator, device))

    # -- the encoder and decoder -----------------------------------------------------------------

    def encode_tokens(self, tokens: Tensor, keep: Tensor, masked: Tensor, dropout: Optional[Tensor] = None) -> Tensor:
        """The latent (B, 1 + K, D): the fake class row, then the kept positions in keep's order
        (dropout: the embedding dropout's draw, TokenEmbedding.forward)."""
        x = self.token_emb(tokens, keep, masked, self.fake_class_label, self.mask_token_label, dropout)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_encoder(self, images: Tensor, token_drop_mask_raw: Optional[Tensor] = None,
                        token_all_mask_raw: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        """The reference's 7-tuple: (latent (B, 1 + K, D), gt_indices (B, L), token_drop_mask and
        token_all_mask (B, 1 + L), token_indices (B, 1 + L), token_drop_mask_raw, token_all_mask_raw)."""
        tokens = self.tokenize(images)
        if token_drop_mask_raw is None:
            masks = self.draw_masks(tokens.shape[0], generator, tokens.device)
        else:
            masks = self.masks_from_raw(token_drop_mask_raw.to(tokens.device), token_all_mask_raw.to(tokens.device))
        latent = self.encode_tokens(tokens, masks.keep, masks.masked)
        zero = masks.drop.new_zeros(tokens.shape[0], 1)
        ids = torch.where(masks.all > 0, self.mask_token_label, tokens)
        ids = torch.cat([torch.full_like(tokens[:, :1], self.fake_class_label), ids], dim=1)
        return (latent, tokens, torch.cat([zero, masks.drop], 1), torch.cat([zero, masks.all], 1), ids,
                masks.drop, masks.all)

    def forward_decoder(self, latent: Tensor, token_drop_mask: Tensor, token_all_mask: Tensor,
                        codebook_only: bool = False) -> Tensor:
        """Logits (B, 1 + L, vocab): the kept rows put back at their positions, every all-masked
        position (dropped or masked-kept) the class row's output, learned positions, the decoder
        blocks, the MLM head on the detached word embeddings. codebook_only: the first
        codebook_size columns alone, all that the token loss and decoding read (the other 1001 are
        never computed)."""
        x = self.decoder_embed(latent)
        b, kept, dim = x.shape
        positions = torch.sort(token_drop_mask.to(torch.uint8), dim=1, stable=True).indices[:, :kept]
        pad = x[:, :1].expand(b, token_all_mask.shape[1], dim)
        x = pad.scatter(1, positions[..., None].expand(-1, -1, dim), x)
        x = torch.where(token_all_mask[..., None] > 0, pad, x) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        words = self.token_emb.word_embeddings.weight.detach()
        return self.mlm_layer(self.decoder_norm(x), words[:self.codebook_size] if codebook_only else words)

    def forward(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """MAGE's pretraining loss: label-smoothed (0.1) cross-entropy of the codebook logits against
        the tokens, averaged over the all-masked positions."""
        latent, tokens, drop, all_mask, *_ = self.forward_encoder(images, generator=generator)
        logits = self.forward_decoder(latent, drop, all_mask, codebook_only=True)
        return masked_token_loss(logits, tokens, all_mask[:, 1:], self.codebook_size)

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_iterative(self, tokens: Tensor, unknown: Tensor, generator: Optional[torch.Generator] = None,
                         steps: int = 20, temperature: float = 6.0) -> Tensor:
        """MaskGIT's iterative decoding as the reference's testpaint runs it: (B, L) tokens with the
        unknown (B, L) bool positions masked; the encoder sees all 1 + L positions; T steps on the
        cosine schedule, skipping those whose ratio is not below the initial masked fraction;
        sampled ids ~ Categorical(logits), confidence log p + temperature (1 - s/T) Gumbel with the
        known tokens at p = 1e20; the lowest-confidence floor(L m) re-masked. Returns the ids."""
        b, L = tokens.shape
        dev = tokens.device
        keep = torch.arange(L, device=dev).expand(b, L)
        no_drop = torch.zeros(b, 1 + L, device=dev)
        start = float(unknown.float().mean())  # the reference's mask_rate, one number (host side)
        ids = torch.where(unknown, self.mask_token_label, tokens)
        sampled = tokens
        for step in range(steps):
            ratio = (step + 1) / steps
            m = math.cos(math.pi / 2 * ratio)
            if m >= start:
                continue
            cur_unknown = ids == self.mask_token_label
            latent = self.encode_tokens(torch.where(cur_unknown, 0, ids), keep, cur_unknown)
            all_mask = torch.cat([no_drop[:, :1], cur_unknown.float()], 1)
            logits = self.forward_decoder(latent, no_drop, all_mask, codebook_only=True)[:, 1:].float()
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, device=dev).clamp_min(1e-20)))
            sampled = torch.where(cur_unknown, (logits + gumbel).argmax(-1), ids)
            probs = logits.softmax(-1).gather(-1, sampled[..., None])[..., 0]
            probs = torch.where(cur_unknown, probs, torch.full_like(probs, 1e20))
            noise = -torch.log(-torch.log(torch.rand(probs.shape, generator=generator, device=dev).clamp_min(1e-20)))
            confidence = torch.log(probs) + temperature * (1 - ratio) * noise
            mask_len = torch.clamp(cur_unknown.sum(-1, keepdim=True) - 1, max=math.floor(L * m)).clamp_min(1)
            cutoff = confidence.sort(-1).values.gather(-1, mask_len - 1)
            ids = torch.where(confidence <= cutoff, self.mask_token_label, sampled)
        return sampled

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """(B, L) ids -> images (roughly [0, 1]) through the codebook and the VQGAN decoder."""
        return self.vqgan.decode_tokens(tokens, self.grid)


def masked_token_loss(logits: Tensor, tokens: Tensor, mask: Tensor, codebook_size: int,
                      smoothing: float = 0.1) -> Tensor:
    """The reference's forward_loss: label-smoothed CE of logits[:, 1:, :codebook] at the masked
    (B, L) positions, over their count."""
    per = label_smoothed_ce(logits[:, 1:, :codebook_size], tokens, smoothing)
    return (per * mask).sum() / mask.sum().clamp_min(1)


def label_smoothed_ce(logits: Tensor, target: Tensor, smoothing: float = 0.1) -> Tensor:
    """(B, L): (1 - s) NLL + s * mean(-log p), timm's LabelSmoothingCrossEntropy per position."""
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return (1 - smoothing) * nll - smoothing * logp.mean(-1)


# -- named configs ----------------------------------------------------------------------------------

# config/vqgan.yaml: MaskGIT's ImageNet tokenizer (attn_resolutions is ignored: no attention blocks)
VQGAN_IMAGENET = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
                      n_embed=1024, embed_dim=256)
# The digits' tokenizer: 16 px, one channel, 16 codes on an 8 x 8 grid (a token is one of the
# 8 x 8 originals' pixels, of 17 grey levels: 64 codes made MAGE's masked-token accuracy 0.13 on
# training digits where 16 make it 0.44-0.54).
VQGAN_TINY = dict(double_z=False, z_channels=32, resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(), dropout=0.0, n_embed=16, embed_dim=32)

CONFIGS = {
    "mage_vit_base_patch16": dict(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                  decoder_embed_dim=768, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                                  vqgan=VQGAN_IMAGENET),
    "mage_vit_large_patch16": dict(img_size=256, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                   decoder_embed_dim=1024, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                                   vqgan=VQGAN_IMAGENET),
    "mage_tiny": dict(img_size=16, patch_size=2, embed_dim=64, depth=4, num_heads=4, decoder_embed_dim=64,
                      decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, vqgan=VQGAN_TINY),
}
VQGAN_KEYS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
              "attn_resolutions", "dropout", "n_embed", "embed_dim")


def create_mage(name: str, vqgan: Optional[dict] = None, **overrides) -> MaskedGenerativeEncoderViT:
    """A model of a named config (CONFIGS), with any of the reference's constructor arguments
    (img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
    decoder_num_heads, mlp_ratio, mask_ratio_min/max/mu/std) overridden; vqgan: taming's ddconfig
    names plus n_embed and embed_dim, each overriding the config's tokenizer."""
    if name not in CONFIGS:
        raise InvalidValue(f"unknown model {name!r}; expected one of {sorted(CONFIGS)}")
    config = dict(CONFIGS[name])
    unknown = sorted(set(vqgan or {}) - set(VQGAN_KEYS))
    if unknown:
        raise InvalidValue(f"vqgan: unknown keys {unknown}; expected some of {list(VQGAN_KEYS)}")
    config["vqgan"] = {**config["vqgan"], **(vqgan or {})}
    model = MaskedGenerativeEncoderViT(**{**config, **overrides})
    model.config_name = name
    model.overrides = {**overrides, **({"vqgan": dict(vqgan)} if vqgan else {})}
    return model


def _unwrap_tokenizer(state) -> dict:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InvalidValue("a tokenizer file holds a state dict (optionally under 'state_dict')")
    return {k.removeprefix("vqgan."): v for k, v in state.items()}


def load_mage(path: Optional[str], name: Optional[str] = None, tokenizer: Optional[str] = None, *,
              checkpoint: Optional[dict] = None, **overrides) -> MaskedGenerativeEncoderViT:
    """A model from a checkpoint file: the reference's mage-vit*-1600.pth or an unlearned
    checkpoint-*.pth (a dict with "model": the whole state dict, vqgan.* included; name needed),
    or fastforget's own (with "config"). tokenizer: a vqgan_jax_strongaug.ckpt-layout file (the
    vqgan keys without the prefix, maybe under "state_dict") loaded first, then overwritten by any
    vqgan.* keys of the model file, as the reference does; path None loads the tokenizer alone into
    a fresh model. Read with weights_only=True; a missing or unexpected key is named."""
    if path is not None:
        checkpoint = load_weights(path, "model file") if checkpoint is None else checkpoint
        if not isinstance(checkpoint, dict):
            raise InvalidValue(f"{path}: expected a dict with a 'model' entry (a MAGE checkpoint)")
    checkpoint = checkpoint or {}
    config = checkpoint.get("config") or {}
    state = checkpoint.get("model", checkpoint if "config" not in checkpoint else {})
    state = {k.removeprefix("module."): v for k, v in state.items()}
    name = name or config.get("model")
    if name is None:
        raise InvalidValue(f"{path} does not record its model config; pass name= (--model, one of {sorted(CONFIGS)})")
    merged = {**config.get("overrides", {}), **overrides}
    model = create_mage(name, **merged)
    if tokenizer is not None:
        vq_state = _unwrap_tokenizer(load_weights(tokenizer, "tokenizer file"))
        missing, unexpected = model.vqgan.load_state_dict(vq_state, strict=False)
        if missing or unexpected:
            raise InvalidValue(f"{tokenizer} does not match {name}'s tokenizer: missing keys {missing}, "
                               f"unexpected keys {unexpected}")
        if path is None:
            return model
        state = {**{f"vqgan.{k}": v for k, v in vq_state.items()}, **state}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidValue(f"{path} does not match {name}: missing keys {missing}, unexpected keys {unexpected}")
    return model
