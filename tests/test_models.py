"""The MAE model: facebookresearch/mae's keys and semantics, on fastforget's ops."""
import pytest
import torch

from fastforget.models import CONFIGS, create_mae, load_mae
from fastforget.ops import reference

# models_mae.MaskedAutoencoderViT's state-dict keys for one encoder and one decoder block.
OFFICIAL_KEYS = {
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
    "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
} | {f"{stack}.0.{part}" for stack in ("blocks", "decoder_blocks") for part in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}


def small(**kw):
    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=16,
                decoder_depth=1, decoder_num_heads=2, mlp_ratio=2)
    return create_mae("mae_vit_base_patch16", **{**args, **kw})


def test_state_dict_keys_are_the_official_ones():
    assert set(small().state_dict()) == OFFICIAL_KEYS


def test_named_configs_are_the_official_ones():
    assert CONFIGS["mae_vit_large_patch16"]["embed_dim"] == 1024 and CONFIGS["mae_vit_large_patch16"]["depth"] == 24
    assert CONFIGS["mae_vit_huge_patch14"]["patch_size"] == 14 and CONFIGS["mae_vit_huge_patch14"]["embed_dim"] == 1280
    base = create_mae("mae_vit_base_patch16")
    # ViT-B/16 without its head has 85,798,656 parameters; the fixed position embedding does not train.
    assert sum(p.numel() for p in base.encoder_parameters()) == 85_798_656 - 197 * 768
    with pytest.raises(ValueError, match="unknown model 'vit'; expected one of"):
        create_mae("vit")


def test_constructor_defaults_are_upstreams_and_named_configs_pass_its_eps():
    """models_mae.MaskedAutoencoderViT(**kwargs) without norm_layer uses nn.LayerNorm (eps 1e-5); its
    named configs (mae_vit_*) pass eps 1e-6. Code ported from it gets the same model here."""
    from fastforget.models import MaskedAutoencoderViT

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=16,
                decoder_depth=1, decoder_num_heads=2)
    assert {m.eps for m in MaskedAutoencoderViT(**args).modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    for name in CONFIGS:
        model = create_mae(name, **args) if name != "mae_vit_tiny" else create_mae(name)
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}, name


def test_patchify_is_mae_order_and_unpatchify_inverts_it():
    model = small()
    imgs = torch.rand(2, 3, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(x[0, 1], imgs[0, :, :8, 8:16].permute(1, 2, 0).reshape(-1))  # (p, q, c)
    torch.testing.assert_close(model.unpatchify(x), imgs)


def test_encoder_is_mae_path_with_normalisation_folded_in():
    model = small().eval()
    imgs = torch.rand(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    ids_keep, want_restore, want_mask = reference.random_masking(noise, 0.75)
    assert torch.equal(mask, want_mask) and torch.equal(ids_restore, want_restore)
    # MAE's own path on explicitly normalised images: conv, + pos, gather, cls, blocks, norm.
    x = reference.masked_patch_embed(model.normalize(imgs), model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                                     model.pos_embed, ids_keep, model.cls_token)
    for blk in model.blocks:
        x = blk(x)
    torch.testing.assert_close(latent, model.norm(x), rtol=1e-4, atol=1e-5)


def test_forward_loss_and_decoder_shapes():
    model = small()
    loss, pred, mask = model(torch.rand(2, 3, 32, 32), mask_ratio=0.5)
    assert loss.shape == () and pred.shape == (2, 16, 192) and mask.sum() == 16
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_load_mae_strict_and_by_name(tmp_path):
    model = create_mae("mae_vit_tiny")
    official = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, official)  # official files record no config
    loaded = load_mae(str(official), "mae_vit_tiny")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="does not record its model config"):
        load_mae(str(official))
    state = model.state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \['extra.weight'\]"):
        load_mae(str(broken), "mae_vit_tiny")


def test_an_encoder_only_checkpoint_is_named_as_such(tmp_path):
    """MAE's mae_pretrain_vit_*.pth files hold the encoder alone: the error says which file to use."""
    state = {k: v for k, v in create_mae("mae_vit_tiny").state_dict().items()
             if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"encoder alone .* mae_visualize_vit_\*\.pth"):
        load_mae(str(path), "mae_vit_tiny")
