"""random_masking and masked_patch_embed on every backend against fastforget/ops/reference.py."""
import pytest
import torch

import fastforget
from fastforget.ops import backends, reference

from conftest import backend_params

BACKENDS = backend_params()


def mae_random_masking(x_len, batch, mask_ratio, noise):
    """facebookresearch/mae models_mae.py random_masking, verbatim but for x (only its shape is used)."""
    len_keep = int(x_len * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([batch, x_len])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


@pytest.mark.parametrize("batch,length,ratio", [(1, 4, 0.75), (3, 196, 0.75), (2, 49, 0.0), (5, 10, 0.8)])
def test_random_masking_is_mae(batch, length, ratio):
    noise = torch.rand(batch, length)
    got = fastforget.random_masking(batch, length, ratio, noise=noise)
    for a, b in zip(got, mae_random_masking(length, batch, ratio, noise)):
        assert torch.equal(a, b)
    ids_keep, ids_restore, mask = got
    assert ids_keep.dtype == ids_restore.dtype == torch.int64 and ids_keep.shape == (batch, int(length * (1 - ratio)))
    assert mask.sum(1).eq(length - ids_keep.shape[1]).all()


def test_random_masking_generator():
    a = fastforget.random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    b = fastforget.random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    (dict(mask_ratio=-0.1), r"mask_ratio must be in \[0, 1\)"),
    (dict(num_patches=3, mask_ratio=0.9), "keeps no patch"),
    (dict(noise=torch.rand(2, 5)), r"noise must be a float tensor of shape \(2, 16\)"),
    (dict(batch_size=0), "batch_size must be a positive int"),
])
def test_random_masking_bad_input(kwargs, match):
    args = {**dict(batch_size=2, num_patches=16, mask_ratio=0.5), **kwargs}
    with pytest.raises(ValueError, match=match):
        fastforget.random_masking(args.pop("batch_size"), args.pop("num_patches"), args.pop("mask_ratio"), **args)


def make(device, batch=3, channels=3, height=32, width=48, patch=16, dim=40, ratio=0.5, dtype=torch.float32,
         bias=True, cls=True, image_dtype=None):
    length = (height // patch) * (width // patch)
    images = torch.rand(batch, channels, height, width, device=device).to(image_dtype or dtype)
    params = dict(
        weight=torch.randn(dim, channels, patch, patch, device=device).div(patch * channels**0.5).to(dtype),
        bias=torch.randn(dim, device=device).to(dtype) if bias else None,
        pos_embed=torch.randn(1, 1 + length, dim, device=device).to(dtype),
        cls_token=torch.randn(1, 1, dim, device=device).to(dtype) if cls else None,
    )
    for p in params.values():
        if p is not None:
            p.requires_grad_()
    ids_keep = fastforget.random_masking(batch, length, ratio, device=device)[0]
    return images, ids_keep, params


def run(fn, images, ids_keep, params, grad_seed=0):
    out = fn(images, params["weight"], params["bias"], params["pos_embed"], ids_keep, params["cls_token"])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    live = [p for p in params.values() if p is not None]
    return out.detach(), torch.autograd.grad((out.float() * g.float()).sum(), live)


CASES = [
    dict(),
    dict(cls=False),
    dict(bias=False),
    dict(ratio=0.0),
    dict(batch=1, height=16, width=16, ratio=0.0),  # K = L = 1
    dict(height=48, width=32, patch=16, ratio=0.8),  # non-square, K = 1
    dict(channels=1, patch=8, height=24, width=40, dim=33),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "mae" for c in CASES])
def test_matches_reference_fp32(backend, device, case):
    images, ids_keep, params = make(device, **case)
    out, grads = run(lambda *a: fastforget.masked_patch_embed(*a, backend=backend), images, ids_keep, params)
    ref, ref_grads = run(reference.masked_patch_embed, images, ids_keep, params)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_flash_attention_rule(backend, device, dtype):
    images, ids_keep, params = make(device, dtype=dtype, image_dtype=torch.float32)
    params64 = {k: None if v is None else v.detach().double().requires_grad_() for k, v in params.items()}
    want, want_grads = run(reference.masked_patch_embed, images.double(), ids_keep, params64)
    got, grads = run(lambda *a: fastforget.masked_patch_embed(*a, backend=backend), images, ids_keep, params)
    low, low_grads = run(reference.masked_patch_embed, images, ids_keep, params)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    for a, lo, w in zip([got, *grads], [low, *low_grads], [want, *want_grads]):
        err, low_err = (a.double() - w).abs().max(), (lo.double() - w).abs().max()
        assert err <= 2 * low_err + eps * w.abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_images_and_int_masks(backend, device):
    images, ids_keep, params = make(device)
    images = images.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # channels-last-like strides
    out, _ = run(lambda *a: fastforget.masked_patch_embed(*a, backend=backend), images, ids_keep, params)
    ref, _ = run(reference.masked_patch_embed, images, ids_keep, params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_images_that_require_grad_fall_back_to_the_reference():
    images, ids_keep, params = make("cpu")
    images.requires_grad_()
    out = fastforget.masked_patch_embed(images, params["weight"], params["bias"], params["pos_embed"], ids_keep,
                                        params["cls_token"])
    grad, = torch.autograd.grad(out.sum(), images)
    assert grad.abs().sum() > 0
    with pytest.raises(backends.BackendUnavailable, match="cpu: images require grad"):
        fastforget.masked_patch_embed(images, params["weight"], params["bias"], params["pos_embed"], ids_keep,
                                      backend="cpu")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "torch"])  # the kernels
def test_position_gradient_is_deterministic_on_repeated_patches(backend, device):
    """Rows that keep the same patches add into the same position rows: in a fixed order, not by atomics."""
    images, _, params = make(device, ratio=0.0)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]], device=device)
    grads = [run(lambda *a: fastforget.masked_patch_embed(*a, backend=backend), images, ids, params)[1][2]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    images, ids_keep, params = make(device, batch=2, height=16, width=32, dim=16)
    for cls in (params["cls_token"], None):
        torch.library.opcheck(torch.ops.fastforget.masked_patch_embed.default,
                              (images, params["weight"], params["bias"], params["pos_embed"], ids_keep, cls, backend))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_torch_compile_fullgraph(backend, device):
    module = fastforget.nn.MaskedPatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=24,
                                            backend=backend).to(device)
    pos = torch.randn(1, 1 + module.num_patches, 24, device=device)
    cls = torch.randn(1, 1, 24, device=device)
    images = torch.rand(2, 3, 32, 48, device=device)
    ids = fastforget.random_masking(2, module.num_patches, 0.5, device=device)[0]
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(images, ids, pos, cls)
    got_grad, = torch.autograd.grad(got.sum(), module.proj.weight)
    want = module(images, ids, pos, cls)
    want_grad, = torch.autograd.grad(want.sum(), module.proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_module_loads_timm_patch_embed_keys():
    module = fastforget.nn.MaskedPatchEmbed(img_size=32, patch_size=16, in_chans=3, embed_dim=8)
    assert sorted(module.state_dict()) == ["proj.bias", "proj.weight"]
    assert module.num_patches == 4 and module.grid_size == (2, 2)


def _good():
    images, ids_keep, params = make("cpu")
    return dict(images=images, ids_keep=ids_keep, **{k: v.detach() if v is not None else None for k, v in params.items()})


BAD = [
    (dict(images=torch.rand(3, 32, 48)), ValueError, r"images must be \(B, C, H, W\)"),
    (dict(images=torch.rand(3, 3, 30, 48)), ValueError, "multiples of the patch size 16"),
    (dict(weight=torch.rand(40, 2, 16, 16)), ValueError, r"weight must be \(D, C, p, p\) with D, p >= 1 and C = 3"),
    (dict(weight=torch.rand(40, 3, 0, 0)), ValueError, r"weight must be \(D, C, p, p\) with D, p >= 1"),
    (dict(weight=torch.rand(0, 3, 16, 16)), ValueError, r"weight must be \(D, C, p, p\) with D, p >= 1"),
    (dict(bias=torch.rand(41)), ValueError, r"bias must have shape \(40,\)"),
    (dict(pos_embed=torch.rand(1, 6, 40)), ValueError, r"pos_embed must have shape \(1, 7, 40\)"),
    (dict(cls_token=torch.rand(1, 1, 40, dtype=torch.float16)), TypeError, "cls_token must have weight's dtype"),
    (dict(ids_keep=torch.tensor([[0, 1], [1, 6], [2, 3]])), ValueError, r"ids_keep must lie in \[0, 6\)"),
    (dict(ids_keep=torch.tensor([[0, 1], [1, 2]])), ValueError, r"ids_keep must be int64 \(B=3"),
    (dict(ids_keep=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "ids_keep must be int64"),
    (dict(weight=torch.rand(40, 3, 16, 16, device="meta")), ValueError, "weight must be on images' device"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        fastforget.masked_patch_embed(**args)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bias,cls", [(True, True), (False, True), (True, False), (False, False)])
def test_inference_mode_and_optional_parameters(backend, device, bias, cls):
    """The C++ autograd counts only the tensors given (bias and cls are optional); inference_mode
    skips autograd altogether."""
    images, ids_keep, params = make(device, bias=bias, cls=cls)
    out, grads = run(lambda *a: fastforget.masked_patch_embed(*a, backend=backend), images, ids_keep, params)
    ref, ref_grads = run(reference.masked_patch_embed, images, ids_keep, params)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        plain = fastforget.masked_patch_embed(images, params["weight"], params["bias"], params["pos_embed"], ids_keep,
                                              params["cls_token"], backend=backend)
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
