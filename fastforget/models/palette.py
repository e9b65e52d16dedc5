"""Palette's diffusion model: guided-diffusion's UNet as Palette configures it, with the state-dict
keys and semantics of the reference code's Network (jpmorganchase/i2i_Palette-Image-to-Image-
Diffusion-Models, branch i2i: models/network.py and models/guided_diffusion_modules/unet.py).

The Network holds the UNet as `denoise_fn` and the noise schedule as six float32 buffers, so an
official `{epoch}_Network.pth` loads with strict key matching. Kept from the reference: the input
is cat(condition, noisy image); the noise level is the raw continuous gamma, embedded cos first
(max period 10000); GroupNorm runs in float32; ResBlocks use scale-shift norm (GN(h)(1 + scale) +
shift) and do their own up/down sampling (nearest x2, average pool); attention has the legacy qkv
head order (each head's q, k, v are consecutive channel blocks) and appears where attn_res says
(which at Palette's config is the middle block alone). Changed, none visible in the keys: the
GroupNorm + scale-shift + SiLU chains are one fused op (fastforget.group_norm_silu), attention is
scaled_dot_product_attention on views of qkv (the reference's forced gradient checkpoint is
dropped), and the embedding's frequencies are a buffer outside the state dict, not a host tensor
copied to the device in every forward.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import InvalidValue
from ..ops import group_norm_silu, qkv_attention
from ..weights import load_weights

SCHEDULE_BUFFERS = ("gammas", "sqrt_recip_gammas", "sqrt_recipm1_gammas", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def gamma_embedding(gammas: Tensor, freqs: Tensor) -> Tensor:
    """(B, dim): cat(cos(gamma * f), sin(gamma * f)) for the frequencies f_k = exp(-ln(10000) k / half)."""
    args = gammas[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def embedding_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)


class GroupNorm32(nn.GroupNorm):
    """The reference's GroupNorm32 (computed in float32, cast back): its parameters, under the same
    key; ResBlocks apply it through the fused op."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, silu=False)


class SiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


class Pool(nn.Module):  # the reference's Downsample without a conv: average pooling, no parameters
    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Nearest2x(nn.Module):  # the reference's Upsample without a conv
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """guided-diffusion's ResBlock with scale-shift norm: in_layers (GN, SiLU, conv 3x3), emb_layers
    (SiLU, Linear to 2 C_out), out_layers (GN, SiLU, dropout, conv 3x3), a 1x1 skip where the width
    changes; up/down resample h (after GN and SiLU) and x alike."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channel: Optional[int] = None,
                 up: bool = False, down: bool = False, groups: int = 32):
        super().__init__()
        out_channel = out_channel or channels
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), SiLU(),
                                       nn.Conv2d(channels, out_channel, 3, padding=1))
        self.resample = Nearest2x() if up else Pool() if down else None
        self.emb_layers = nn.Sequential(SiLU(), nn.Linear(emb_channels, 2 * out_channel))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channel), SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(out_channel, out_channel, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channel == channels else nn.Conv2d(channels, out_channel, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm_in, _, conv_in = self.in_layers
        h = group_norm_silu(x, norm_in.weight, norm_in.bias, norm_in.num_groups, norm_in.eps)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = conv_in(h)
        scale, shift = self.emb_layers(emb).to(h.dtype).chunk(2, dim=1)
        norm_out, _, dropout, conv_out = self.out_layers
        h = group_norm_silu(h, norm_out.weight, norm_out.bias, norm_out.num_groups, norm_out.eps, scale=scale,
                            shift=shift)
        return self.skip_connection(x) + conv_out(dropout(h))


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions: x + proj_out(attention(qkv(GN(x)))), with the
    legacy head order (QKVAttentionLegacy: head j's q, k, v are channels [96j, 96j + 32), ... at
    32-channel heads) and scale 1/sqrt(head channels), as SDPA's default.

    Computed on tokens (B, T, C), a view of channels-last activations: the 1x1 convs as Linears,
    the qkv weight's rows taken in timm's (3, heads, head_dim) order so fastforget's qkv_attention
    (the CPU's fused kernel, SDPA on GPUs) reads the projection as it comes."""

    def __init__(self, channels: int, num_head_channels: int = -1, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if num_head_channels != -1 and channels % num_head_channels:
            raise InvalidValue(f"attention channels {channels} are not a multiple of num_head_channels "
                               f"{num_head_channels}")
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        # timm's row s * C + j (s: q, k or v; j = head * head_dim + d) is the legacy row head * 3 hd + s hd + d
        head_dim = channels // self.num_heads
        legacy = torch.arange(3 * channels).reshape(self.num_heads, 3, head_dim).transpose(0, 1).reshape(-1)
        self.register_buffer("timm_rows", legacy, persistent=False)

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        b, c, *spatial = x.shape
        tokens = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # (B, T, C)
        qkv = F.linear(tokens, self.qkv.weight[self.timm_rows, :, 0], self.qkv.bias[self.timm_rows])
        h = F.linear(qkv_attention(qkv, self.num_heads), self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)  # channels last


class EmbedSequential(nn.Sequential):
    """A stage of the UNet: layers that take the embedding (ResBlock, AttentionBlock) get it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class UNet(nn.Module):
    """guided-diffusion's UNet as Palette builds it (resblock_updown, scale-shift norm, no
    conv resampling), with the reference's constructor names; norm_groups is fastforget's (the
    reference's 32 needs widths of 32)."""

    def __init__(self, image_size: int = 256, in_channel: int = 6, inner_channel: int = 64, out_channel: int = 3,
                 res_blocks: int = 2, attn_res: Sequence[int] = (16,), dropout: float = 0.0,
                 channel_mults: Sequence[int] = (1, 2, 4, 8), num_heads: int = 1, num_head_channels: int = 32,
                 norm_groups: int = 32):
        super().__init__()
        for width in {inner_channel * m for m in channel_mults}:
            if width % norm_groups:
                raise InvalidValue(f"every width must be a multiple of norm_groups {norm_groups}, got {width} "
                                   f"(inner_channel {inner_channel} x channel_mults {tuple(channel_mults)})")
        self.image_size, self.in_channel, self.out_channel = image_size, in_channel, out_channel
        self.inner_channel = inner_channel
        groups = norm_groups
        emb_dim = inner_channel * 4
        self.cond_embed = nn.Sequential(nn.Linear(inner_channel, emb_dim), SiLU(), nn.Linear(emb_dim, emb_dim))
        self.register_buffer("freqs", embedding_frequencies(inner_channel), persistent=False)
        ch = int(channel_mults[0] * inner_channel)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channel, ch, 3, padding=1))])
        skips, ds = [ch], 1
        for level, mult in enumerate(channel_mults):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, emb_dim, dropout, int(mult * inner_channel), groups=groups)]
                ch = int(mult * inner_channel)
                if ds in attn_res:
                    layers.append(AttentionBlock(ch, num_head_channels, num_heads, groups))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mults) - 1:
                self.input_blocks.append(EmbedSequential(ResBlock(ch, emb_dim, dropout, ch, down=True, groups=groups)))
                skips.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(ResBlock(ch, emb_dim, dropout, groups=groups),
                                            AttentionBlock(ch, num_head_channels, num_heads, groups),
                                            ResBlock(ch, emb_dim, dropout, groups=groups))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mults))[::-1]:
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, dropout, int(inner_channel * mult), groups=groups)]
                ch = int(inner_channel * mult)
                if ds in attn_res:
                    layers.append(AttentionBlock(ch, num_head_channels, num_heads, groups))
                if level and i == res_blocks:
                    layers.append(ResBlock(ch, emb_dim, dropout, ch, up=True, groups=groups))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), SiLU(), nn.Conv2d(ch, out_channel, 3, padding=1))
        self.apply(_kaiming)


    def embed(self, gammas: Tensor) -> Tensor:
        return self.cond_embed(gamma_embedding(gammas.reshape(-1), self.freqs))

    def encoder_features(self, x: Tensor, gammas: Tensor, emb: Optional[Tensor] = None) -> list[Tensor]:
        """The reference's forward(x, gammas, return_feat=True): the 12 input blocks' outputs and
        the middle block's (at Palette's config), without running the decoder."""
        emb = self.embed(gammas) if emb is None else emb
        h, feats = x.float(), []
        for block in self.input_blocks:
            h = block(h, emb)
            feats.append(h)
        feats.append(self.middle_block(h, emb))
        return feats

    def forward(self, x: Tensor, gammas: Tensor) -> Tensor:
        """The noise prediction for x = cat(condition, noisy image) at noise levels gammas (B,)."""
        emb = self.embed(gammas)
        feats = self.encoder_features(x, gammas, emb)
        h = feats.pop()
        for block in self.output_blocks:
            h = block(torch.cat([h, feats.pop()], dim=1), emb)
        norm, _, conv = self.out
        return conv(group_norm_silu(h.to(x.dtype), norm.weight, norm.bias, norm.num_groups, norm.eps))

    def encoder_modules(self) -> list[nn.Module]:
        """What the method trains: the noise-level embedding, the input blocks, the middle block
        (cond_embed also feeds the frozen decoder, as in the reference)."""
        return [self.cond_embed, self.input_blocks, self.middle_block]


def _kaiming(module: nn.Module) -> None:
    """Palette's init_weights('kaiming') for training: every conv and linear weight kaiming-normal
    (fan in), its bias 0; it runs after construction, so guided-diffusion's zeroed output convs are
    drawn too."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def make_beta_schedule(schedule: str, n_timestep: int, linear_start: float = 1e-6, linear_end: float = 1e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """The reference's beta schedules (float64)."""
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "quad":
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "const":
        return linear_end * np.ones(n_timestep, dtype=np.float64)
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        return np.clip(1 - alphas[1:] / alphas[:-1], None, 0.999)
    raise InvalidValue(f"schedule must be linear, quad, const or cosine, got {schedule!r}")


class Palette(nn.Module):
    """The reference's Network: denoise_fn (the UNet) and the noise schedule's buffers."""

    def __init__(self, schedule: str = "linear", n_timestep: int = 2000, linear_start: float = 1e-6,
                 linear_end: float = 1e-2, **unet):
        super().__init__()
        self.denoise_fn = UNet(**unet)
        self.set_schedule(make_beta_schedule(schedule, n_timestep, linear_start, linear_end))

    def set_schedule(self, betas: np.ndarray) -> None:
        """The reference's set_new_noise_schedule: gammas = cumprod(1 - betas) and the posterior's
        coefficients, computed in float64 and kept as float32 buffers (in the state dict)."""
        alphas = 1.0 - betas
        gammas = np.cumprod(alphas, axis=0)
        gammas_prev = np.append(1.0, gammas[:-1])
        variance = betas * (1.0 - gammas_prev) / (1.0 - gammas)
        values = dict(gammas=gammas, sqrt_recip_gammas=np.sqrt(1.0 / gammas),
                      sqrt_recipm1_gammas=np.sqrt(1.0 / gammas - 1),
                      posterior_log_variance_clipped=np.log(np.maximum(variance, 1e-20)),
                      posterior_mean_coef1=betas * np.sqrt(gammas_prev) / (1.0 - gammas),
                      posterior_mean_coef2=(1.0 - gammas_prev) * np.sqrt(alphas) / (1.0 - gammas))
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))

    @property
    def num_timesteps(self) -> int:
        return self.gammas.shape[0]

    def forward(self, x: Tensor, gammas: Tensor) -> Tensor:
        return self.denoise_fn(x, gammas)

    def encoder_features(self, x: Tensor, gammas: Tensor) -> list[Tensor]:
        """The 13 features the method compares: denoise_fn(x, gammas, return_feat=True)."""
        return self.denoise_fn.encoder_features(x, gammas)

    def sample_gammas(self, t: Tensor, u: Tensor) -> Tensor:
        """Training's noise levels: gamma between the levels t - 1 and t, u in [0, 1) along the way
        (the reference's sample_gammas, with t in {1, ..., T - 1})."""
        low, high = self.gammas[t - 1], self.gammas[t]
        return (high - low) * u + low

    @torch.no_grad()
    def inpaint(self, y_cond: Tensor, y_0: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None,
                steps: Optional[int] = None) -> Tensor:
        """The reference's restoration for inpainting: from y_t = y_cond (the known pixels, noise
        in the hole), the ancestral p_sample loop over the model's own schedule, T steps down to 0,
        the known region put back after every step. steps < T strides the schedule (respaced: the
        posterior of the chosen levels), for speed; that is not the reference's sampler. Images in
        [-1, 1]; mask (B, 1, H, W), 1 in the hole."""
        coef = self.sampling_schedule(steps)
        y_t = y_cond
        for i in reversed(range(coef[0].shape[0])):
            gamma, recip, recipm1, c1, c2, log_var = (v[i] for v in coef)
            eps = self.denoise_fn(torch.cat([y_cond, y_t], dim=1), gamma.expand(y_t.shape[0]))
            y_0_hat = (recip * y_t - recipm1 * eps).clamp(-1.0, 1.0)
            mean = c1 * y_0_hat + c2 * y_t
            if i > 0:
                mean = mean + torch.randn(y_t.shape, generator=generator, device=y_t.device) * torch.exp(0.5 * log_var)
            y_t = y_0 * (1.0 - mask) + mask * mean
        return y_t

    def sampling_schedule(self, steps: Optional[int] = None) -> tuple[Tensor, ...]:
        """Per sampling step, lowest level first: (gamma, sqrt(1/gamma), sqrt(1/gamma - 1), the
        posterior mean's two coefficients, its clipped log variance). The full schedule is the
        model's own buffers (the checkpoint's, as the reference samples); `steps` of them, evenly
        strided, are respaced: each step's beta is 1 - gamma / previous gamma (float64)."""
        if steps is None or steps >= self.num_timesteps:
            return (self.gammas, self.sqrt_recip_gammas, self.sqrt_recipm1_gammas, self.posterior_mean_coef1,
                    self.posterior_mean_coef2, self.posterior_log_variance_clipped)
        levels = torch.linspace(0, self.num_timesteps - 1, steps, device=self.gammas.device).round().long().unique()
        gammas = self.gammas.double()[levels]
        prev = torch.cat([gammas.new_ones(1), gammas[:-1]])
        betas = 1.0 - gammas / prev
        variance = betas * (1.0 - prev) / (1.0 - gammas)
        values = (gammas, gammas.rsqrt(), (1.0 / gammas - 1).sqrt(), betas * prev.sqrt() / (1.0 - gammas),
                  (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - gammas), variance.clamp_min(1e-20).log())
        return tuple(v.float() for v in values)


CONFIGS = {
    # config/inpainting_places2_unlearn.json: 6 -> 3 channels, attention in the middle block only
    # (attn_res 16 never matches: the downsampling factor reaches 8), linear 2000-step schedule.
    "palette_places2": dict(image_size=256, in_channel=6, out_channel=3, inner_channel=64, channel_mults=(1, 2, 4, 8),
                            res_blocks=2, attn_res=(16,), num_head_channels=32, dropout=0.0, norm_groups=32,
                            schedule="linear", n_timestep=2000, linear_start=1e-6, linear_end=0.01),
    # The embedded digits (16 x 16, grey): condition + noisy image in, noise out; widths 16 and 32,
    # a 100-step linear schedule with the real model's final gamma (sum of betas ~ 10). Its sampler
    # costs 36 MFLOP an image a step, so the demo's evaluation takes seconds a model on 2 cores.
    "palette_tiny": dict(image_size=16, in_channel=2, out_channel=1, inner_channel=16, channel_mults=(1, 2),
                         res_blocks=1, attn_res=(), num_head_channels=16, dropout=0.0, norm_groups=8,
                         schedule="linear", n_timestep=100, linear_start=1e-4, linear_end=0.2),
}


def create_palette(name: str, **overrides) -> Palette:
    """A model of a named config (CONFIGS), with any of the reference's UNet arguments (image_size,
    in_channel, out_channel, inner_channel, channel_mults, res_blocks, attn_res, num_head_channels,
    dropout), norm_groups, or the schedule's (schedule, n_timestep, linear_start, linear_end)
    overridden."""
    if name not in CONFIGS:
        raise InvalidValue(f"unknown model {name!r}; expected one of {sorted(CONFIGS)}")
    model = Palette(**{**CONFIGS[name], **overrides})
    model.config_name, model.overrides = name, dict(overrides)
    return model


def load_palette(path: str, name: Optional[str] = None, *, checkpoint: Optional[dict] = None,
                 **overrides) -> Palette:
    """A model from a checkpoint file: the reference's `{epoch}_Network.pth` (a state dict of
    denoise_fn.* and the schedule's buffers; name needed), one its unlearning wrote (with
    teacher_denoise_fn.* keys, ignored) or with DDP's `module.` prefix, or fastforget's own (a dict
    with "model" and "config"). Read with weights_only=True; a missing or unexpected key is named."""
    checkpoint = load_weights(path, "model file") if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict):
        raise InvalidValue(f"{path}: expected a state dict or a dict with a 'model' entry (a Palette checkpoint)")
    config = checkpoint.get("config") or {}
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("teacher_denoise_fn.")}
    name = name or config.get("model")
    if name is None:
        raise InvalidValue(f"{path} does not record its model config; pass name= (--model, one of {sorted(CONFIGS)})")
    model = create_palette(name, **{**config.get("overrides", {}), **overrides})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidValue(f"{path} does not match {name}: missing keys {missing}, unexpected keys {unexpected}")
    return model
