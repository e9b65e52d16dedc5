"""qkv_attention on its backends against fastforget/ops/reference.py's explicit softmax."""
import pytest
import torch

from fastforget.ops import attention, backends, qkv_attention, reference

BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("torch", "cpu", id="torch-cpu"),
            pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu)]

# (batch, tokens, heads, head_dim): the compile-time tiles (the digits model's encoder, 17 x 16,
# and decoder, 65 x 16; 49-64 tokens of up to 16 features; ViT-B/L's 50 x 64), one token, one
# feature, head_dim off the 16-lane vectors, tokens on and across vector boundaries, and the
# run-time-sized path.
SHAPES = [(3, 17, 4, 16), (2, 65, 4, 16), (1, 60, 2, 5), (2, 50, 2, 64), (1, 1, 1, 1), (2, 5, 3, 8),
          (2, 33, 3, 20), (1, 16, 2, 16), (2, 32, 1, 32), (1, 70, 2, 40), (1, 3, 1, 130), (1, 81, 1, 16)]


def make(batch, tokens, heads, head_dim, device="cpu", scale=1.0):
    """float64 qkv: the reference's precision; tests round it to the dtype under test."""
    return torch.randn(batch, tokens, 3 * heads * head_dim, device=device, dtype=torch.float64) * scale


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_reference_with_gradients(backend, device, shape):
    heads = shape[2]
    qkv64 = make(*shape, device=device, scale=2.0).requires_grad_()
    qkv = qkv64.detach().float().requires_grad_()
    got = qkv_attention(qkv, heads, backend=backend)
    want = reference.qkv_attention(qkv64, heads)
    assert got.shape == want.shape and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, device=device, dtype=torch.float64)
    (grad,) = torch.autograd.grad(got, qkv, upstream.float())
    (grad64,) = torch.autograd.grad(want, qkv64, upstream)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_within_twice_plain_pytorchs(backend, device, dtype):
    """The flash-attention rule: error against float64 at most twice that of the same-precision
    explicit softmax, plus one ulp of the largest exact value (for ties at tiny errors)."""
    heads = 4
    qkv64 = make(4, 17, heads, 16, device=device).requires_grad_()
    qkv = qkv64.detach().to(dtype).requires_grad_()
    low = qkv64.detach().to(dtype).requires_grad_()
    got, plain, exact = qkv_attention(qkv, heads, backend=backend), reference.qkv_attention(low, heads), \
        reference.qkv_attention(qkv64, heads)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert (got.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max() + eps * exact.abs().max()
    upstream = torch.randn(got.shape, device=device, dtype=torch.float64)
    (g,) = torch.autograd.grad(got, qkv, upstream.to(dtype))
    (p,) = torch.autograd.grad(plain, low, upstream.to(dtype))
    (e,) = torch.autograd.grad(exact, qkv64, upstream)
    assert (g.double() - e).abs().max() <= 2 * (p.double() - e).abs().max() + eps * e.abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_qkv_is_read_as_it_is(backend, device):
    base = make(3, 17, 2, 16, device=device, scale=2.0).float()
    wide = torch.cat([base, base], dim=-1)[..., :base.shape[-1]]  # rows 2x apart
    swapped = base.transpose(0, 1).contiguous().transpose(0, 1)  # batch-minor layout
    want = qkv_attention(base, 2, backend=backend)
    for view in (wide, swapped):
        assert not view.is_contiguous()
        torch.testing.assert_close(qkv_attention(view, 2, backend=backend), want, rtol=0, atol=0)


def test_cpu_kernel_repeats_bit_for_bit_at_any_thread_count():
    qkv = make(4, 17, 4, 16, scale=2.0).float().requires_grad_()
    upstream = torch.randn(4, 17, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = qkv_attention(qkv, 4, backend="cpu")
            results.append((out, torch.autograd.grad(out, qkv, upstream)[0]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("part", [0, 1, 2])
def test_nan_spreads_as_the_reference(backend, device, part):
    """NaN in a query poisons its own row; in a key or value, every row (all attend to it)."""
    heads, head_dim = 2, 16
    qkv = make(2, 17, heads, head_dim, device=device).float()
    qkv[1, 5, part * heads * head_dim + 3] = float("nan")
    got, want = qkv_attention(qkv, heads, backend=backend), reference.qkv_attention(qkv, heads)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


def test_opcheck_and_compile():
    qkv = make(2, 9, 2, 8).float().requires_grad_()
    for op, args in ((torch.ops.fastforget.qkv_attention, (qkv, 2, "cpu")),):
        torch.library.opcheck(op, args)
    compiled = torch.compile(lambda x: qkv_attention(x, 2, backend="cpu"), fullgraph=True)
    out = compiled(qkv)
    torch.testing.assert_close(out, qkv_attention(qkv, 2, backend="cpu"), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    (want,) = torch.autograd.grad(qkv_attention(qkv, 2, backend="cpu").sum(), qkv)
    torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_flop_counter_counts_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    qkv = make(2, 9, 2, 8).float().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        qkv_attention(qkv, 2, backend="cpu").sum().backward()
    assert counter.get_total_flops() == 3 * 4 * 2 * 9 * 9 * 16  # forward, and backward at 2x


def test_long_sequences_go_to_torch_and_forcing_the_cpu_kernel_says_why():
    tokens = attention.CPU_MAX_TOKENS + 1
    qkv = make(1, tokens, 1, 4).float()
    torch.testing.assert_close(qkv_attention(qkv, 1).double(), reference.qkv_attention(qkv.double(), 1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(backends.BackendUnavailable, match=f"cpu: {tokens} tokens"):
        qkv_attention(qkv, 1, backend="cpu")


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_kernel_backends_refuse_with_the_reason(name, monkeypatch):
    monkeypatch.setattr(backends, "standing_reasons", lambda n, d: [])
    with pytest.raises(backends.BackendUnavailable, match="scaled_dot_product_attention"):
        qkv_attention(make(1, 4, 1, 4).float(), 1, backend=name)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_environment_forcing_a_backend_attention_lacks_leaves_it_automatic(name, monkeypatch):
    """FASTFORGET_BACKEND=cuda forces the ops that have a cuda kernel; a model's attention still runs."""
    monkeypatch.setenv("FASTFORGET_BACKEND", name)
    qkv = make(2, 5, 2, 4).float()
    torch.testing.assert_close(qkv_attention(qkv, 2), qkv_attention(qkv, 2, backend="cpu"), rtol=0, atol=0)
    monkeypatch.setenv("FASTFORGET_BACKEND", "cpu")  # one attention has: forced, so its refusal shows
    with pytest.raises(backends.BackendUnavailable, match="backend 'cpu' was forced"):
        qkv_attention(make(1, attention.CPU_MAX_TOKENS + 1, 1, 4).float(), 1)


@pytest.mark.parametrize("qkv,heads,error,match", [
    (torch.zeros(2, 3, 12), 0, ValueError, "num_heads must be a positive int, got 0"),
    (torch.zeros(2, 3, 12), True, ValueError, "num_heads must be a positive int"),
    (torch.zeros(2, 3, 12), 5, ValueError, r"qkv must be \(B, T, 3 \* num_heads \* head_dim\).*got \(2, 3, 12\)"),
    (torch.zeros(3, 12), 1, ValueError, r"qkv must be \(B, T, 3"),
    (torch.zeros(0, 3, 12), 1, ValueError, r"qkv must be \(B, T, 3"),
    (torch.zeros(2, 3, 12, dtype=torch.int32), 1, TypeError, "qkv must be float32, bfloat16 or float16, got torch.int32"),
    ([[0.0] * 3], 1, TypeError, "qkv must be a torch.Tensor, got list"),
])
def test_refuses_invalid_input_by_name(qkv, heads, error, match):
    with pytest.raises(error, match=match):
        qkv_attention(qkv, heads)


def test_native_kernel_refuses_tiles_past_its_limits():
    """The kernel's own check, for callers of the raw op: its tiles are sized for these limits."""
    from fastforget import native

    raw = native.ops("cpu").qkv_attention_forward
    raw(torch.zeros(1, attention.CPU_MAX_TOKENS, 3), 1)
    with pytest.raises(RuntimeError, match=f"up to {attention.CPU_MAX_TOKENS} tokens and head_dim "
                                           f"{attention.CPU_MAX_HEAD_DIM}, got {attention.CPU_MAX_TOKENS + 1}"):
        raw(torch.zeros(1, attention.CPU_MAX_TOKENS + 1, 3), 1)
    with pytest.raises(RuntimeError, match="got 1 and 257"):
        raw(torch.zeros(1, 1, 3 * (attention.CPU_MAX_HEAD_DIM + 1)), 1)


def test_compiled_attention_follows_changing_sequence_lengths():
    """Pretraining's task masks change the kept tokens from step to step: torch.compile then
    makes the length dynamic, and the backend choice must not pin it."""
    compiled = torch.compile(lambda x: qkv_attention(x, 2), fullgraph=True)
    for tokens in (5, 7, 9, 11):
        qkv = make(2, tokens, 2, 4).float().requires_grad_()
        out = compiled(qkv)
        torch.testing.assert_close(out.double(), reference.qkv_attention(qkv.detach().double(), 2),
                                   rtol=1e-5, atol=1e-5)
        out.sum().backward()
        assert qkv.grad.shape == qkv.shape


def test_inference_mode():
    qkv = make(2, 5, 2, 4).float()
    with torch.inference_mode():
        out = qkv_attention(qkv, 2, backend="cpu")
    torch.testing.assert_close(out.double(), reference.qkv_attention(qkv.double(), 2), rtol=1e-5, atol=1e-5)
