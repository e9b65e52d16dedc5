"""MAGE's token embedding (fastforget.token_embed) on every backend against
fastforget/ops/reference.py: forward and the four weight gradients, odd shapes, repeated ids,
all / none masked, any strides, low precision, opcheck, torch.compile and bad input."""
import pytest
import torch
from torch.nn import functional as F

import fastforget
from fastforget.ops import reference

from conftest import backend_params

BACKENDS = backend_params()
NATIVE_OR_TORCH = [p for p in BACKENDS if p.values[0] != "triton"]  # torch.compile: not the interpreter


def make(device, batch=2, length=6, keep=4, dim=24, vocab=11, dtype=torch.float32, mask_p=0.5):
    """tokens drawn from 3 ids (so rows repeat: gradients accumulate into the same word rows),
    keep ascending, word rows with a mean far from 0; class_id = vocab - 2, mask_id = vocab - 1."""
    g = torch.Generator().manual_seed(batch * 1000 + length * 100 + keep * 10 + dim)
    tokens = torch.randint(0, min(3, vocab), (batch, length), generator=g)
    keep_ids = torch.stack([torch.randperm(length, generator=g)[:keep].sort().values for _ in range(batch)])
    masked = torch.rand(batch, keep, generator=g) < mask_p
    weights = [torch.randn(vocab, dim, generator=g) + 2.0, torch.randn(1 + length, dim, generator=g),
               1 + 0.5 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g)]
    return tokens.to(device), keep_ids.to(device), masked.to(device), [w.to(device, dtype) for w in weights]


def run(fn, tokens, keep, masked, weights):
    """(output, gradients of the four weights) for a fixed random output gradient."""
    ws = [w.detach().requires_grad_() for w in weights]
    vocab = weights[0].shape[0]
    out = fn(tokens, keep, masked, *ws, class_id=vocab - 2, mask_id=vocab - 1)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    return out.detach(), torch.autograd.grad((out.float() * g).sum(), ws)


def op(backend):
    return lambda *a, **k: fastforget.token_embed(*a, **k, backend=backend)


CASES = {  # (batch, length, keep, dim, vocab, mask_p)
    "small": (2, 6, 4, 24, 11, 0.5),
    "batch1-keep1-dim33": (1, 5, 1, 33, 7, 0.5),  # D not a multiple of any vector width
    "keep-all": (3, 9, 9, 40, 9, 0.5),  # K = L
    "all-masked": (3, 8, 5, 32, 9, 1.0),
    "none-masked": (3, 8, 5, 32, 9, 0.0),
    "many-rows": (70, 4, 3, 16, 5, 0.5),  # rows past a CPU row block (64)
}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_fp32(backend, device, case):
    *shape, mask_p = case
    tokens, keep, masked, weights = make(device, *shape, mask_p=mask_p)
    got, grads = run(op(backend), tokens, keep, masked, weights)
    want, want_grads = run(reference.token_embed, tokens, keep, masked, weights)
    assert got.shape == (shape[0], 1 + shape[2], shape[3]) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_flash_attention_rule(backend, device, dtype):
    """Against float64, at most twice the error of MAGE's own path in the weights' dtype (the sum
    and its LayerNorm there, the gradients added there), plus an ulp of the largest value."""
    tokens, keep, masked, weights = make(device, 4, 16, 10, 64, 13, dtype=dtype)
    got, grads = run(op(backend), tokens, keep, masked, weights)
    want, want_grads = run(reference.token_embed, tokens, keep, masked, [w.double() for w in weights])
    low, low_grads = run(lambda *a, **k: reference.token_embed(*a, **k, upcast=False), tokens, keep, masked, weights)
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    for a, lo, w in zip([got, *grads], [low, *low_grads], [want, *want_grads]):
        err, low_err = (a.double() - w).abs().max(), (lo.double() - w).abs().max()
        assert err <= 2 * low_err + eps * w.abs().max()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_keep_everything_is_magess_bert_embeddings(backend, device):
    """keep = arange(L), nothing masked: MAGE's BertEmbeddings (eval) over [class, tokens]."""
    tokens, _, _, weights = make(device, 2, 6, 6, 24, 11)
    keep = torch.arange(6, device=device).expand(2, -1)
    got = fastforget.token_embed(tokens, keep, torch.zeros(2, 6, dtype=torch.bool, device=device), *weights,
                                 class_id=9, mask_id=10, backend=backend)
    ids = torch.cat([torch.full((2, 1), 9, device=device), tokens], dim=1)
    x = F.embedding(ids, weights[0]) + weights[1][None]
    torch.testing.assert_close(got, F.layer_norm(x, (24,), weights[2], weights[3], 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_reaches_only_the_rows_read(backend, device):
    """All masked: the word gradient lives in class_id's and mask_id's rows alone; every kept
    position's row and the class position's get one."""
    tokens, keep, masked, weights = make(device, 3, 8, 5, 16, 9, mask_p=1.0)
    _, (d_word, d_pos, _, _) = run(op(backend), tokens, keep, masked, weights)
    used = d_word.abs().sum(1) > 0
    assert used.tolist() == [v in (7, 8) for v in range(9)]
    read = torch.zeros(9, dtype=torch.bool, device=device)
    read[0] = True
    read[keep.reshape(-1) + 1] = True
    assert torch.equal(d_pos.abs().sum(1) > 0, read)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_any_strides_and_inference_mode(backend, device):
    tokens, keep, masked, weights = make(device, 3, 8, 5, 24, 11)
    strided = [tokens.t().contiguous().t(), keep.t().contiguous().t(), masked.t().contiguous().t(),
               weights[0].t().contiguous().t(), torch.cat([weights[1], weights[1]], 1)[:, :24],
               torch.stack([weights[2], weights[2]], 1)[:, 0], weights[3].expand(2, -1)[1]]
    assert not any(t.is_contiguous() for t in strided[:6])
    got, grads = run(op(backend), strided[0], strided[1], strided[2], strided[3:])
    want, want_grads = run(reference.token_embed, tokens, keep, masked, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))
    with torch.inference_mode():
        plain = fastforget.token_embed(tokens, keep, masked, *weights, class_id=9, mask_id=10, backend=backend)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)


def test_cpu_gradients_are_bitwise_deterministic_across_threads():
    """Rows that read the same word row add into it in row order, whatever the thread count."""
    tokens, keep, masked, weights = make("cpu", 40, 16, 12, 48, 7)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            runs.append(run(op("cpu"), tokens, keep, masked, weights))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], other[1]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dim", [40, 136])  # one column tile of the GPU's segment sums, and several
def test_every_row_one_word_row(backend, device, dim):
    """tokens, class_id and mask_id all word row 0: every row's gradient lands in one word row (a
    segment of 241 sources, past the segment sums' steps) and each position row collects the batch's."""
    tokens, keep, masked, weights = make(device, 40, 8, 5, dim, 6)
    tokens = torch.zeros_like(tokens)
    ws = [w.detach().requires_grad_() for w in weights]
    grads = []
    for fn in (op(backend), reference.token_embed):
        out = fn(tokens, keep, masked, *ws, class_id=0, mask_id=0)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
        grads.append(torch.autograd.grad((out.float() * g).sum(), ws))
    (d_word, *_), (want_word, *_) = grads
    assert (d_word[1:] == 0).all() and want_word[0].abs().min() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cuda", "triton")
                                            and p.values[1] == "cuda"])
def test_gpu_backward_repeats_bitwise(backend, device):
    """No atomics: each weight row's sources are summed in a fixed order, so thousands of rows
    landing in a few word rows (mask_id's, class_id's and 3 tokens') give the same bits every run."""
    tokens, keep, masked, weights = make(device, 64, 64, 48, 768, 13, dtype=torch.float32)
    first = run(op(backend), tokens, keep, masked, weights)
    for _ in range(3):
        again = run(op(backend), tokens, keep, masked, weights)
        assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    tokens, keep, masked, weights = make(device, 2, 5, 3, 16, 7)
    weights = [w.requires_grad_() for w in weights]
    torch.library.opcheck(torch.ops.fastforget.token_embed.default,
                          (tokens, keep, masked, *weights, 5, 6, 1e-6, backend))


@pytest.mark.parametrize("backend,device", NATIVE_OR_TORCH)
def test_torch_compile_fullgraph(backend, device):
    tokens, keep, masked, weights = make(device, 2, 6, 4, 24, 11)
    weights = [w.requires_grad_() for w in weights]

    def fn(tokens, keep, masked, *weights):
        return fastforget.token_embed(tokens, keep, masked, *weights, class_id=9, mask_id=10, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(tokens, keep, masked, *weights)
    want = fn(tokens, keep, masked, *weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, weights, g), torch.autograd.grad(want, weights, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _args():
    tokens, keep, masked, weights = make("cpu", 2, 6, 4, 8, 11)
    return dict(tokens=tokens, keep=keep, masked=masked, word_weight=weights[0], pos_weight=weights[1],
                ln_weight=weights[2], ln_bias=weights[3], class_id=9, mask_id=10)


@pytest.mark.parametrize("change,error,match", [
    (dict(tokens=[1, 2]), TypeError, "tokens must be a torch.Tensor"),
    (dict(tokens=torch.zeros(2, 6, dtype=torch.int32)), TypeError, "tokens must be torch.int64"),
    (dict(keep=torch.zeros(2, 4)), TypeError, "keep must be torch.int64"),
    (dict(masked=torch.zeros(2, 4, dtype=torch.uint8)), TypeError, "masked must be torch.bool"),
    (dict(tokens=torch.zeros(6, dtype=torch.long)), ValueError, r"tokens must be \(B, L\)"),
    (dict(keep=torch.zeros(3, 4, dtype=torch.long)), ValueError, r"keep must be \(B=2, K\)"),
    (dict(masked=torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"masked must have keep's shape \(2, 4\)"),
    (dict(word_weight=torch.zeros(11, 8, dtype=torch.float64)), TypeError, "word_weight must be float32"),
    (dict(pos_weight=torch.zeros(6, 8)), ValueError, r"pos_weight must have shape \(7, 8\)"),
    (dict(ln_bias=torch.zeros(9)), ValueError, r"ln_bias must have shape \(8,\)"),
    (dict(ln_weight=torch.zeros(8, dtype=torch.bfloat16)), TypeError, "ln_weight must have word_weight's dtype"),
    (dict(class_id=11), ValueError, r"class_id must be an int in \[0, 11\)"),
    (dict(mask_id=-1), ValueError, r"mask_id must be an int in \[0, 11\)"),
    (dict(mask_id=True), ValueError, "mask_id must be an int"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(tokens=torch.full((2, 6), 11)), ValueError, r"tokens must lie in \[0, 11\), got values from 11 to 11"),
    (dict(keep=torch.tensor([[0, 1, 2, 6], [0, 1, 2, 3]])), ValueError, r"keep must lie in \[0, 6\)"),
    (dict(ln_bias=torch.zeros(8, device="meta")), ValueError, "ln_bias must be on tokens' device cpu"),
])
def test_bad_input(change, error, match):
    args = {**_args(), **change}
    tensors = [args.pop(k) for k in ("tokens", "keep", "masked", "word_weight", "pos_weight", "ln_weight", "ln_bias")]
    with pytest.raises(error, match=match):
        fastforget.token_embed(*tensors, **args)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("cuda", "triton")])
def test_gpu_kernels_make_rows_out_of_range_nan(backend, device):
    """Without a host sync to refuse them, a keep entry or token out of range gives a NaN row and no
    gradient from it (the other rows are untouched); called below the CPU's Python check."""
    from fastforget.ops.token_embed import BACKWARD, TOKEN_EMBED

    tokens, keep, masked, weights = make(device, 2, 6, 4, 16, 9, mask_p=0.0)
    keep, tokens = keep.clone(), tokens.clone()
    keep[0, 1] = 6  # past L
    tokens[1, keep[1, 2]] = 9  # past V
    args = (tokens, keep, masked, *weights, 7, 8)
    out, mean, rstd = TOKEN_EMBED.op(*args, 1e-6, backend)
    bad = torch.zeros(2, 5, dtype=torch.bool, device=device)
    bad[0, 2] = bad[1, 3] = True
    assert out[bad].isnan().all() and not out[~bad].isnan().any()
    grads = BACKWARD.op(torch.ones_like(out), *args[:6], mean, rstd, 7, 8, backend)
    assert all(torch.isfinite(g).all() for g in grads)
