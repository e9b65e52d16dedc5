"""unlearn_loss on every backend against fastforget/ops/reference.py."""
import pytest
import torch

import fastforget
from fastforget.ops import backends, reference
from fastforget.ops.unlearn_loss import UnlearnLossOutput

from conftest import backend_params

BACKENDS = backend_params()
# (shape, forget pattern); shapes cross the kernels' chunk sizes (8192 Triton, 8192 CUDA, 16384 C++).
CASES = [
    ((1, 7), "random"),
    ((5, 3, 7), "random"),
    ((6, 4, 33), "all_forget"),
    ((6, 4, 33), "all_retain"),
    ((3, 17000), "random"),
    ((9, 2, 2, 5), "alternate"),
]


def make(shape, pattern, device, dtype=torch.float32, target_dtype=None):
    student = torch.randn(shape, device=device).to(dtype).requires_grad_()
    retain = torch.randn(shape, device=device).to(target_dtype or dtype)
    forget = torch.randn(shape, device=device).to(target_dtype or dtype)
    batch = shape[0]
    is_forget = {
        "random": torch.rand(batch, device=device) < 0.5,
        "all_forget": torch.ones(batch, dtype=torch.bool, device=device),
        "all_retain": torch.zeros(batch, dtype=torch.bool, device=device),
        "alternate": torch.arange(batch, device=device) % 2 == 1,
    }[pattern]
    if pattern == "random" and batch > 1:  # both sets present
        is_forget[0], is_forget[1] = True, False
    return student, retain, forget, is_forget


def grads_of_each_output(fn, student):
    """Values of the three outputs and d output_i / d student for i = 0, 1, 2 and a weighted sum."""
    values, grads = None, []
    for i in range(4):
        out = fn()
        values = values or [o.detach() for o in out]
        target = out[i] if i < 3 else 3 * out.loss - 2 * out.retain_loss + 0.5 * out.forget_loss
        grads.append(torch.autograd.grad(target, student)[0])
    return values, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,pattern", CASES)
@pytest.mark.parametrize("normalize", ["set", "reference"])
def test_matches_reference_fp32(backend, device, shape, pattern, normalize):
    s, r, f, m = make(shape, pattern, device)
    kw = dict(retain_weight=0.7, forget_weight=0.2)
    values, grads = grads_of_each_output(
        lambda: fastforget.unlearn_loss(s, r, f, m, normalize=normalize, backend=backend, **kw), s)
    ref_values, ref_grads = grads_of_each_output(
        lambda: UnlearnLossOutput(*reference.unlearn_loss(s, r, f, m, kw["retain_weight"], kw["forget_weight"],
                                                          normalize)), s)
    for got, want in zip(values, ref_values):
        assert got.dtype == torch.float32 and got.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_set_contributes_zero(backend, device):
    for pattern, empty in (("all_forget", "retain_loss"), ("all_retain", "forget_loss")):
        s, r, f, m = make((4, 9), pattern, device)
        out = fastforget.unlearn_loss(s, r, f, m, backend=backend)
        assert getattr(out, empty).item() == 0.0
        grad, = torch.autograd.grad(getattr(fastforget.unlearn_loss(s, r, f, m, backend=backend), empty), s)
        assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", ["set", "reference"])
def test_low_precision_flash_attention_rule(backend, device, dtype, normalize):
    """Error against an fp64 reference is at most twice that of same-precision PyTorch.

    Allowances, in units of the dtype's eps times the gradient's magnitude: one for gradients taken
    through retain_loss, forget_loss or a scaled loss, which backward rescales in the gradient's own
    dtype (a second rounding); one for the Triton interpreter, which rounds float32 to 16 bits
    toward zero where the GPU rounds to nearest.
    """
    s, r, f, m = make((7, 5, 40), "random", device, dtype)
    s64, r64, f64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (s, r, f))
    want_values, want_grads = grads_of_each_output(
        lambda: UnlearnLossOutput(*reference.unlearn_loss(s64, r64, f64, m, 1.0, 0.2, normalize)), s64)
    values, grads = grads_of_each_output(
        lambda: fastforget.unlearn_loss(s, r, f, m, normalize=normalize, backend=backend), s)
    low_values, low_grads = grads_of_each_output(
        lambda: UnlearnLossOutput(*reference.unlearn_loss(s, r, f, m, 1.0, 0.2, normalize, upcast=False)), s)
    for got, low, want in zip(values, low_values, want_values):
        assert (got.double() - want).abs() <= 2 * (low.double() - want).abs() + 1e-6 * want.abs() + 1e-7
    interpreted = backend == "triton" and backends.triton_interpret()
    for i, (got, low, want) in enumerate(zip(grads, low_grads, want_grads)):
        assert got.dtype == dtype
        ulps = (i > 0) + interpreted
        err, low_err = (got.double() - want).abs().max(), (low.double() - want).abs().max()
        assert err <= 2 * low_err + (ulps * torch.finfo(dtype).eps + 1e-6) * want.abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes(backend, device):
    s, r, f, m = make((5, 3, 16), "random", device, torch.bfloat16, torch.float32)
    f = f.half()  # targets of two dtypes too
    out = fastforget.unlearn_loss(s, r, f, m, backend=backend)
    want = reference.unlearn_loss(s, r, f, m)
    for got, ref in zip(out, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_and_shared_target(backend, device):
    base = torch.randn(6, 40, 9, device=device)
    s = base.transpose(1, 2).detach().requires_grad_()  # (6, 9, 40), inner stride 9
    wide = torch.randn(6, 9, 80, device=device)
    r = wide[:, :, ::2]  # strided columns
    f = wide[:, :, 40:]  # strided rows, unit columns
    m = torch.tensor([1, 0, 1, 1, 0, 0], device=device)
    for target_pair in ((r, f), (f, f)):
        values, grads = grads_of_each_output(lambda: fastforget.unlearn_loss(s, *target_pair, m, backend=backend), s)
        ref_values, ref_grads = grads_of_each_output(lambda: UnlearnLossOutput(*reference.unlearn_loss(s, *target_pair, m)), s)
        for got, want in zip(values + grads, ref_values + ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("flag_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_is_forget_dtypes(backend, device, flag_dtype):
    s, r, f, _ = make((4, 6), "random", device)
    m = torch.tensor([0, 1, 1, 0], device=device, dtype=flag_dtype)
    out = fastforget.unlearn_loss(s, r, f, m, backend=backend)
    torch.testing.assert_close(out.loss, reference.unlearn_loss(s, r, f, m)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_grad_and_no_requires_grad(backend, device):
    s, r, f, m = make((3, 10), "random", device)
    with torch.no_grad():
        a = fastforget.unlearn_loss(s, r, f, m, backend=backend)
    b = fastforget.unlearn_loss(s.detach(), r, f, m, backend=backend)
    assert not a.loss.requires_grad and not b.loss.requires_grad
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_backward_through_one_graph_is_refused(backend, device):
    """The saved gradient is consumed in place by backward; autograd must refuse to reuse it."""
    s, r, f, m = make((3, 10), "random", device)
    out = fastforget.unlearn_loss(s, r, f, m, backend=backend)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.retain_loss.backward()


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("triton", "cuda")])
def test_many_rows_count_before_the_kernel(backend, device, monkeypatch):
    """Large batches count forget rows in a separate pass first (Triton past INLINE_COUNT_MAX_ROWS,
    CUDA past its compiled-in kInlineCountMaxRows = 4096); same result."""
    from fastforget.kernels import unlearn_loss as kernel

    monkeypatch.setattr(kernel, "INLINE_COUNT_MAX_ROWS", 2)  # Triton's switch, lowered: the interpreter is slow
    s, r, f, m = make((9 if backend == "triton" else 4096 + 5, 5), "random", device)
    _, grads = grads_of_each_output(lambda: fastforget.unlearn_loss(s, r, f, m, backend=backend), s)
    _, ref_grads = grads_of_each_output(lambda: UnlearnLossOutput(*reference.unlearn_loss(s, r, f, m)), s)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_cpu_backend_is_bitwise_deterministic():
    s, r, f, m = make((8, 3, 20000), "random", "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = fastforget.unlearn_loss(s, r, f, m, backend="cpu")
            results.append((out, torch.autograd.grad(out.loss, s)[0]))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, results[0][0]))
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    s, r, f, m = make((4, 12), "random", device)
    s2, r2, f2, _ = make((4, 5), "random", device)
    m = m.to(torch.uint8)
    for normalize in (0, 1, 2):
        torch.library.opcheck(torch.ops.fastforget.unlearn_loss.default,
                              ([s, s2], [r, r2], [f, f2], m, 0.5, 0.2, normalize, True, False, backend))
    grads = [torch.randn(4, 12, device=device), torch.randn(4, 5, device=device)]
    gl, gr = torch.tensor(2.0, device=device), torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.fastforget.unlearn_loss_scale_grad_.default,
                          (grads, m, gl, gr, None, 0.5, 0.2, backend))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_torch_compile_fullgraph(backend, device):
    s, r, f, m = make((4, 3, 10), "random", device)
    loss_fn = fastforget.nn.UnlearnLoss(retain_weight=0.9, forget_weight=0.3, backend=backend)

    def step(s, r, f, m):
        out = loss_fn(s, r, f, m)
        return out.loss * 2 + out.forget_loss

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(s, r, f, m)
    got_grad, = torch.autograd.grad(got, s)
    want = step(s, r, f, m)
    want_grad, = torch.autograd.grad(want, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_module_repr_and_defaults():
    module = fastforget.nn.UnlearnLoss()
    assert "forget_weight=0.2" in repr(module) and "normalize='set'" in repr(module)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def _good():
    s = torch.randn(4, 6, requires_grad=True)
    return dict(student=s, retain_target=torch.randn(4, 6), forget_target=torch.randn(4, 6),
                is_forget=torch.tensor([0, 1, 0, 1]))


BAD = [
    (dict(student=[1.0]), TypeError, "student must be a torch.Tensor"),
    (dict(student=torch.ones(4, 6, dtype=torch.float64)), TypeError, "student must be float32, bfloat16 or float16, got torch.float64"),
    (dict(retain_target=torch.ones(4, 6, dtype=torch.int32)), TypeError, "retain_target must be float32"),
    (dict(student=torch.ones(0, 6)), ValueError, r"B >= 1"),
    (dict(student=torch.ones(4)), ValueError, r"student must be \(B, ...\)"),
    (dict(forget_target=torch.ones(4, 7)), ValueError, r"forget_target must have student's shape \(4, 6\), got \(4, 7\)"),
    (dict(is_forget=torch.tensor([0, 1, 0])), ValueError, r"is_forget must have shape \(4,\)"),
    (dict(is_forget=torch.tensor([0.0, 1.0, 0.0, 1.0])), TypeError, "is_forget must be bool or 0/1 integers"),
    (dict(is_forget=torch.tensor([[0, 1, 0, 1]])), ValueError, "is_forget must have shape"),
    (dict(retain_target=torch.ones(4, 6, device="meta")), ValueError, "retain_target must be on student's device"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        fastforget.unlearn_loss(**args)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(normalize="mean"), ValueError, "normalize must be one of"),
    (dict(forget_weight=float("nan")), TypeError, "forget_weight must be a finite float"),
    (dict(retain_weight="1"), TypeError, "retain_weight must be a finite float"),
    (dict(backend="rocm"), ValueError, "backend must be one of"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastforget.unlearn_loss(**_good(), **kwargs)


def test_forced_unavailable_backend_lists_reason():
    if torch.cuda.is_available():
        pytest.skip("the cuda backend is available here")
    with pytest.raises(backends.BackendUnavailable, match=r"backend 'cuda' was forced\):\n  cuda: no CUDA device"):
        fastforget.unlearn_loss(**_good(), backend="cuda")


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTFORGET_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTFORGET_BACKEND must be one of"):
        fastforget.unlearn_loss(**_good())
    monkeypatch.setenv("FASTFORGET_BACKEND", "torch")
    out = fastforget.unlearn_loss(**_good())
    assert out.loss.shape == ()


def test_auto_order_error_lists_every_backend():
    reasons = {"cpu": ["made-up refusal"], "torch": ["also refused"]}
    with pytest.raises(backends.BackendUnavailable) as err:
        backends.select("op", "", torch.device("cpu"), lambda name: reasons.get(name, []))
    assert "cpu: made-up refusal" in str(err.value) and "torch: also refused" in str(err.value)


def test_auto_picks_the_cpu_kernel_on_the_cpu():
    assert backends.select("op", "", torch.device("cpu"), lambda name: []) == "cpu"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inference_mode(backend, device):
    """Under inference_mode the autograd kernels are skipped (the C++ ops' own below-autograd kernels)."""
    s, r, f, m = make((3, 10), "random", device)
    with torch.inference_mode():
        a = fastforget.unlearn_loss(s, r, f, m, backend=backend)
    torch.testing.assert_close(a.loss, fastforget.unlearn_loss(s.detach(), r, f, m, backend=backend).loss)
