"""The VQ-GAN family against the MAGE reference's definitions (../shared/reference/mage.md, from
jpmorganchase/i2i_mage, branch i2i): the keys and sizes, the tokenizer's quirks, the vocabulary,
the masks' law, the encoder's latent and the decoder's padding as the reference's formulas give
them, loading, iterative decoding, the eval boxes, the unlearning step's routing and loss, the
baselines' losses, and the trainer on mage_tiny (what trains, resume, two ranks)."""
import copy
import math
import os

import pytest
import torch
from torch.nn import functional as F

from fastforget import families
from fastforget.distributed import Dist
from fastforget.families.mage import TokenStep, composite_mask
from fastforget.models.mage import MaskedGenerativeEncoderViT, ResnetBlock, create_mage, label_smoothed_ce, load_mage
from fastforget.train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from fastforget.train.loop import load_checkpoint
from fastforget.train.unlearn import unlearning_step

from conftest import one_and_two_ranks

MAGE = families.get("mage")
ENCODER = ("token_emb.word_embeddings.", "token_emb.position_embeddings.", "token_emb.LayerNorm.", "blocks.", "norm.")


def tiny(**overrides):
    torch.manual_seed(0)
    model = MAGE.create("mage_tiny", **overrides)
    with torch.no_grad():  # affine norms and biases off their init, so every term shows
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


# -- the model --------------------------------------------------------------------------------


def test_vit_base_is_the_references_state_dict_key_for_key():
    with torch.device("meta"):
        model = create_mage("mage_vit_base_patch16")
    state = model.state_dict()
    vqgan = [k for k in state if k.startswith("vqgan.")]
    assert len(state) == 433 and len(vqgan) == 168
    assert not any("quant_conv" in k or "downsample" in k or "attn" in k for k in vqgan)
    shortcuts = {k for k in vqgan if "nin_shortcut" in k}
    assert shortcuts == {f"vqgan.{p}.block.0.nin_shortcut.weight" for p in ("encoder.down.2", "encoder.down.4",
                                                                          "decoder.up.3", "decoder.up.1")}
    assert state["vqgan.encoder.down.2.block.0.nin_shortcut.weight"].shape == (256, 256, 1, 1)
    assert {k for k in vqgan if k.endswith(".bias") and "conv" in k} == {
        "vqgan.encoder.conv_out.bias", "vqgan.decoder.conv_in.bias", "vqgan.decoder.conv_out.bias",
        *{f"vqgan.decoder.up.{i}.upsample.conv.bias" for i in (1, 2, 3, 4)}}  # ResBlock convs have none
    shapes = {"token_emb.word_embeddings.weight": (2025, 768), "token_emb.position_embeddings.weight": (257, 768),
              "token_emb.position_ids": (1, 257), "mlm_layer.bias": (1, 1, 2025), "decoder_pred.weight": (768, 768),
              "vqgan.quantize.embedding.weight": (1024, 256), "decoder_pos_embed_learned": (1, 257, 768),
              "patch_embed.proj.weight": (768, 3, 16, 16)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    encoder = list(model.encoder_parameters())
    assert sum(p.numel() for p in encoder) == 86_810_112 and len(encoder) == 150
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vqgan.")) == 146_474_217
    assert sum(p.numel() for p in model.vqgan.encoder.parameters()) == 23_775_104
    assert (model.codebook_size, model.fake_class_label, model.mask_token_label) == (1024, 1100, 2024)
    assert model.num_dropped == 128 and model.grid == (16, 16)
    with torch.device("meta"):
        large = create_mage("mage_vit_large_patch16")
    assert len(large.blocks) == 24 and large.token_emb.word_embeddings.weight.shape == (2025, 1024)
    assert large.decoder_pred.weight.shape == (768, 1024)


def test_the_tokenizer_has_maskgits_quirks():
    """ResBlocks: bias-free convs, GroupNorm(32, 1e-6) and swish; where the width changes the 1x1
    shortcut acts on h and the input is dropped; the encoder pools by averaging."""
    torch.manual_seed(0)
    block = ResnetBlock(32, 64)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 32, 8, 8)
    swish = lambda t: t * torch.sigmoid(t)  # noqa: E731
    h = F.conv2d(swish(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight, padding=1)
    h = F.conv2d(swish(F.group_norm(h, 32, block.norm2.weight, block.norm2.bias, 1e-6)), block.conv2.weight, padding=1)
    torch.testing.assert_close(block(x), h + F.conv2d(h, block.nin_shortcut.weight), rtol=1e-5, atol=1e-5)
    assert block.conv1.bias is None and block.conv2.bias is None and block.norm1.eps == 1e-6
    same = ResnetBlock(32, 32)
    assert not hasattr(same, "nin_shortcut")
    model = tiny()
    enc = model.vqgan.encoder
    images = torch.rand(2, 1, 16, 16)
    h = enc.down[0](enc.conv_in(images))  # level 0 then its pooling
    want = F.avg_pool2d(enc.down[0].block[0](enc.conv_in(images)), 2)
    torch.testing.assert_close(h, want)


def test_tokens_are_the_squared_l2_argmin_in_raster_order():
    model = tiny()
    images = torch.rand(3, 1, 16, 16)
    z = model.vqgan.encoder(images)  # (B, e, 8, 8)
    codebook = model.vqgan.quantize.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = (flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.t()
    want = d.argmin(1).view(3, 64)
    assert torch.equal(model.tokenize(images), want)
    # raster order: position r * 8 + c is the map's row r, column c
    assert torch.equal(model.tokenize(images)[:, 8 * 2 + 5], d.view(3, 8, 8, -1)[:, 2, 5].argmin(-1))


def test_the_mask_rate_is_the_references_truncated_normal():
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    rates = torch.stack([model.mask_rate(gen) for _ in range(20000)])
    # TruncNormal(0.55, 0.25) on [0.5, 1]: mean 0.694, sd 0.129, median 0.676 (mage.md)
    assert rates.min() >= 0.5 and rates.max() <= 1.0
    assert abs(float(rates.mean()) - 0.694) < 0.005 and abs(float(rates.std()) - 0.129) < 0.005
    assert abs(float(rates.median()) - 0.676) < 0.006


def test_masks_drop_half_and_mask_ceil_of_the_rate_by_rank():
    model = tiny()
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(1))
    rate = torch.tensor(0.7)
    masks = model.masks_from_noise(noise, rate)
    ordered = noise.sort(1).values
    drop = noise <= ordered[:, 31:32]  # the reference's cut-offs: 32 dropped, ceil(64 * 0.7) = 45 masked
    every = noise <= ordered[:, 44:45]
    assert torch.equal(masks.drop, drop.float()) and torch.equal(masks.all, every.float())
    assert torch.equal(masks.keep, (~drop).nonzero()[:, 1].view(5, 32))  # ascending, as nonzero
    assert torch.equal(masks.masked, every.gather(1, masks.keep))
    ties = torch.zeros(2, 64)  # every value tied: the counts still hold, no retry loop
    tied = model.masks_from_noise(ties, rate)
    assert tied.drop.sum(1).tolist() == [32, 32] and tied.all.sum(1).tolist() == [45, 45]
    back = model.masks_from_raw(masks.drop, masks.all)
    assert torch.equal(back.keep, masks.keep) and torch.equal(back.masked, masks.masked)


def test_pretrainings_task_steps_drop_and_mask_a_square_first():
    from fastforget.families.mage import draw_masks

    model = tiny()
    masks, _ = draw_masks(model, 4, torch.Generator().manual_seed(0), Dist(), hole=True)
    drop = masks.drop.view(4, 8, 8)
    assert masks.drop.sum(1).tolist() == [32] * 4 and (masks.drop <= masks.all).all()
    for row in drop:  # a 4 x 4 square of the 8 x 8 grid lies inside every row's dropped set
        assert any(row[r:r + 4, c:c + 4].all() for r in range(5) for c in range(5))
    cfg = PretrainConfig(model="mage_tiny", task_masks=True).for_family(MAGE)
    assert [MAGE.pretrain_mode(cfg, step) for step in range(4)] == ["random", "random", "random", "hole"]


def _reference_latent(model, images, drop, all_mask):
    """forward_encoder as the reference writes it: ids over 1 + L positions, all embedded, kept rows
    picked with nonzero."""
    tokens = model.tokenize(images)
    ids = torch.where(all_mask > 0, model.mask_token_label, tokens)
    ids = torch.cat([torch.full((ids.shape[0], 1), model.fake_class_label), ids], 1)
    emb = model.token_emb
    x = F.layer_norm(emb.word_embeddings(ids) + emb.position_embeddings(emb.position_ids[:, :ids.shape[1]]),
                     (x_dim := emb.word_embeddings.embedding_dim,), emb.LayerNorm.weight, emb.LayerNorm.bias, 1e-6)
    keep = 1 - torch.cat([torch.zeros(ids.shape[0], 1), drop], 1)
    x = x[keep.nonzero(as_tuple=True)].reshape(ids.shape[0], -1, x_dim)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def test_the_encoder_gives_the_references_latent_and_tuple():
    model = tiny().eval()
    images = torch.rand(3, 1, 16, 16)
    masks = model.draw_masks(3, torch.Generator().manual_seed(2))
    latent, gt, drop, every, ids, drop_raw, all_raw = model.forward_encoder(images, masks.drop, masks.all)
    torch.testing.assert_close(latent, _reference_latent(model, images, masks.drop, masks.all), rtol=1e-5, atol=1e-5)
    assert latent.shape == (3, 1 + 32, 64) and torch.equal(gt, model.tokenize(images))
    assert drop.shape == every.shape == ids.shape == (3, 65)
    assert (drop[:, 0] == 0).all() and (every[:, 0] == 0).all() and (ids[:, 0] == model.fake_class_label).all()
    assert (ids[:, 1:][every[:, 1:] > 0] == model.codebook_size + 1000).all()
    assert torch.equal(drop_raw, masks.drop) and torch.equal(all_raw, masks.all)


def test_dropout_is_live_in_training_only_and_drawn_by_the_caller():
    model = tiny()
    tokens = model.tokenize(torch.rand(2, 1, 16, 16))
    masks = model.draw_masks(2, torch.Generator().manual_seed(0))
    scale = model.token_emb.dropout_scale((2, 33, 64), torch.Generator().manual_seed(1))
    assert torch.equal(scale.unique(), torch.tensor([0.0, 1 / 0.9]))
    model.train()
    a = model.token_emb(tokens, masks.keep, masks.masked, 1, 2, scale)
    plain = model.token_emb(tokens, masks.keep, masks.masked, 1, 2, torch.ones_like(scale))
    torch.testing.assert_close(a, plain * scale)
    model.eval()
    torch.testing.assert_close(model.token_emb(tokens, masks.keep, masks.masked, 1, 2, scale), plain)


def test_the_decoder_pads_with_the_class_row_and_reads_the_tied_embeddings():
    model = tiny().eval()
    images = torch.rand(2, 1, 16, 16)
    masks = model.draw_masks(2, torch.Generator().manual_seed(3))
    latent, _, drop, every, *_ = model.forward_encoder(images, masks.drop, masks.all)
    logits = model.forward_decoder(latent, drop, every)
    x = model.decoder_embed(latent)  # the reference's scatter through nonzero
    pad = x[:, 0:1].repeat(1, 65, 1)
    full = pad.clone()
    full[(1 - drop).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    full = torch.where(every[..., None].bool(), pad, full) + model.decoder_pos_embed_learned
    for block in model.decoder_blocks:
        full = block(full)
    h = model.mlm_layer.ln(F.gelu(model.mlm_layer.fc(model.decoder_norm(full))))
    want = h @ model.token_emb.word_embeddings.weight.t() + model.mlm_layer.bias
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 65, model.codebook_size + 1000 + 1) and model.mlm_layer.ln.eps == 1e-5
    codes = model.forward_decoder(latent, drop, every, codebook_only=True)
    torch.testing.assert_close(codes, logits[..., :model.codebook_size], rtol=1e-5, atol=1e-5)
    logits.sum().backward()  # the head's read of the word embeddings is detached
    assert model.token_emb.word_embeddings.weight.grad is not None
    g_head_only = model.token_emb.word_embeddings.weight.grad.clone()
    model.zero_grad()
    model.forward_decoder(latent.detach(), drop, every).sum().backward()
    assert model.token_emb.word_embeddings.weight.grad is None or not model.token_emb.word_embeddings.weight.grad.any()
    assert g_head_only.any()


def test_the_pretraining_loss_is_label_smoothed_ce_on_the_masked_tokens():
    logits = torch.randn(2, 5, 7)
    target = torch.randint(0, 7, (2, 5))
    logp = logits.log_softmax(-1)
    want = 0.9 * -logp.gather(-1, target[..., None])[..., 0] + 0.1 * -logp.mean(-1)
    torch.testing.assert_close(label_smoothed_ce(logits, target), want)


def test_load_takes_the_references_files_and_names_what_does_not_fit(tmp_path):
    model = tiny()
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "mage.pth")
    loaded = load_mage(str(tmp_path / "mage.pth"), "mage_tiny")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    tokenizer = {k.removeprefix("vqgan."): v for k, v in state.items() if k.startswith("vqgan.")}
    torch.save({"state_dict": tokenizer}, tmp_path / "vqgan.ckpt")
    alone = load_mage(None, "mage_tiny", tokenizer=str(tmp_path / "vqgan.ckpt"))
    assert torch.equal(alone.vqgan.quantize.embedding.weight, model.vqgan.quantize.embedding.weight)
    torch.save({"model": {f"module.{k}": v for k, v in state.items() if k != "norm.bias"}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing keys \\['norm.bias'\\]"):
        load_mage(str(tmp_path / "bad.pth"), "mage_tiny")
    assert families.load(str(tmp_path / "mage.pth"), "mage_tiny").fastforget_config["family"] == "mage"
    assert MAGE.owns(state) and not families.get("mae").owns(state)
    with pytest.raises(ValueError, match="z_channels .* must equal embed_dim"):
        create_mage("mage_tiny", vqgan={"embed_dim": 16})
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        create_mage("mage_tiny", vqgan={"bogus": 1})


# -- generation and eval ----------------------------------------------------------------------


def test_the_eval_masks_are_the_references_boxes():
    """At 256 px: a hole of side 0.25 masks rows and columns [5, 11) of tokens (36), 0.5 [3, 13)
    (100); an outpainting border of k/16 masks 256 - (14 - k)^2 tokens."""
    with torch.device("meta"):
        model = create_mage("mage_vit_base_patch16", depth=1, decoder_depth=1)
    for ratio, count, (lo, hi) in ((0.25, 36, (96, 160)), (0.5, 100, (64, 192))):
        pixels, tokens = MAGE._boxes(model, "inpaint", ratio)
        assert int(tokens.sum()) == count and pixels[lo:hi, lo:hi].all() and int(pixels.sum()) == (hi - lo) ** 2
    for k in range(1, 14):
        pixels, tokens = MAGE._boxes(model, "outpaint", k / 16)
        assert int(tokens.sum()) == 256 - (14 - k) ** 2, k
        assert int((~pixels).sum()) == (256 - 2 * 8 * k) ** 2
    # the margin is a sixteenth of the side: on the digits' 8 x 8 grid, none
    pixels, tokens = MAGE._boxes(tiny(), "inpaint", 0.5)
    assert int(pixels.sum()) == 64 and int(tokens.sum()) == 16
    assert torch.equal(tokens.view(8, 8)[2:6, 2:6], torch.ones(4, 4, dtype=torch.bool))


def test_iterative_decoding_keeps_the_known_tokens_and_skips_steps_as_the_reference():
    model = tiny().eval()
    tokens = model.tokenize(torch.rand(2, 1, 16, 16))
    unknown = torch.zeros(2, 64, dtype=torch.bool)
    unknown[:, 18:30] = True  # 12 of 64: 0.1875
    calls = []
    hook = model.decoder_norm.register_forward_hook(lambda *a: calls.append(1))
    ids = model.decode_iterative(tokens, unknown, torch.Generator().manual_seed(0), steps=20, temperature=6.0)
    hook.remove()
    skipped = sum(math.cos(math.pi / 2 * (s + 1) / 20) >= 0.1875 for s in range(20))
    assert len(calls) == 20 - skipped
    assert torch.equal(ids[~unknown], tokens[~unknown]) and (ids < model.codebook_size).all()
    again = model.decode_iterative(tokens, unknown, torch.Generator().manual_seed(0), steps=20, temperature=6.0)
    assert torch.equal(ids, again)


def test_completion_blends_the_generated_region_as_testpaint():
    model = tiny().eval()
    images = torch.rand(2, 1, 16, 16)
    out = MAGE.complete(model, images, "inpaint", 0.5, seed=0)
    pixels, _ = MAGE._boxes(model, "inpaint", 0.5)
    blend = composite_mask(pixels, 16)
    assert blend.shape == (1, 1, 16, 16) and float(blend.max()) <= 1 and float(blend.min()) >= 0
    far = blend[0, 0] == 0
    torch.testing.assert_close(out[:, :, far], images[:, :, far])
    assert torch.equal(out, MAGE.complete(model, images, "inpaint", 0.5, seed=0))


# -- the unlearning step ----------------------------------------------------------------------


def _step(method="ours", forget_weight=0.3, batch=6, device="cpu"):
    model = tiny().to(device)
    cfg = UnlearnConfig(checkpoint="-", method=method, forget_weight=forget_weight).for_family(MAGE)
    module, loss_fn = unlearning_step(cfg, model, Dist(device=torch.device(device)))
    images = torch.rand(batch, 1, 16, 16, generator=torch.Generator().manual_seed(2)).to(device)
    is_forget = torch.tensor([True, False, False, True, False, True][:batch], device=device)
    return model, cfg, module, loss_fn, images, is_forget


def test_the_step_routes_tokens_and_scores_as_the_reference():
    """The reference: latent = student(x), guide = teacher(x), mis_guide = teacher(noise) under the
    same masks, L = (1/B) sum (1 + s) m + alpha (1/B) sum (1 - s) n over all 1 + K rows."""
    model, cfg, module, loss_fn, images, is_forget = _step()
    original = copy.deepcopy(model).eval()
    out = loss_fn((images, is_forget), torch.Generator().manual_seed(5), module)
    step = MAGE.draw(model, images, is_forget, torch.Generator().manual_seed(5), Dist(), cfg)
    assert torch.equal(step.tokens, model.tokenize(images))
    assert torch.equal(step.teacher_tokens[~is_forget], step.tokens[~is_forget])
    masks = step.masks
    latent = model.encode_tokens(step.tokens, masks.keep, masks.masked, step.dropout)
    with torch.no_grad():
        guide = original.encode_tokens(step.tokens, masks.keep, masks.masked)
        mis_guide = original.encode_tokens(step.teacher_tokens, masks.keep, masks.masked)
    sign = torch.where(is_forget, -1.0, 1.0)
    m, n = ((latent - guide) ** 2).mean((1, 2)), ((latent - mis_guide) ** 2).mean((1, 2))
    want = ((1 + sign) * m).mean() + 0.3 * ((1 - sign) * n).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-8)


def test_forget_rows_see_the_noise_images_tokens():
    model, cfg, module, loss_fn, images, is_forget = _step()
    gen = torch.Generator().manual_seed(5)
    step = MAGE.draw(model, images, is_forget, gen, Dist(), cfg)
    # the draw order: mask noise, the rate, dropout, then the noise images
    from fastforget.families.mae import noise_images
    from fastforget.families.mage import draw_masks
    replay = torch.Generator().manual_seed(5)
    draw_masks(model, images.shape[0], replay, Dist())
    noisy = noise_images(images, is_forget, replay, Dist(), "normal")
    assert torch.equal(step.teacher_tokens[is_forget], model.tokenize(noisy[is_forget]))


def test_the_teacher_holds_no_tokenizer_or_decoder_and_what_trains_is_the_encoder_path():
    model = tiny()
    teacher = MAGE.teacher(model, torch.device("cpu"), whole=False)
    assert isinstance(teacher.vqgan, torch.nn.Identity) and isinstance(teacher.mlm_layer, torch.nn.Identity)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert isinstance(model.vqgan, torch.nn.Module) and len(model.decoder_blocks) == 2
    MAGE.trainable(model, whole=False)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n, _ in model.named_parameters() if n.startswith(ENCODER)}
    MAGE.trainable(model, whole=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("vqgan.")} | {"pos_embed",
                                                                                          "decoder_pos_embed"}


@pytest.mark.parametrize("method", ["max-loss", "noisy-label"])
def test_token_baselines_are_the_references_ce_terms(method):
    model, cfg, module, loss_fn, images, is_forget = _step(method)
    gen = torch.Generator().manual_seed(4)
    out = loss_fn((images, is_forget), gen, module)
    replay = torch.Generator().manual_seed(4)
    step = MAGE.draw(model, images, is_forget, replay, Dist(), cfg)
    logits = module(step)[:, 1:, :model.codebook_size]  # the whole vocabulary's logits, then the codes
    mask, f = step.masks.all, is_forget.float()[:, None]
    if method == "noisy-label":
        ids = step.tokens.float()
        target = (torch.randn(ids.shape, generator=replay) * ids.std() + ids.mean()).clamp(0, model.codebook_size - 1)
        target = target.round().long()
    else:
        target = step.tokens
    retain = (label_smoothed_ce(logits, step.tokens) * mask * (1 - f)).sum() / mask.sum()
    forget = (label_smoothed_ce(logits, target) * mask * f).sum() / mask.sum()
    want = retain - 0.3 * forget if method == "max-loss" else retain + 0.3 * forget
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-7)


def test_retain_label_matches_the_originals_logits_of_a_retain_row():
    model, cfg, module, loss_fn, images, is_forget = _step("retain-label")
    original = copy.deepcopy(model).eval()
    out = loss_fn((images, is_forget), torch.Generator().manual_seed(4), module)
    step = MAGE.draw(model, images, is_forget, torch.Generator().manual_seed(4), Dist(), cfg)
    from fastforget.families.mage import full_logits
    with torch.no_grad():
        teacher_logits = full_logits(original, TokenStep(step.tokens, step.masks, None))
    retain_idx = (~is_forget).nonzero()[:, 0]
    targets = teacher_logits.clone()
    targets[is_forget] = teacher_logits[retain_idx[torch.arange(6)[is_forget] % len(retain_idx)]]
    student = module(step)
    per_row = ((student - targets) ** 2).mean((1, 2))
    sign = torch.where(is_forget, -1.0, 1.0)
    want = ((1 + sign) * per_row).mean() + 0.3 * ((1 - sign) * per_row).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-8)


@pytest.mark.gpu
def test_the_step_reads_the_host_once_for_the_forget_count():
    import warnings
    model, cfg, module, loss_fn, images, is_forget = _step(device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    loss_fn((images, is_forget), gen, module)["loss"].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_fn((images, is_forget), gen, module)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in caught if "synchroniz" in str(w.message)]) <= 1


# -- the trainer on mage_tiny -----------------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("mage_original")
    loop = dict(epochs=0.05, batch_size=32, lr=1e-3, progress=False)
    pretrain(PretrainConfig(model="mage_tiny", device="cpu", part="tokenizer", loop=LoopConfig(out=str(out / "tok"),
                                                                                           **loop)))
    pretrain(PretrainConfig(model="mage_tiny", device="cpu", init=str(out / "tok" / "checkpoint.pt"),
                            loop=LoopConfig(out=str(out), **loop)))
    return str(out / "checkpoint.pt")


def _unlearn(original, out, method="ours", device="cpu", **loop):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), device=device,
                        method=method, loop=LoopConfig(out=str(out), epochs=0.1, batch_size=16, lr=1e-3,
                                                       log_every=2, progress=False, **loop))
    return unlearn(cfg)


def _states(original, out):
    return (families.load(original).state_dict(), families.load(os.path.join(out, "checkpoint.pt")).state_dict())


def test_pretraining_in_parts_trains_the_tokenizer_then_the_model(original):
    tok = families.load(os.path.join(os.path.dirname(original), "tok", "checkpoint.pt")).state_dict()
    fresh = tiny().state_dict()
    model = families.load(original).state_dict()
    assert all(torch.equal(tok[k], model[k]) for k in tok if k.startswith("vqgan."))  # frozen in part two
    assert any(not torch.equal(tok[k], model[k]) for k in tok if k.startswith(ENCODER))
    assert any(not torch.equal(tok[k], fresh[k]) for k in tok if k.startswith("vqgan."))
    with pytest.raises(ValueError, match="part .* one of \\('tokenizer', 'model'\\)"):
        PretrainConfig(model="mage_tiny", part="decoder").for_family(MAGE)


def test_tokenizer_pretraining_repeats_bit_for_bit(tmp_path):
    """The VQ-VAE's codebook lookup once added its gradient with the CPU's atomics (codebook[ids]):
    two runs drifted apart from the tenth step."""
    runs = []
    for name in ("a", "b"):
        pretrain(PretrainConfig(model="mage_tiny", device="cpu", part="tokenizer", loop=LoopConfig(
            out=str(tmp_path / name), epochs=0.6, batch_size=64, lr=1e-3, progress=False)))
        runs.append(load_checkpoint(str(tmp_path / name / "checkpoint.pt"))["model"])
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())


def test_unlearning_trains_the_encoder_path_only(original, tmp_path):
    metrics = _unlearn(original, tmp_path)
    before, after = _states(original, tmp_path)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith(ENCODER), name
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert checkpoint["config"]["family"] == "mage" and checkpoint["config"]["model"] == "mage_tiny"
    assert {"loss", "retain_loss", "forget_loss"} <= set(metrics)


def test_the_recipe_is_the_references_by_default(original):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0",)).for_family(MAGE)
    loop = cfg.loop
    assert (loop.blr, loop.weight_decay, loop.betas, loop.schedule, loop.clip_grad) == \
        (1e-4, 0.05, (0.9, 0.95), "cosine", 3.0)
    assert loop.warmup_fraction == pytest.approx(5 / 6) and cfg.normalize == "reference" and cfg.forget_weight == 0.2
    with pytest.raises(ValueError, match="mask_ratio .* does not apply to the mage family"):
        UnlearnConfig(checkpoint=original, forget_classes=("0",), mask_ratio=0.5).for_family(MAGE)


@pytest.mark.parametrize("method", ["max-loss", "noisy-label", "retain-label", "random-encoder"])
def test_baselines_train_what_the_reference_trains(original, tmp_path, method):
    _unlearn(original, tmp_path, method=method)
    before, after = _states(original, tmp_path)
    moved = lambda prefix: any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))  # noqa: E731
    assert moved(("decoder_blocks.", "mlm_layer.")) == (method != "random-encoder")
    assert moved(ENCODER) and not moved("vqgan.")


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
    """torchrun, 2 CPU ranks with 8 images each = 1 process with 16: masks, rate, dropout and noise
    images are the global batch's rows (uniform noise: normal noise takes each rank's batch
    statistics, as each of the reference's GPUs does)."""
    (a, b), logs, _ = one_and_two_ranks(["unlearn", "--checkpoint", original, "--forget-classes", "0,1",
                                         "--retain-classes", "2,3", "--epochs", "0.15", "--lr", "1e-4", "--device",
                                         "cpu", "--log-every", "1", "--noise", "uniform"], 8, tmp_path)
    assert a["step"] == b["step"] >= 2
    for m1, m2 in zip(*logs):
        for key in ("loss", "retain_loss", "forget_loss", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), (m1["step"], key)
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=0, atol=2e-4 * a["step"], msg=name)


def test_eval_generates_for_both_tasks(original, tmp_path):
    from fastforget.eval.features import extractor
    from fastforget.eval.run import evaluate
    from fastforget.train.demo import demo_sets

    sets = {k: v.subset(torch.arange(20)) for k, v in demo_sets().items()}
    report = evaluate({"original": families.load(original)}, sets, extractor("digits"), None, 0.5, str(tmp_path),
                      sample_steps=4)
    assert set(report) == {"inpaint", "outpaint"} and report["outpaint"]["original"]["retain"]["fid"] > 0
    assert (tmp_path / "results.md").read_text().startswith("decoding: 4 MaskGIT steps, not the reference's 20")
