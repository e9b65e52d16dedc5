"""The diffusion family's ops on every backend against fastforget/ops/reference.py:
group_norm_silu (forward and every gradient), make_diffusion_inputs (Palette's routing), and
unlearn_loss over lists of feature maps with Palette's normalisation."""
import pytest
import torch
from torch.nn import functional as F

import fastforget
from fastforget.ops import backends, group_norm_silu, make_diffusion_inputs, reference
from fastforget.ops.teacher_batch import noise_stream

from conftest import backend_params

BACKENDS = backend_params()
KERNELS = [p for p in BACKENDS if p.values[0] != "torch"]


# -- group_norm_silu ---------------------------------------------------------------------------

SHAPES = [(3, 16, 5, 7, 4), (2, 64, 16, 16, 8), (1, 8, 3, 3, 8), (4, 32, 1, 33, 32), (2, 12, 4, 4, 1)]


def gn_inputs(shape, device, dtype=torch.float32, film=True, affine=True, offset=0.0):
    batch, channels, height, width, _ = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(batch, channels, height, width, generator=g) * 2 + offset).to(device, dtype)
    params = dict(weight=torch.randn(channels, generator=g) if affine else None,
                  bias=torch.randn(channels, generator=g) if affine else None,
                  scale=torch.randn(batch, channels, generator=g) * 0.5 if film else None,
                  shift=torch.randn(batch, channels, generator=g) if film else None)
    params = {k: None if v is None else v.to(device, dtype) for k, v in params.items()}
    return x, params


def gn_run(fn, x, params, groups, silu=True):
    inputs = [t.detach().requires_grad_() for t in [x] + [p for p in params.values() if p is not None]]
    it = iter(inputs[1:])
    given = {k: None if v is None else next(it) for k, v in params.items()}
    y = fn(inputs[0], given["weight"], given["bias"], groups, scale=given["scale"], shift=given["shift"], silu=silu)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    return y.detach(), torch.autograd.grad((y.float() * g.float()).sum(), inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("film,affine,silu", [(True, True, True), (False, True, True), (False, True, False),
                                              (True, False, True)])
def test_group_norm_silu_matches_the_reference(backend, device, shape, film, affine, silu):
    x, params = gn_inputs(shape, device, film=film, affine=affine, offset=3.0)  # a mean far from 0
    groups = shape[-1]
    got, grads = gn_run(lambda *a, **k: group_norm_silu(*a, **k, backend=backend), x, params, groups, silu)
    if shape[2] * shape[3] * shape[1] // groups == 1:  # one value per group: F.group_norm refuses; x_hat is 0
        assert torch.isfinite(got).all()
        return
    want, want_grads = gn_run(reference.group_norm_silu, x, params, groups, silu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_silu_low_precision_flash_attention_rule(backend, device, dtype):
    """Against float64, at most twice the error of the reference model's own low-precision path
    (GroupNorm32, then scale-shift and SiLU in the input's dtype), plus an ulp of the largest value."""
    x, params = gn_inputs((2, 32, 8, 8, 8), device, dtype=dtype)
    got, grads = gn_run(lambda *a, **k: group_norm_silu(*a, **k, backend=backend), x, params, 8)
    want, want_grads = gn_run(reference.group_norm_silu, x.double(), {k: v.double() for k, v in params.items()}, 8)
    low, low_grads = gn_run(lambda *a, **k: reference.group_norm_silu(*a, **k, upcast=False), x, params, 8)
    eps = torch.finfo(dtype).eps
    for a, lo, w in zip([got, *grads], [low, *low_grads], [want, *want_grads]):
        err, low_err = (a.double() - w).abs().max(), (lo.double() - w).abs().max()
        assert err <= 2 * low_err + eps * w.abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_norm_silu_takes_any_strides_and_inference_mode(backend, device):
    x, params = gn_inputs((2, 16, 6, 6, 4), device)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # channels-last-like strides
    got = group_norm_silu(strided, params["weight"], params["bias"], 4, scale=params["scale"], shift=params["shift"],
                          backend=backend)
    want = reference.group_norm_silu(x, params["weight"], params["bias"], 4, scale=params["scale"],
                                     shift=params["shift"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        plain = group_norm_silu(x, params["weight"], params["bias"], 4, scale=params["scale"], shift=params["shift"],
                                backend=backend)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 32, 5, 7, 8), (2, 48, 4, 4, 3), (2, 20, 3, 5, 4)],
                         ids=lambda s: "x".join(map(str, s)))  # channels: two vectors, three, one and a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_silu_keeps_channels_last(backend, device, shape, dtype):
    """channels_last in, channels_last out, the same values and gradients (the CPU kernel reads the
    layout as it is: an image per task)."""
    x, params = gn_inputs(shape, device, dtype=dtype, offset=2.0)
    groups = shape[-1]
    last = x.contiguous(memory_format=torch.channels_last)
    got, grads = gn_run(lambda *a, **k: group_norm_silu(*a, **k, backend=backend), last, params, groups)
    want, want_grads = gn_run(lambda *a, **k: group_norm_silu(*a, **k, backend=backend), x, params, groups)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    assert grads[0].shape == x.shape
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * max(1.0, float(b.abs().max())))
    reference_out = reference.group_norm_silu(x, params["weight"], params["bias"], groups, scale=params["scale"],
                                              shift=params["shift"])
    torch.testing.assert_close(got.float(), reference_out.float(), **tol)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_silu_cpu_is_bitwise_deterministic_across_threads(layout):
    x, params = gn_inputs((4, 32, 16, 16, 8), "cpu")
    x = x.contiguous(memory_format=layout)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, 1):
            torch.set_num_threads(n)
            runs.append(gn_run(lambda *a, **k: group_norm_silu(*a, **k, backend="cpu"), x, params, 8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_norm_silu_opcheck(backend, device):
    x, params = gn_inputs((2, 8, 3, 3, 4), device)
    for p in (params, {**params, "scale": None, "shift": None}, dict(weight=None, bias=None, scale=None, shift=None)):
        args = [t if t is None else t.requires_grad_() for t in (p["weight"], p["bias"], p["scale"], p["shift"])]
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.library.opcheck(torch.ops.fastforget.group_norm_silu.default,
                                  (x.contiguous(memory_format=layout).requires_grad_(), *args, 4, 1e-5, True, backend))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_group_norm_silu_torch_compile_fullgraph(backend, device):
    x, params = gn_inputs((2, 8, 3, 3, 4), device)
    w = params["weight"].requires_grad_()

    def fn(x, w):
        return group_norm_silu(x, w, params["bias"], 4, scale=params["scale"], shift=params["shift"],
                               backend=backend).sum()

    got = torch.compile(fn, fullgraph=True)(x, w)
    torch.testing.assert_close(got, fn(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(torch.compile(fn, fullgraph=True)(x, w), w)[0],
                               torch.autograd.grad(fn(x, w), w)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.ones(2, 6, 3)), ValueError, "C a multiple of groups 4"),
    (dict(x=torch.ones(2, 8, 3, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\)"),
    (dict(scale=torch.ones(8)), ValueError, r"scale must have shape \(2, 8\)"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(shift="no"), TypeError, "shift must be a torch.Tensor or None"),
])
def test_group_norm_silu_bad_input(change, error, match):
    args = dict(x=torch.ones(2, 8, 3), weight=None, bias=None, groups=4)
    args.update(change)
    with pytest.raises(error, match=match):
        group_norm_silu(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("groups"), **args)


# -- make_diffusion_inputs ---------------------------------------------------------------------


def diffusion_inputs(device, batch=5, channels=3, size=8, cond=None, mask_channels=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch * size)
    y_0 = (torch.rand(batch, channels, size, size, generator=g) * 2 - 1).to(device, dtype)
    y_cond = torch.randn(batch, cond or channels, size, size, generator=g).to(device, dtype)
    mask = (torch.rand(batch, mask_channels, size, size, generator=g) > 0.5).to(device)
    gammas = torch.rand(batch, generator=g).to(device)
    is_forget = (torch.arange(batch) % 2 == 0).to(device)
    return y_0, y_cond, mask, gammas, is_forget


def expected_inputs(y_0, y_cond, mask, gammas, is_forget, device, seed=5, first=0, noise=None):
    if noise is None:
        s, f = noise_stream(torch.device(device), torch.Generator(device=device).manual_seed(seed), first)
        noise = reference.teacher_noise(y_0.numel(), "normal", s, y_0.device, f).view(y_0.shape)
    return reference.make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("mask_channels,cond", [(1, None), (3, None), (1, 2)])
@pytest.mark.parametrize("given", [True, False])
def test_diffusion_inputs_match_the_reference(backend, device, mask_channels, cond, given):
    args = diffusion_inputs(device, cond=cond, mask_channels=mask_channels)
    noise = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(2)).to(device) if given else None
    got = make_diffusion_inputs(*args, noise=noise, generator=torch.Generator(device=device).manual_seed(5),
                                backend=backend)
    want = expected_inputs(*args, device, noise=noise)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_diffusion_inputs_route_as_palettes_q_sample_with_labels(backend, device):
    """Palette's Network.forward: retain rows' teacher input is the student's; a forget row's differs
    only in its hole of the noisy channels, where it is the very noise the student's x_t is made of;
    the condition channels and the known pixels are y_cond and y_0 for both."""
    y_0, y_cond, mask, gammas, is_forget = diffusion_inputs(device)
    noise = torch.randn(y_0.shape, generator=torch.Generator().manual_seed(3)).to(device)
    student, teacher = make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, noise=noise, backend=backend)
    c = y_cond.shape[1]
    assert torch.equal(student[:, :c], y_cond) and torch.equal(teacher[:, :c], y_cond)
    assert torch.equal(student[~is_forget], teacher[~is_forget])
    hole = mask.expand_as(y_0)
    assert torch.equal(student[:, c:][~hole], y_0[~hole]) and torch.equal(teacher[:, c:][~hole], y_0[~hole])
    forget_hole = hole & is_forget[:, None, None, None]
    assert torch.equal(teacher[:, c:][forget_hole], noise[forget_hole])
    g = gammas[:, None, None, None]
    torch.testing.assert_close(student[:, c:][hole], (g.sqrt() * y_0 + (1 - g).sqrt() * noise)[hole],
                               rtol=1e-6, atol=1e-6)


def test_diffusion_inputs_shards_draw_the_global_batchs_noise():
    """Two ranks passing first_row = rank * 3 get the rows one process gets for the whole batch."""
    y_0, y_cond, mask, gammas, is_forget = diffusion_inputs("cpu", batch=6)
    whole = make_diffusion_inputs(y_0, y_cond, mask, gammas, is_forget, generator=torch.Generator().manual_seed(9))
    for rank in (0, 1):
        rows = slice(3 * rank, 3 * rank + 3)
        part = make_diffusion_inputs(y_0[rows], y_cond[rows], mask[rows], gammas[rows], is_forget[rows],
                                     generator=torch.Generator().manual_seed(9), first_row=3 * rank)
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b[rows], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_diffusion_inputs_opcheck(backend, device):
    y_0, y_cond, mask, gammas, is_forget = diffusion_inputs(device, batch=3, size=4)
    stream = torch.tensor([11, 0], device=device)
    for given, noise in ((False, y_0.new_empty(0)), (True, torch.randn_like(y_0))):
        torch.library.opcheck(torch.ops.fastforget.make_diffusion_inputs.default,
                              (y_0, y_cond, mask.to(torch.uint8), gammas, is_forget.to(torch.uint8), noise, stream,
                               given, backend))


@pytest.mark.parametrize("change,match", [
    (dict(y_cond=torch.ones(2, 3, 5, 4)), r"y_cond must be \(2, C_cond >= 1, 4, 4\)"),
    (dict(mask=torch.ones(2, 2, 4, 4)), r"mask must be \(2, 1 or 3, 4, 4\)"),
    (dict(gammas=torch.ones(3)), r"gammas must have shape \(2,\)"),
    (dict(noise=torch.ones(2, 3, 4, 5)), "noise must have y_0's shape"),
    (dict(first_row=-2), "first_row must be a non-negative int"),
    (dict(is_forget=torch.ones(2)), "is_forget must be bool or 0/1 integers"),
])
def test_diffusion_inputs_bad_input(change, match):
    args = dict(y_0=torch.zeros(2, 3, 4, 4), y_cond=torch.zeros(2, 3, 4, 4), mask=torch.ones(2, 1, 4, 4),
                gammas=torch.ones(2), is_forget=torch.tensor([1, 0]))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        make_diffusion_inputs(args.pop("y_0"), args.pop("y_cond"), args.pop("mask"), args.pop("gammas"),
                              args.pop("is_forget"), **args)


# -- unlearn_loss over lists -------------------------------------------------------------------

FEATURE_SHAPES = [(4, 3, 3), (8, 2, 2), (5,), (16, 4, 4)]


def feature_lists(device, batch=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    make = lambda s: torch.randn(batch, *s, generator=g).to(device, dtype)  # noqa: E731
    students = [make(s).requires_grad_() for s in FEATURE_SHAPES]
    return students, [make(s) for s in FEATURE_SHAPES], [make(s) for s in FEATURE_SHAPES], \
        torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool, device=device)


def reference_sum(students, retains, forgets, is_forget, normalize, forget_weight):
    outs = [reference.unlearn_loss(s, r, f, is_forget, 1.0, forget_weight, normalize if normalize != "batch"
                                   else "reference") for s, r, f in zip(students, retains, forgets)]
    scale = 0.5 if normalize == "batch" else 1.0  # "batch" is 1/B where "reference" is 2/B
    return [scale * sum(o[k] for o in outs) for k in range(3)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("normalize", ["set", "reference", "batch"])
def test_unlearn_loss_over_lists_is_the_sum_of_each_tensors(backend, device, normalize):
    students, retains, forgets, is_forget = feature_lists(device)
    out = fastforget.unlearn_loss(students, retains, forgets, is_forget, forget_weight=0.3, normalize=normalize,
                                  backend=backend)
    want = reference_sum(students, retains, forgets, is_forget, normalize, 0.3)
    for got, w in zip(out, want):
        torch.testing.assert_close(got, w.float(), rtol=1e-5, atol=1e-6)
    weights = (1.0, 0.4, -0.7)  # gradients through every output at once
    got = torch.autograd.grad(sum(w * o for w, o in zip(weights, out)), students)
    wanted = torch.autograd.grad(sum(w * o for w, o in zip(weights, want)), students)
    for a, b in zip(got, wanted):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_batch_normalisation_is_palettes_weighted_mse_loss(backend, device):
    """Palette's loss, as its Network writes it: for each feature, F.mse_loss of the tensors masked
    to retain rows plus alpha times that of forget rows against the forget target; summed."""
    students, retains, forgets, is_forget = feature_lists(device)
    labels = torch.where(is_forget, -1.0, 1.0)  # the reference's +1 retain, -1 forget

    def rows(t, w):
        return t * w.view(-1, *([1] * (t.dim() - 1)))

    r, f = (labels + 1) * 0.5, (1 - labels) * 0.5
    want = sum(F.mse_loss(rows(s, r), rows(t, r)) + 0.1 * F.mse_loss(rows(s, f), rows(u, f))
               for s, t, u in zip(students, retains, forgets))
    got = fastforget.unlearn_loss(students, retains, forgets, is_forget, forget_weight=0.1, normalize="batch",
                                  backend=backend).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for a, b in zip(torch.autograd.grad(got, students), torch.autograd.grad(want, students)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unlearn_loss_lists_in_bfloat16(backend, device):
    students, retains, forgets, is_forget = feature_lists(device, dtype=torch.bfloat16)
    out = fastforget.unlearn_loss(students, retains, forgets, is_forget, normalize="batch", backend=backend)
    want = reference_sum(students, retains, forgets, is_forget, "batch", 0.2)
    torch.testing.assert_close(out.loss, want[0].float(), rtol=2e-3, atol=1e-5)


def test_unlearn_loss_list_bad_input():
    s = [torch.ones(2, 3), torch.ones(2, 4)]
    with pytest.raises(ValueError, match="retain_target must be a sequence of 2 tensors"):
        fastforget.unlearn_loss(s, s[:1], s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="student's tensors must share the batch size"):
        fastforget.unlearn_loss([torch.ones(2, 3), torch.ones(3, 3)], s, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"forget_target must have student's shape \(2, 4\)"):
        fastforget.unlearn_loss(s, s, [s[0], s[0]], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-empty sequence"):
        fastforget.unlearn_loss([], [], [], torch.tensor([0, 1]))


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_kernels_refuse_mixed_dtypes_with_the_reason(name, monkeypatch):
    monkeypatch.setattr(backends, "standing_reasons", lambda n, d: [])
    s = [torch.ones(2, 3, requires_grad=True), torch.ones(2, 4, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(backends.BackendUnavailable, match=f"{name}: the {name} kernel takes tensors of one dtype"):
        fastforget.unlearn_loss(s, s, s, torch.tensor([0, 1]), backend=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_diffusion_inputs_take_any_nonzero_mask_value_as_the_hole(backend, device):
    """A uint8 mask of 255s is the same hole as one of 1s, on every backend (the torch one included)."""
    y_0, y_cond, mask, gammas, is_forget = diffusion_inputs(device)
    noise = torch.randn(y_0.shape, generator=torch.Generator().manual_seed(3)).to(device)
    ones = make_diffusion_inputs(y_0, y_cond, mask.to(torch.uint8), gammas, is_forget, noise=noise, backend=backend)
    full = make_diffusion_inputs(y_0, y_cond, mask.to(torch.uint8) * 255, gammas, is_forget, noise=noise,
                                 backend=backend)
    for a, b in zip(ones, full):
        assert torch.equal(a, b)
