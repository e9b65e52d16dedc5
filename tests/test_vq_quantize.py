"""vq_quantize (MAGE's VQGAN tokenizer) on every backend against fastforget/ops/reference.py.

Float32 tokens must be the reference's except at near-ties: rows whose two nearest codes lie within
float32 rounding of each other (1e-5 of the distance scale), where any two summation orders may
disagree. Exact ties (integer-valued inputs, whose distances every order computes exactly) go to
the lowest index on every backend.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastforget
from fastforget.ops import backends, reference, vq_quantize

from conftest import backend_params

BACKENDS = backend_params()
KERNELS = [p for p in BACKENDS if p.values[0] != "torch"]
NEAR_TIE = 1e-5


def inputs(n, k, e, device, dtype=torch.float32, codebook_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed + n * 7919 + k * 31 + e)
    codebook = torch.randn(k, e, generator=g)
    # half the rows near a code (a trained tokenizer's inputs), half anywhere
    near = codebook[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, e, generator=g)
    z = torch.where(torch.arange(n)[:, None] % 2 == 0, near, torch.randn(n, e, generator=g))
    return z.to(device, dtype), codebook.to(device, codebook_dtype or dtype)


def assert_tokens(got, z, codebook, max_mismatch=0.01):
    """got (N,) int64 picks a nearest code of every row up to NEAR_TIE of the distance scale
    (exact float64 distances of the same values), and differs from the reference only that rarely."""
    assert got.dtype == torch.int64 and got.shape == (z.shape[0],) and got.device == z.device
    want = reference.vq_quantize(z, codebook)
    zd, ed = z.double(), codebook.double()
    d = (zd[:, None, :] - ed[None]).pow(2).sum(-1)
    scale = zd.pow(2).sum(1) + ed.pow(2).sum(1).max()
    picked = d.gather(1, got[:, None])[:, 0]
    assert bool((picked - d.min(1).values <= NEAR_TIE * scale).all()), "a token is not a nearest code"
    mismatches = int((got != want).sum())
    assert mismatches <= max_mismatch * z.shape[0], f"{mismatches} of {z.shape[0]} tokens differ from the reference"


SHAPES = [(1, 1, 3), (1, 7, 8), (37, 5, 257), (100, 33, 16), (130, 70, 64), (65, 129, 3), (64, 64, 32)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_vq_quantize_matches_the_reference(backend, device, shape):
    z, codebook = inputs(*shape, device)
    assert_tokens(vq_quantize(z, codebook, backend=backend), z, codebook)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,codebook_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                  (torch.float32, torch.bfloat16)])
def test_vq_quantize_low_precision_is_the_float32_computation(backend, device, dtype, codebook_dtype):
    """16-bit values are widened before the products: the tokens of the same values in float32."""
    z, codebook = inputs(70, 40, 24, device, dtype, codebook_dtype)
    got = vq_quantize(z, codebook, backend=backend)
    assert torch.equal(got, vq_quantize(z.float(), codebook.float(), backend=backend))
    assert_tokens(got, z, codebook)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vq_quantize_exact_ties_go_to_the_lowest_index(backend, device):
    """Small integers: every product and sum is exact in float32, so duplicated codes (and other
    codes at the same distance) tie exactly, in every summation order."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (50, 9), generator=g).float()
    codebook = torch.cat([base, base[torch.randperm(50, generator=g)], base])  # three times: ties across tiles
    z = torch.randint(-3, 4, (90, 9), generator=g).float()
    z[:10] = codebook[torch.randint(0, 150, (10,), generator=g)]  # at distance 0 of three codes
    d = (z[:, None, :] - codebook[None]).pow(2).sum(-1)  # exact
    lowest = (d == d.min(1, keepdim=True).values).float().argmax(1)  # the first of the minima
    assert bool((lowest < 50).all())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # small integers are exact in every dtype
        got = vq_quantize(z.to(device, dtype), codebook.to(device, dtype), backend=backend)
        assert torch.equal(got.cpu(), lowest)
    assert torch.equal(reference.vq_quantize(z, codebook), lowest)
    same = torch.ones(5, 4, device=device)  # one code, five times: always the first
    got = vq_quantize(z[:, :4].to(device), same, backend=backend)
    assert torch.equal(got.cpu(), torch.zeros(90, dtype=torch.int64))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vq_quantize_takes_any_strides_and_no_rows(backend, device):
    z, codebook = inputs(40, 24, 16, device)
    want = vq_quantize(z, codebook, backend=backend)
    z_t = z.t().contiguous().t()  # column-major
    codebook_view = torch.stack([codebook, -codebook], dim=2)[..., 0]  # every other float: strides (32, 2)
    assert not z_t.is_contiguous() and not codebook_view.is_contiguous()
    assert torch.equal(vq_quantize(z_t, codebook_view, backend=backend), want)
    assert torch.equal(vq_quantize(z[::3], codebook, backend=backend), want[::3])
    with torch.inference_mode():
        assert torch.equal(vq_quantize(z, codebook, backend=backend), want)
    empty = vq_quantize(z[:0], codebook, backend=backend)
    assert empty.shape == (0,) and empty.dtype == torch.int64 and empty.device == z.device
    z_grad = z.detach().requires_grad_()
    assert torch.equal(vq_quantize(z_grad, codebook, backend=backend), want)  # no gradient, no error


def test_vq_quantize_cpu_never_materialises_the_distances():
    """The allocations of one call (as torch's profiler records them) against the (N, K) float32
    distance matrix: the reference makes it, the kernel keeps tiles of it in registers."""
    n = k = 2048
    z, codebook = inputs(n, k, 8, "cpu")
    matrix = n * k * 4

    def allocated(backend):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            got = vq_quantize(z, codebook, backend=backend)
        return got, sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)

    got, kernel_bytes = allocated("cpu")
    want, reference_bytes = allocated("torch")
    assert reference_bytes >= matrix  # the measurement sees a materialised matrix
    assert kernel_bytes < matrix / 16
    assert (got != want).float().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_vq_quantize_gpu_mage_shape_never_materialises_the_distances(backend):
    """MAGE's batch: 64 images of 16 x 16 tokens, e = 256, K = 1024."""
    z, codebook = inputs(16384, 1024, 256, "cuda")
    vq_quantize(z[:64], codebook, backend=backend)  # compile / load first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = vq_quantize(z, codebook, backend=backend)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 16384 * 1024 * 4 / 16
    assert_tokens(got[:2048], z[:2048], codebook)
    assert (got != reference.vq_quantize(z, codebook)).float().mean() < 0.01


def test_vq_quantize_cpu_is_the_same_for_any_thread_count():
    z, codebook = inputs(300, 100, 40, "cpu")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(vq_quantize(z, codebook, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vq_quantize_opcheck(backend, device):
    z, codebook = inputs(20, 12, 8, device)
    for args in ((z, codebook), (z.t().contiguous().t(), codebook.bfloat16()), (z[:0], codebook)):
        torch.library.opcheck(torch.ops.fastforget.vq_quantize.default, (*args, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vq_quantize_torch_compile_fullgraph(backend, device):
    z, codebook = inputs(20, 12, 8, device)

    def fn(z, codebook):  # the tokens' embeddings, as VectorQuantizer2 returns them
        return torch.nn.functional.embedding(vq_quantize(z, codebook, backend=backend), codebook)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(z, codebook), fn(z, codebook), rtol=0, atol=0)


def test_vq_quantize_picks_the_native_backend_and_is_exported():
    assert fastforget.vq_quantize is vq_quantize
    if not backends.standing_reasons("cpu", torch.device("cpu")):
        assert backends.select("vq_quantize", "", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("change,error,match", [
    (dict(z=torch.ones(2, 3, 4)), ValueError, r"z must be \(N, e\) with e >= 1, got \(2, 3, 4\)"),
    (dict(z=torch.ones(4)), ValueError, r"z must be \(N, e\)"),
    (dict(z=torch.ones(4, 0), codebook=torch.ones(3, 0)), ValueError, r"z must be \(N, e\) with e >= 1"),
    (dict(codebook=torch.ones(3, 5)), ValueError, r"codebook must be \(K >= 1, 4\) \(z's e = 4\), got \(3, 5\)"),
    (dict(codebook=torch.ones(0, 4)), ValueError, r"codebook must be \(K >= 1, 4\)"),
    (dict(codebook=torch.ones(3, 4, 1)), ValueError, r"codebook must be \(K >= 1, 4\)"),
    (dict(z=torch.ones(2, 4, dtype=torch.int64)), TypeError, "z must be float32, bfloat16 or float16, got torch.int64"),
    (dict(codebook=torch.ones(3, 4, dtype=torch.float64)), TypeError, "codebook must be float32, bfloat16 or float16"),
    (dict(codebook=[[1.0] * 4]), TypeError, "codebook must be a torch.Tensor, got list"),
    (dict(codebook=torch.ones(3, 4, device="meta")), ValueError, "codebook must be on z's device cpu, got meta"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_vq_quantize_bad_input(change, error, match):
    args = dict(z=torch.ones(2, 4), codebook=torch.ones(3, 4))
    args.update(change)
    with pytest.raises(error, match=match):
        vq_quantize(args.pop("z"), args.pop("codebook"), **args)
