"""Bring your own encoder: the method on a model fastforget does not know, a diffusers UNet2DModel
whose conv_in, time embedding, down blocks and mid block are the encoder (diffusers is a test-only
dependency)."""
import pytest
import torch
from torch.nn import functional as F

from fastforget import EncoderUnlearning, frozen_copy, make_diffusion_inputs
from fastforget.families.palette import centre_box

diffusers = pytest.importorskip("diffusers", reason="pip install -e '.[dev]' brings diffusers for this test")

ENCODER = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=2, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)


def encoder_features(unet, x, timesteps):
    """The encoder's features: conv_in's output, every down block's residuals, the mid block's."""
    emb = unet.time_embedding(unet.time_proj(timesteps).to(x.dtype))
    h = unet.conv_in(x)
    feats = [h]
    for block in unet.down_blocks:
        h, residuals = block(hidden_states=h, temb=emb)
        feats += list(residuals)
    return feats + [unet.mid_block(h, emb)]


ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # DDPM's linear schedule


def diffusion_inputs(images, is_forget, generator):
    """Inpainting inputs for both sides: cat(condition, noisy image), the teacher's forget holes
    pure noise; the timesteps go along."""
    y_0 = images * 2 - 1
    t = torch.randint(0, 1000, (images.shape[0],), generator=generator)
    mask = centre_box(16, 0.5).expand(images.shape[0], 1, -1, -1)
    y_cond = y_0 * (1 - mask) + mask * torch.randn(y_0.shape, generator=generator)
    student, teacher = make_diffusion_inputs(y_0, y_cond, mask, ALPHAS_CUMPROD[t], is_forget, generator=generator)
    return (student, t), (teacher, t)


def test_the_method_on_a_diffusers_unet():
    unet = tiny_unet()
    original = frozen_copy(unet)
    method = EncoderUnlearning(student=lambda x: encoder_features(unet, *x),
                               teacher=lambda x: encoder_features(original, *x),
                               inputs=diffusion_inputs, forget_weight=0.5, normalize="batch")
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    is_forget = torch.arange(8) % 2 == 0

    # the loss is Palette's: per feature F.mse_loss of row-masked features, retain + alpha forget
    out = method.loss(images, is_forget, torch.Generator().manual_seed(2))
    (student_in, t), (teacher_in, _) = diffusion_inputs(images, is_forget, torch.Generator().manual_seed(2))
    assert torch.equal(student_in[~is_forget], teacher_in[~is_forget])
    feats = encoder_features(unet, student_in, t)
    with torch.no_grad():
        targets = encoder_features(original, teacher_in, t)
    r, f = (~is_forget).float().view(-1, 1, 1, 1), is_forget.float().view(-1, 1, 1, 1)
    want = sum(F.mse_loss(s * r, u * r) + 0.5 * F.mse_loss(s * f, u * f) for s, u in zip(feats, targets))
    assert len(feats) == 5
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-8)
    assert out.retain_loss.item() == 0.0 and out.forget_loss.item() > 0  # the student starts as the original

    # training the encoder alone: the decoder stays bit for bit, the forget loss falls
    encoder = [p for n, p in unet.named_parameters() if n.startswith(ENCODER)]
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    optimizer = torch.optim.Adam(encoder, lr=1e-3)
    losses = []
    for _ in range(8):
        out = method.loss(images, is_forget, torch.Generator().manual_seed(100))  # the same draws: one objective
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.forget_loss.item())
    for name, p in unet.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith(ENCODER), name
    assert losses[-1] < losses[0]
    assert unet(torch.randn(2, 2, 16, 16), torch.tensor([1, 500])).sample.shape == (2, 1, 16, 16)


def test_the_default_routing_is_noise_images_and_bad_arguments_are_named():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    method = EncoderUnlearning(encoder, frozen_copy(encoder))
    images = torch.rand(6, 1, 8, 8)
    is_forget = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    out = method.loss(images, is_forget, torch.Generator().manual_seed(0))
    assert out.retain_loss.item() == 0.0 and out.forget_loss.item() > 0
    with pytest.raises(TypeError, match="teacher must be callable"):
        EncoderUnlearning(encoder, None)
    with pytest.raises(ValueError, match="normalize must be one of"):
        EncoderUnlearning(encoder, encoder, normalize="mean")
