"""Property tests (hypothesis): random shapes, dtypes, strides, masks and flags for every op.

Every backend that runs here agrees with fastforget/ops/reference.py; every invalid combination is
a ValueError or TypeError naming the argument and what it got, never a crash in native code; NaN
and Inf propagate as the reference propagates them. Examples are derandomised: CI sees the same
cases every run (and a failure prints the one to reproduce).
"""
import math

import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fastforget
from fastforget.ops import reference
from fastforget.ops.teacher_batch import noise_stream

from conftest import backend_params

CPU_BACKENDS = [p.values[0] for p in backend_params() if p.values[1] == "cpu"]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "sliced"]


def examples(backend: str) -> int:
    return 10 if backend == "triton" else 40  # the Triton interpreter is slow


def run_settings(backend: str):
    return settings(max_examples=examples(backend), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def strided(shape, dtype, layout, gen):
    """A tensor of shape with the given memory layout: contiguous, last two dims transposed, or
    every other element of a wider tensor."""
    if layout == "transposed" and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return torch.randn(swapped, generator=gen).to(dtype).transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    return torch.randn(shape, generator=gen).to(dtype)


def assert_names(err: Exception, name: str) -> None:
    """The message is about name (it starts with it) and says what it got."""
    message = str(err)
    assert message.startswith(name) and "got" in message, message


# -- unlearn_loss ------------------------------------------------------------------------------

@st.composite
def loss_cases(draw):
    batch = draw(st.integers(1, 6))
    shape = (batch, *draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    return dict(
        shape=shape,
        dtypes=[draw(st.sampled_from(FLOATS)) for _ in range(3)],
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        flags=draw(st.lists(st.booleans(), min_size=batch, max_size=batch)),
        flag_dtype=draw(st.sampled_from([torch.bool, torch.uint8, torch.int64])),
        normalize=draw(st.sampled_from(["set", "reference"])),
        weights=(draw(st.floats(0, 2)), draw(st.floats(0, 2))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def loss_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    student, retain, forget = (strided(case["shape"], d, lay, gen) for d, lay in zip(case["dtypes"], case["layouts"]))
    return student, retain, forget, torch.tensor(case["flags"]).to(case["flag_dtype"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_matches_the_reference(backend):
    @run_settings(backend)
    @given(case=loss_cases())
    def check(case):
        student, retain, forget, is_forget = loss_inputs(case)
        kwargs = dict(retain_weight=case["weights"][0], forget_weight=case["weights"][1], normalize=case["normalize"])
        ours_in = student.detach().clone().requires_grad_()
        ref_in = student.detach().clone().requires_grad_()
        ours = fastforget.unlearn_loss(ours_in, retain, forget, is_forget, backend=backend, **kwargs)
        want = reference.unlearn_loss(ref_in, retain, forget, is_forget, *case["weights"], case["normalize"])
        for got, exp in zip(ours, want):
            torch.testing.assert_close(got, exp, rtol=2e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(ours.loss, ours_in)
        (grad_ref,) = torch.autograd.grad(want[0], ref_in)
        assert grad.dtype == student.dtype and grad.shape == student.shape
        tol = 2 * torch.finfo(student.dtype).eps
        torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=tol, atol=1e-6)
    check()


def _loss_mutations(shape):
    batch = shape[0]
    wrong = (batch, *shape[1:-1], shape[-1] + 1)
    return [
        ("student", TypeError, dict(student=torch.ones(shape, dtype=torch.int32))),
        ("student", TypeError, dict(student=[[1.0]])),
        ("student", ValueError, dict(student=torch.ones(batch))),
        ("retain_target", ValueError, dict(retain_target=torch.ones(wrong))),
        ("forget_target", ValueError, dict(forget_target=torch.ones(wrong))),
        ("forget_target", TypeError, dict(forget_target=torch.ones(shape, dtype=torch.float64))),
        ("is_forget", TypeError, dict(is_forget=torch.ones(batch))),
        ("is_forget", ValueError, dict(is_forget=torch.ones(batch + 1, dtype=torch.bool))),
        ("retain_weight", TypeError, dict(retain_weight=float("nan"))),
        ("forget_weight", TypeError, dict(forget_weight="0.2")),
        ("normalize", ValueError, dict(normalize="mean")),
        ("backend", ValueError, dict(backend="fortran")),
    ]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=loss_cases(), pick=st.integers(0, 11))
def test_loss_refuses_invalid_input_by_name(case, pick):
    student, retain, forget, is_forget = loss_inputs(case)
    name, error, change = _loss_mutations(case["shape"])[pick]
    args = dict(student=student, retain_target=retain, forget_target=forget, is_forget=is_forget)
    args.update(change)
    with pytest.raises(error) as info:
        fastforget.unlearn_loss(**args)
    assert_names(info.value, name)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("where", ["student", "retain_target", "forget_target"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loss_propagates_nan_and_inf_as_the_reference(backend, device, where, value):
    student, retain, forget = (torch.randn(4, 3, 5, device=device) for _ in range(3))
    is_forget = torch.tensor([True, False, True, False], device=device)
    {"student": student, "retain_target": retain, "forget_target": forget}[where][1, 2, 3] = value
    ours_in, ref_in = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours = fastforget.unlearn_loss(ours_in, retain, forget, is_forget, backend=backend)
    want = reference.unlearn_loss(ref_in, retain, forget, is_forget)
    for got, exp in zip(ours, want):
        torch.testing.assert_close(got, exp, equal_nan=True)
    torch.testing.assert_close(torch.autograd.grad(ours.loss, ours_in)[0], torch.autograd.grad(want[0], ref_in)[0],
                               equal_nan=True)


# -- masked_patch_embed ------------------------------------------------------------------------

@st.composite
def patch_cases(draw, low_precision: bool):
    patch = draw(st.integers(1, 4))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    length = grid[0] * grid[1]
    batch = draw(st.integers(1, 3))
    return dict(
        batch=batch, channels=draw(st.integers(1, 3)), patch=patch, grid=grid, dim=draw(st.integers(1, 12)),
        kept=draw(st.integers(1, length)), cls=draw(st.booleans()), bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(FLOATS if low_precision else [torch.float32])),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def patch_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, c, p, (gh, gw), d = case["batch"], case["channels"], case["patch"], case["grid"], case["dim"]
    images = torch.rand(b, c, gh * p, 2 * gw * p, generator=gen)
    images = images[..., ::2] if case["layout"] == "sliced" else images[..., :gw * p].contiguous()
    if case["layout"] == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = case["dtype"]
    weight = (torch.randn(d, c, p, p, generator=gen) * 0.3).to(dtype).requires_grad_()
    bias = (torch.randn(d, generator=gen) * 0.1).to(dtype).requires_grad_() if case["bias"] else None
    pos = (torch.randn(1, 1 + gh * gw, d, generator=gen) * 0.1).to(dtype).requires_grad_()
    cls = (torch.randn(1, 1, d, generator=gen) * 0.1).to(dtype).requires_grad_() if case["cls"] else None
    ids_keep = torch.argsort(torch.rand(b, gh * gw, generator=gen), dim=1)[:, :case["kept"]]
    return images, weight, bias, pos, ids_keep, cls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patch_embed_matches_the_reference(backend):
    @run_settings(backend)
    @given(case=patch_cases(low_precision=True))
    def check(case):
        images, weight, bias, pos, ids_keep, cls = patch_inputs(case)
        params = [t for t in (weight, bias, pos, cls) if t is not None]
        got = fastforget.masked_patch_embed(images, weight, bias, pos, ids_keep, cls, backend=backend)
        want = reference.masked_patch_embed(images, weight, bias, pos, ids_keep, cls)
        assert got.shape == want.shape and got.dtype == weight.dtype
        tol = 1e-4 if case["dtype"] == torch.float32 else 4 * torch.finfo(case["dtype"]).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(got.dtype)
        for g, r in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(want, params, upstream)):
            scale = max(1.0, float(r.float().abs().max()))
            torch.testing.assert_close(g.float(), r.float(), rtol=tol, atol=tol * scale)
    check()


def _patch_mutations(case, images, weight, bias, pos, ids_keep, cls):
    d, c, p = weight.shape[0], weight.shape[1], weight.shape[-1]
    return [
        ("images", dict(images=images[0])),
        ("images", dict(images=images.to(torch.int32))),
        ("weight", dict(weight=torch.ones(d, c + 1, p, p))),
        ("images' height and width", dict(images=torch.rand(images.shape[0], c, images.shape[2] + 1, images.shape[3])))
        if p > 1 else ("weight", dict(weight=torch.ones(d, c, p, p + 1))),
        ("pos_embed", dict(pos_embed=torch.ones(1, pos.shape[1] + 1, d))),
        ("bias", dict(bias=torch.ones(d + 1))),
        ("cls_token", dict(cls_token=torch.ones(1, 2, d))),
        ("ids_keep", dict(ids_keep=ids_keep.to(torch.int32))),
        ("ids_keep", dict(ids_keep=ids_keep + pos.shape[1])),
        ("ids_keep", dict(ids_keep=ids_keep[:1].repeat(images.shape[0] + 1, 1))),
        ("bias", dict(bias=torch.ones(d, dtype=torch.float16))),
    ]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=patch_cases(low_precision=False), pick=st.integers(0, 10))
def test_patch_embed_refuses_invalid_input_by_name(case, pick):
    images, weight, bias, pos, ids_keep, cls = patch_inputs(case)
    name, change = _patch_mutations(case, images, weight, bias, pos, ids_keep, cls)[pick]
    args = dict(images=images, weight=weight, bias=bias, pos_embed=pos, ids_keep=ids_keep, cls_token=cls)
    args.update(change)
    with pytest.raises((ValueError, TypeError)) as info:
        fastforget.masked_patch_embed(**args)
    assert_names(info.value, name)


@pytest.mark.parametrize("backend,device", backend_params())
def test_patch_embed_nan_stays_in_its_patch(backend, device):
    """NaN in a kept patch makes that token NaN, in a removed patch nothing: as the reference."""
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 8, 8, generator=gen)
    images[0, 1, 0, 0] = float("nan")  # patch 0 of image 0
    images[1, 2, 7, 7] = float("inf")  # patch 3 of image 1
    weight, pos = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(1, 5, 5, generator=gen)
    images, weight, pos = images.to(device), weight.to(device), pos.to(device)
    for ids in ([[0, 1], [1, 2]], [[1, 2], [3, 0]]):
        ids_keep = torch.tensor(ids, device=device)
        got = fastforget.masked_patch_embed(images, weight, None, pos, ids_keep, backend=backend)
        want = reference.masked_patch_embed(images, weight, None, pos, ids_keep)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.isfinite(), want.isfinite())


# -- make_teacher_batch ------------------------------------------------------------------------

@st.composite
def teacher_cases(draw):
    batch = draw(st.integers(1, 5))
    lo = draw(st.floats(-1, 1))
    return dict(
        shape=(batch, *draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))),
        dtype=draw(st.sampled_from(FLOATS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        flags=draw(st.lists(st.booleans(), min_size=batch, max_size=batch)),
        noise=draw(st.sampled_from(["normal", "uniform", "constant"])),
        clamp=draw(st.sampled_from([None, (lo, lo + draw(st.floats(0.01, 2)))])),
        first_row=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def teacher_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    return strided(case["shape"], case["dtype"], case["layout"], gen), torch.tensor(case["flags"])


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])  # torch's is the reference
def test_teacher_batch_matches_the_reference(backend):
    @run_settings(backend)
    @given(case=teacher_cases())
    def check(case):
        images, is_forget = teacher_inputs(case)
        gen_seed = case["seed"] + 1
        got = fastforget.make_teacher_batch(images, is_forget, noise=case["noise"], clamp=case["clamp"],
                                            generator=torch.Generator().manual_seed(gen_seed),
                                            first_row=case["first_row"], backend=backend)
        row = images[0].numel()
        stream = noise_stream(images.device, torch.Generator().manual_seed(gen_seed), case["first_row"] * row)
        want = reference.make_teacher_batch(images.contiguous(), is_forget, case["noise"], case["clamp"], stream)
        assert got.shape == images.shape and got.dtype == images.dtype
        assert torch.equal(got[~is_forget], images[~is_forget])  # retain rows bit for bit
        eps = torch.finfo(case["dtype"]).eps if case["dtype"] != torch.float32 else 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=max(eps, 2e-6), equal_nan=True)
    check()


def _teacher_mutations(images, is_forget):
    batch = images.shape[0]
    return [
        ("images", TypeError, dict(images=images.to(torch.int64))),
        ("images", ValueError, dict(images=torch.ones(batch))),
        ("is_forget", TypeError, dict(is_forget=is_forget.float())),
        ("is_forget", ValueError, dict(is_forget=torch.ones(batch + 2, dtype=torch.bool))),
        ("noise", ValueError, dict(noise="pink")),
        ("clamp", ValueError, dict(clamp=(1.0, 0.0))),
        ("clamp", ValueError, dict(clamp=(0.0, math.inf))),
        ("generator", TypeError, dict(generator=7)),
        ("first_row", ValueError, dict(first_row=-3)),
        ("first_row", ValueError, dict(first_row=True)),
    ]


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(case=teacher_cases(), pick=st.integers(0, 9))
def test_teacher_batch_refuses_invalid_input_by_name(case, pick):
    images, is_forget = teacher_inputs(case)
    name, error, change = _teacher_mutations(images, is_forget)[pick]
    args = dict(images=images, is_forget=is_forget)
    args.update(change)
    with pytest.raises(error) as info:
        fastforget.make_teacher_batch(**args)
    assert_names(info.value, name)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "torch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_teacher_batch_propagates_nan_and_inf_as_the_reference(backend, device, value, clamp):
    images, is_forget = torch.rand(4, 3, 5, 5, device=device), torch.tensor([True, False, True, False], device=device)
    images[1, 0, 2, 2] = value  # a retain row: the batch statistics see it (clamping keeps NaN, as torch.clamp)
    got = fastforget.make_teacher_batch(images, is_forget, clamp=clamp,
                                        generator=torch.Generator(device).manual_seed(5), backend=backend)
    stream = noise_stream(images.device, torch.Generator(device).manual_seed(5), 0)
    want = reference.make_teacher_batch(images, is_forget, "normal", clamp, stream)
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(got[1], images[1], rtol=0, atol=0, equal_nan=True)  # the retain row as it was


# -- qkv_attention -----------------------------------------------------------------------------

@st.composite
def attention_cases(draw):
    return dict(batch=draw(st.integers(1, 4)), tokens=draw(st.integers(1, 40)), heads=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from([1, 3, 8, 16, 17, 32, 64])), dtype=draw(st.sampled_from(FLOATS)),
                layout=draw(st.sampled_from(LAYOUTS)), scale=draw(st.floats(0.1, 4)),
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_attention_matches_the_reference(backend):
    @run_settings(backend)
    @given(case=attention_cases())
    def check(case):
        gen = torch.Generator().manual_seed(case["seed"])
        shape = (case["batch"], case["tokens"], 3 * case["heads"] * case["head_dim"])
        qkv = (strided(shape, torch.float32, case["layout"], gen) * case["scale"]).to(case["dtype"]).requires_grad_()
        exact = qkv.detach().double().requires_grad_()
        got = fastforget.ops.qkv_attention(qkv, case["heads"], backend=backend)
        want = reference.qkv_attention(exact, case["heads"])
        tol = 2e-5 if case["dtype"] == torch.float32 else 8 * torch.finfo(case["dtype"]).eps
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        upstream = torch.randn(got.shape, generator=gen, dtype=torch.float64)
        (g,) = torch.autograd.grad(got, qkv, upstream.to(got.dtype))
        (w,) = torch.autograd.grad(want, exact, upstream)
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * scale * case["tokens"] ** 0.5)
    check()


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(case=attention_cases(), pick=st.integers(0, 4))
def test_attention_refuses_invalid_input_by_name(case, pick):
    qkv = torch.zeros(case["batch"], case["tokens"], 3 * case["heads"] * case["head_dim"])
    name, args = [
        ("qkv", (qkv[0], case["heads"])),
        ("qkv", (qkv.to(torch.int64), case["heads"])),
        ("qkv", (qkv[..., 1:], case["heads"])),
        ("num_heads", (qkv, -case["heads"])),
        ("qkv", (qkv.numpy(), case["heads"])),
    ][pick]
    with pytest.raises((ValueError, TypeError)) as info:
        fastforget.ops.qkv_attention(*args)
    assert_names(info.value, name)
