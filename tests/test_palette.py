"""The diffusion family against the Palette reference's definitions (../shared/reference/palette.md,
from jpmorganchase/i2i_Palette-Image-to-Image-Diffusion-Models, branch i2i): the Network's keys
and sizes, the schedule, the gamma embedding, the legacy attention, the 13 features, loading, the
sampler, the unlearning step's routing and loss, the baselines' losses, the training masks, and
the trainer on palette_tiny (what trains, resume, two ranks)."""
import copy
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fastforget import families
from fastforget.distributed import Dist
from fastforget.families.palette import centre_box, hybrid_masks
from fastforget.models import create_palette, load_palette
from fastforget.models.palette import SCHEDULE_BUFFERS, AttentionBlock, GroupNorm32, embedding_frequencies
from fastforget.train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from fastforget.train.loop import load_checkpoint
from fastforget.train.unlearn import unlearning_step

from conftest import one_and_two_ranks

PALETTE = families.get("palette")
ENCODER = ("denoise_fn.cond_embed.", "denoise_fn.input_blocks.", "denoise_fn.middle_block.")
DECODER = ("denoise_fn.output_blocks.", "denoise_fn.out.")


def tiny(**overrides):
    torch.manual_seed(0)
    model = PALETTE.create("palette_tiny", **overrides)
    with torch.no_grad():  # the out conv starts at zero: give the decoder's output something to say
        model.denoise_fn.out[-1].weight.normal_(0, 0.1)
    return model


# -- the model --------------------------------------------------------------------------------


def test_places2_is_the_reference_network_key_for_key():
    with torch.device("meta"):
        model = create_palette("palette_places2")
    state = model.state_dict()
    unet = [k for k in state if k.startswith("denoise_fn.")]
    assert len(unet) == 326 and len(state) == 332
    assert sorted(k for k in state if not k.startswith("denoise_fn.")) == sorted(SCHEDULE_BUFFERS)
    assert all(state[name].shape == (2000,) for name in SCHEDULE_BUFFERS)
    assert sum(p.numel() for p in model.parameters()) == 62_641_347
    encoder = [p for n, p in model.named_parameters() if n.startswith(ENCODER)]
    assert len(encoder) == 148 and sum(p.numel() for p in encoder) == 25_044_416
    skips = sorted(k.split(".")[2] for k in unet if k.startswith("denoise_fn.input_blocks.") and "skip_connection" in k)
    assert skips == ["10", "10", "4", "4", "7", "7"]  # weight and bias where the width changes
    assert state["denoise_fn.middle_block.1.qkv.weight"].shape == (1536, 512, 1)
    assert state["denoise_fn.cond_embed.0.weight"].shape == (256, 64)
    assert state["denoise_fn.input_blocks.0.0.weight"].shape == (64, 6, 3, 3)
    assert not any(".attn" in k or "input_blocks" in k and ".1.qkv" in k for k in unet)  # attention: middle only


def test_schedule_buffers_are_the_references():
    model = create_palette("palette_tiny", n_timestep=2000, linear_start=1e-6, linear_end=0.01)
    betas = np.linspace(1e-6, 0.01, 2000, dtype=np.float64)
    gammas = np.cumprod(1 - betas)
    prev = np.append(1.0, gammas[:-1])
    want = dict(gammas=gammas, sqrt_recip_gammas=np.sqrt(1 / gammas), sqrt_recipm1_gammas=np.sqrt(1 / gammas - 1),
                posterior_log_variance_clipped=np.log(np.maximum(betas * (1 - prev) / (1 - gammas), 1e-20)),
                posterior_mean_coef1=betas * np.sqrt(prev) / (1 - gammas),
                posterior_mean_coef2=(1 - prev) * np.sqrt(1 - betas) / (1 - gammas))
    for name, value in want.items():
        got = getattr(model, name)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.tensor(value, dtype=torch.float32)), name
    g = model.gammas
    assert g[0] == pytest.approx(0.999999, abs=1e-7) and g[1000] == pytest.approx(0.0814, abs=1e-4)
    assert g[1999] == pytest.approx(4.386e-5, rel=1e-3) and int((g >= 0.5).sum()) == 526


def test_training_gammas_lie_between_adjacent_levels():
    model = tiny()
    t = torch.tensor([1, 5, 99])
    u = torch.tensor([0.0, 0.25, 0.999])
    want = model.gammas[t - 1] + u * (model.gammas[t] - model.gammas[t - 1])
    torch.testing.assert_close(model.sample_gammas(t, u), want, rtol=0, atol=1e-7)
    # the step's draws: t in {1, ..., T - 1}, so gamma never reaches gamma[0]'s side of level 0
    step = PALETTE.draw(model, torch.rand(256, 1, 16, 16), torch.zeros(256, dtype=torch.bool),
                        torch.Generator().manual_seed(0), Dist(), UnlearnConfig(checkpoint="-"))
    assert bool((step.gammas <= model.gammas[0]).all()) and bool((step.gammas >= model.gammas[-1]).all())


def test_gamma_embedding_is_cos_first_from_the_raw_gamma_with_no_host_copy():
    model = tiny()
    unet = model.denoise_fn
    gammas = torch.tensor([0.999, 0.3, 4.4e-5])
    half = unet.inner_channel // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    torch.testing.assert_close(embedding_frequencies(unet.inner_channel), freqs)
    args = gammas[:, None] * freqs[None]
    emb0 = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    lin1, lin2 = unet.cond_embed[0], unet.cond_embed[2]
    want = lin2(F.silu(lin1(emb0)))
    torch.testing.assert_close(unet.embed(gammas), want, rtol=1e-6, atol=1e-6)
    buffers = dict(unet.named_buffers())  # the frequencies live with the model (moved with it), not in its keys
    assert any(torch.equal(b, freqs) for b in buffers.values())
    assert not any("freq" in k for k in model.state_dict())


def test_attention_is_the_legacy_head_order():
    """QKVAttentionLegacy: qkv reshaped (B * heads, 3 * ch, T) and split into q, k, v per head;
    weights softmax((q s)(k s)) with s = ch^(-1/4)."""
    torch.manual_seed(1)
    block = AttentionBlock(64, num_head_channels=16, groups=8)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 64, 4, 5)
    b, c, t = 2, 64, 20
    h = F.group_norm(x.reshape(b, c, t).float(), 8, block.norm.weight, block.norm.bias, 1e-5)
    qkv = F.conv1d(h, block.qkv.weight, block.qkv.bias)
    heads, ch = 4, 16
    q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)
    want = (x.reshape(b, c, t) + F.conv1d(a, block.proj_out.weight, block.proj_out.bias)).reshape(x.shape)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_group_norm_runs_in_float32():
    """GroupNorm32: statistics in float32 whatever the input's dtype. A bfloat16 GroupNorm of
    values around 300 loses the deviations; float32 keeps them."""
    norm = GroupNorm32(4, 8)
    x = (300 + torch.randn(2, 8, 6, 6)).bfloat16()
    want = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * 2 ** -7 * float(want.abs().max()))


def test_encoder_features_are_the_13_maps_and_never_run_the_decoder():
    torch.manual_seed(0)
    model = create_palette("palette_places2")
    ran = []
    for module in (model.denoise_fn.output_blocks[0], model.denoise_fn.out[-1]):
        module.register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        feats = model.encoder_features(torch.randn(1, 6, 32, 32), torch.tensor([0.5]))
    spec = [(64, 256), (64, 256), (64, 256), (64, 128), (128, 128), (128, 128), (128, 64), (256, 64), (256, 64),
            (256, 32), (512, 32), (512, 32), (512, 32)]  # (C, H) at 256 px
    assert [tuple(f.shape[1:]) for f in feats] == [(c, h // 8, h // 8) for c, h in spec]
    assert not ran
    with torch.no_grad():
        assert model(torch.randn(1, 6, 32, 32), torch.tensor([0.5])).shape == (1, 3, 32, 32)
    assert ran


def test_load_takes_the_references_checkpoints_and_names_what_does_not_fit(tmp_path):
    model = tiny()
    state = model.state_dict()
    unlearned = {**state, **{"teacher_" + k: v for k, v in state.items() if k.startswith("denoise_fn.")}}
    torch.save({"module." + k: v for k, v in unlearned.items()}, tmp_path / "3_Network.pth")
    loaded = load_palette(str(tmp_path / "3_Network.pth"), "palette_tiny")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    strict = create_palette("palette_tiny")
    strict.load_state_dict(state, strict=True)  # the reference's own strict load
    broken = dict(state)
    broken.pop("denoise_fn.out.2.weight")
    broken["denoise_fn.extra.weight"] = torch.ones(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \['denoise_fn.out.2.weight'\], unexpected keys "
                                         r"\['denoise_fn.extra.weight'\]"):
        load_palette(str(tmp_path / "broken.pth"), "palette_tiny")
    with pytest.raises(ValueError, match="does not record its model config; pass name="):
        load_palette(str(tmp_path / "3_Network.pth"))
    assert families.load(str(tmp_path / "3_Network.pth"), "palette_tiny").fastforget_config["family"] == "palette"


def test_sampler_is_the_references_p_sample_loop():
    """restoration: from y_t = y_cond, for t = T-1 ... 0: eps_hat at gamma[t], y_0_hat clamped,
    the posterior mean, noise unless t = 0, then the known region put back."""
    model = tiny(n_timestep=6).eval()
    g = torch.Generator().manual_seed(4)
    y_0 = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    mask = centre_box(16, 0.5).expand(3, 1, -1, -1)
    y_cond = y_0 * (1 - mask) + mask * torch.randn(y_0.shape, generator=g)
    got = model.inpaint(y_cond, y_0, mask, torch.Generator().manual_seed(9))
    ref_gen = torch.Generator().manual_seed(9)
    y_t = y_cond
    with torch.no_grad():
        for t in reversed(range(6)):
            eps = model.denoise_fn(torch.cat([y_cond, y_t], 1), model.gammas[t].expand(3))
            y0_hat = (model.sqrt_recip_gammas[t] * y_t - model.sqrt_recipm1_gammas[t] * eps).clamp(-1, 1)
            mean = model.posterior_mean_coef1[t] * y0_hat + model.posterior_mean_coef2[t] * y_t
            if t > 0:
                mean = mean + torch.randn(y_t.shape, generator=ref_gen) * (0.5 * model.posterior_log_variance_clipped[t]).exp()
            y_t = y_0 * (1 - mask) + mask * mean
    torch.testing.assert_close(got, y_t, rtol=0, atol=0)
    assert torch.equal(got[mask.expand_as(got) == 0], y_0[mask.expand_as(y_0) == 0])
    full = model.sampling_schedule()
    assert all(a is b for a, b in zip(full, (model.gammas, model.sqrt_recip_gammas)))
    strided = model.sampling_schedule(3)
    assert strided[0].shape == (3,) and torch.equal(strided[0], model.gammas[torch.tensor([0, 2, 5])])


def test_centre_box_is_the_references_test_mask():
    box = centre_box(256, 0.5)
    assert box.sum() == 128 * 128 and box[0, 0, 64:192, 64:192].all()


def test_hybrid_masks_are_a_box_with_strokes_for_the_global_batch():
    d = Dist()
    masks = hybrid_masks(torch.Generator().manual_seed(0), 64, 256, d)
    assert masks.shape == (64, 1, 256, 256) and masks.dtype == torch.bool
    area = masks.float().mean((1, 2, 3))
    assert float(area.min()) >= 108 * 108 / 256 ** 2 and float(area.max()) < 0.8  # at least the box
    assert float(area.mean()) == pytest.approx(0.35, abs=0.1)
    rows = masks[:, 0].any(2).float().sum(1)  # a box of 108-128 px always, strokes around it
    assert float(rows.min()) >= 108
    small = hybrid_masks(torch.Generator().manual_seed(1), 8, 16, d)
    halves = [hybrid_masks(torch.Generator().manual_seed(1), 4, 16, Dist(rank=r, world=2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), small)


# -- the unlearning step: routing and loss, as the reference's Network.forward -------------------


def _step(method="ours", forget_weight=0.3, batch=6, device="cpu"):
    model = tiny().to(device)
    cfg = UnlearnConfig(checkpoint="-", method=method, forget_weight=forget_weight).for_family(PALETTE)
    module, loss_fn = unlearning_step(cfg, model, Dist(device=torch.device(device)))
    images = torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    is_forget = torch.tensor([True, False, False, True, False, True][:batch], device=device)
    return model, cfg, module, loss_fn, images, is_forget


def _weighted_mse(s, t, labels, alpha):
    """The reference's weighted_mse_loss of one feature: F.mse_loss of row-masked tensors."""
    view = (-1,) + (1,) * (s.dim() - 1)
    r, f = ((labels + 1) / 2).view(view), ((1 - labels) / 2).view(view)
    return F.mse_loss(s * r, t * r) + alpha * F.mse_loss(s * f, t * f)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_step_routes_and_scores_as_the_reference(device):
    """On CUDA the step runs the student under bf16 autocast and a bf16 teacher: its loss is the
    float32 reference's to bf16's precision."""
    model, cfg, module, loss_fn, images, is_forget = _step(device=device)
    original = copy.deepcopy(model)  # the reference's teacher: the whole UNet, deep-copied
    out = loss_fn((images, is_forget), torch.Generator(device).manual_seed(5), module)
    step = PALETTE.draw(model, images, is_forget, torch.Generator(device).manual_seed(5), Dist(device=torch.device(device)),
                        cfg)
    y_0, hole = images * 2 - 1, step.mask.expand_as(images)
    student, teacher = step.student_input[:, 1:], step.teacher_input[:, 1:]
    cond = step.student_input[:, :1]
    assert torch.equal(cond[~hole], y_0[~hole]) and torch.equal(step.teacher_input[:, :1], cond)
    assert torch.equal(student[~hole], y_0[~hole]) and torch.equal(teacher[~hole], y_0[~hole])
    assert torch.equal(step.student_input[~is_forget], step.teacher_input[~is_forget])
    eps = teacher  # forget rows: the hole is the noise itself; the student's x_t is made of it
    g = step.gammas.view(-1, 1, 1, 1)
    x_t = g.sqrt() * y_0 + (1 - g).sqrt() * eps
    forget_hole = hole & is_forget.view(-1, 1, 1, 1)
    torch.testing.assert_close(student[forget_hole], x_t[forget_hole], rtol=1e-6, atol=1e-6)
    labels = torch.where(is_forget, -1.0, 1.0)
    with torch.no_grad():
        targets = original.denoise_fn.encoder_features(step.teacher_input, step.gammas)
    feats = model.encoder_features(step.student_input, step.gammas)
    want = sum(_weighted_mse(s, t, labels, 0.3) for s, t in zip(feats, targets))
    assert len(feats) == 5  # palette_tiny: input blocks 0-3 and the middle block
    tol = dict(rtol=1e-5, atol=1e-8) if device == "cpu" else dict(rtol=5e-2, atol=1e-4)
    torch.testing.assert_close(out["loss"], want, **tol)
    param = model.denoise_fn.input_blocks[1][0].in_layers[0].weight
    got_grad = torch.autograd.grad(out["loss"], param)[0]
    torch.testing.assert_close(got_grad, torch.autograd.grad(want, param)[0], rtol=tol["rtol"] * 10,
                               atol=tol["atol"] * 10)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ours", "retain-label"])
def test_the_step_never_waits_for_the_host(method):
    """Draws, inputs, teacher, loss and backward with CUDA's sync debug mode set to error."""
    model, cfg, module, loss_fn, images, is_forget = _step(method, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    loss_fn((images, is_forget), gen, module)["loss"].backward()  # first calls: lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn((images, is_forget), gen, module)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_the_teacher_holds_no_decoder_and_the_student_keeps_its_own():
    model = tiny()
    teacher = PALETTE.teacher(model, torch.device("cpu"), whole=False)
    assert len(teacher.output_blocks) == 0 and not any(p.requires_grad for p in teacher.parameters())
    assert len(model.denoise_fn.output_blocks) > 0
    encoder = PALETTE.trainable(model, whole=False)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if n.startswith(ENCODER)}
    assert isinstance(encoder, torch.nn.Module)


@pytest.mark.parametrize("method", ["max-loss", "noisy-label", "retain-label"])
def test_whole_model_baselines_are_the_references_losses(method):
    model, cfg, module, loss_fn, images, is_forget = _step(method, forget_weight=0.4)
    original = copy.deepcopy(model)
    out = loss_fn((images, is_forget), torch.Generator().manual_seed(5), module)
    step = PALETTE.draw(model, images, is_forget, torch.Generator().manual_seed(5), Dist(), cfg)
    labels = torch.where(is_forget, -1.0, 1.0)
    view = (-1, 1, 1, 1)
    r, f = ((labels + 1) / 2).view(view), ((1 - labels) / 2).view(view)
    m = step.mask.float()
    if method == "retain-label":  # distil the original's eps_hat; forget rows take a retain row's, tiled
        with torch.no_grad():
            big_t = original(step.student_input, step.gammas)
        s = model(step.student_input, step.gammas)
        retain_idx = (~is_forget).nonzero()[:, 0]
        u = big_t[retain_idx].tile((math.ceil(len(labels) / len(retain_idx)), 1, 1, 1))[:len(labels)]
        want = F.mse_loss(s * r, big_t * r) + 0.4 * F.mse_loss(s * f, u * f)
    else:
        x = step.student_input if method == "max-loss" else step.teacher_input
        eps_hat, eps = model(x, step.gammas), step.noise
        sign = -1.0 if method == "max-loss" else 1.0
        want = F.mse_loss(m * eps * r, m * eps_hat * r) + sign * 0.4 * F.mse_loss(m * eps * f, m * eps_hat * f)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-8)
    if method == "noisy-label":  # its input holes are the very noise it must predict
        hole = step.mask.expand_as(images) & is_forget.view(view)
        assert torch.equal(step.teacher_input[:, 1:][hole], step.noise[hole])


def test_random_encoders_retain_term_is_ours_and_its_forget_target_is_noise():
    _, _, module, loss_fn, images, is_forget = _step("random-encoder")
    _, _, ours_module, ours_fn, _, _ = _step("ours")
    a = loss_fn((images, is_forget), torch.Generator().manual_seed(5), module)
    b = ours_fn((images, is_forget), torch.Generator().manual_seed(5), ours_module)
    torch.testing.assert_close(a["retain_loss"], b["retain_loss"])
    assert float(a["forget_loss"]) > 10 * float(b["forget_loss"])


# -- the trainer on palette_tiny ---------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("palette_original")
    pretrain(PretrainConfig(model="palette_tiny", device="cpu",
                            loop=LoopConfig(out=str(out), epochs=0.05, batch_size=32, lr=1e-3, progress=False)))
    return str(out / "checkpoint.pt")


def _unlearn(original, out, method="ours", device="cpu", **loop):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), device=device,
                        method=method, loop=LoopConfig(out=str(out), epochs=0.1, batch_size=16, lr=1e-3,
                                                       log_every=2, progress=False, **loop))
    return unlearn(cfg)


def _states(original, out):
    return (families.load(original).state_dict(), families.load(os.path.join(out, "checkpoint.pt")).state_dict())


def test_unlearning_trains_the_encoder_and_cond_embed_only(original, tmp_path):
    metrics = _unlearn(original, tmp_path)
    before, after = _states(original, tmp_path)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith(ENCODER), name  # the decoder and the schedule bit for bit
    assert any(name.startswith("denoise_fn.cond_embed.") and not torch.equal(before[name], after[name])
               for name in before)
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert checkpoint["config"]["family"] == "palette" and checkpoint["config"]["model"] == "palette_tiny"
    assert metrics["lr"] == 1e-3 and {"loss", "retain_loss", "forget_loss"} <= set(metrics)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ours", "retain-label"])
def test_unlearning_runs_on_the_gpu(original, tmp_path, method):
    """bf16 autocast and a bf16 teacher on CUDA, the fused kernels in the step; what trains is the CPU's."""
    metrics = _unlearn(original, tmp_path, method=method, device="cuda")
    assert all(math.isfinite(metrics[k]) for k in ("loss", "retain_loss", "forget_loss"))
    before, after = _states(original, tmp_path)
    moved = lambda prefix: any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))  # noqa: E731
    assert moved(ENCODER) and moved(DECODER) == (method == "retain-label")


def test_the_recipe_is_the_references_by_default(original):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0",)).for_family(PALETTE)
    loop = cfg.loop
    assert (loop.lr, loop.weight_decay, loop.betas, loop.schedule, loop.clip_grad) == \
        (5e-5, 0.0, (0.9, 0.999), "constant", 0.0)
    assert cfg.normalize == "batch" and cfg.augment == "none"
    with pytest.raises(ValueError, match="mask_ratio .* does not apply to the palette family"):
        UnlearnConfig(checkpoint=original, forget_classes=("0",), mask_ratio=0.5).for_family(PALETTE)


@pytest.mark.parametrize("method", ["max-loss", "noisy-label", "retain-label", "random-encoder"])
def test_baselines_train_what_the_reference_trains(original, tmp_path, method):
    _unlearn(original, tmp_path, method=method)
    before, after = _states(original, tmp_path)
    moved = lambda prefix: any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))  # noqa: E731
    assert moved(DECODER) == (method != "random-encoder")
    assert moved(ENCODER)
    assert all(torch.equal(before[n], after[n]) for n in SCHEDULE_BUFFERS)


def test_resume_repeats_the_uninterrupted_run_bitwise(original, tmp_path):
    _unlearn(original, tmp_path / "whole")
    _unlearn(original, tmp_path / "parts", stop_after=2)
    _unlearn(original, tmp_path / "parts", resume=True)
    whole = load_checkpoint(str(tmp_path / "whole" / "checkpoint.pt"))
    parts = load_checkpoint(str(tmp_path / "parts" / "checkpoint.pt"))
    assert whole["step"] == parts["step"] > 2
    for name, value in whole["model"].items():
        assert torch.equal(value, parts["model"][name]), name


def test_two_ranks_compute_what_one_does(original, tmp_path):
    """torchrun, 2 CPU ranks with 8 images each = 1 process with 16: each rank takes its rows of
    the global batch's levels, masks and noise."""
    (a, b), logs, _ = one_and_two_ranks(["unlearn", "--checkpoint", original, "--forget-classes", "0,1",
                                         "--retain-classes", "2,3", "--epochs", "0.15", "--lr", "1e-4", "--device",
                                         "cpu", "--log-every", "1"], 8, tmp_path)
    assert a["step"] == b["step"] >= 2
    assert len(logs[0]) == len(logs[1]) == a["step"]
    for m1, m2 in zip(*logs):  # every step's loss and gradient norm: the same trajectory
        for key in ("loss", "retain_loss", "forget_loss", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), (m1["step"], key)
    # Adam moves a parameter by up to lr a step whatever its gradient's size, and some gradients
    # are rounding noise (the attention's key bias: softmax ignores it): weights agree to that.
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=0, atol=2e-4 * a["step"], msg=name)


def test_completion_keeps_the_known_pixels(original):
    model = families.load(original)
    images = torch.rand(2, 1, 16, 16)
    out = PALETTE.complete(model, images, "inpaint", 0.5, seed=0, steps=4)
    keep = centre_box(16, 0.5).expand_as(images) == 0
    torch.testing.assert_close(out[keep], images[keep], rtol=0, atol=1e-6)
    assert torch.equal(out, PALETTE.complete(model, images, "inpaint", 0.5, seed=0, steps=4))
    assert not torch.equal(out, PALETTE.complete(model, images, "inpaint", 0.5, seed=1, steps=4))


def test_eval_says_when_the_sampler_is_not_the_references(original, tmp_path):
    from fastforget.eval.features import extractor
    from fastforget.eval.run import evaluate
    from fastforget.train.demo import demo_sets

    report = evaluate({"original": families.load(original)}, demo_sets(), extractor("digits"), None, 0.5,
                      str(tmp_path), sample_steps=2)
    assert set(report) == {"inpaint"} and report["inpaint"]["original"]["forget"]["fid"] > 0
    assert (tmp_path / "results.md").read_text().startswith("sampler: a strided schedule of 2 steps, for speed; "
                                                           "not the reference's sampler")
    assert (tmp_path / "fid_is_eval_inpaint.csv").exists() and (tmp_path / "clip_cosine_inpaint.csv").exists()
