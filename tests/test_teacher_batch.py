"""make_teacher_batch on every backend against fastforget/ops/reference.py."""
import pytest
import torch

import fastforget
from fastforget.ops import backends, reference
from fastforget.ops.teacher_batch import noise_stream

from conftest import backend_params

BACKENDS = backend_params()
# The kernels: the torch backend is reference.make_teacher_batch itself, so against the reference
# it would be compared with itself (it stays in the tests of the op's plumbing).
KERNELS = [p for p in BACKENDS if p.values[0] != "torch"]
NOISES = ["normal", "uniform", "constant"]


def make(shape, device, dtype=torch.float32, pattern="random"):
    images = torch.rand(shape, device=device).to(dtype)
    batch = shape[0]
    is_forget = {
        "random": torch.arange(batch, device=device) % 3 != 1,
        "all_forget": torch.ones(batch, dtype=torch.bool, device=device),
        "all_retain": torch.zeros(batch, dtype=torch.bool, device=device),
    }[pattern]
    return images, is_forget


def seeded(device, seed=1234):
    return torch.Generator(device=device).manual_seed(seed)


def expected(images, is_forget, noise, clamp, device, seed=1234, first_element=0):
    """The reference with the stream the op draws from the same generator state."""
    stream = noise_stream(torch.device(device), seeded(device, seed), first_element)
    return reference.make_teacher_batch(images, is_forget, noise, clamp, stream)


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("clamp", [(0.0, 1.0), (0.2, 0.7), None])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (5, 3, 8, 9), (4, 2, 70, 70)])
def test_matches_reference(backend, device, noise, clamp, shape):
    images, is_forget = make(shape, device, pattern="all_forget" if shape[0] == 1 else "random")
    got = fastforget.make_teacher_batch(images, is_forget, noise=noise, clamp=clamp, generator=seeded(device),
                                        backend=backend)
    want = expected(images, is_forget, noise, clamp, device)
    assert got.shape == images.shape and got.dtype == images.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    retain = ~is_forget.bool()
    assert torch.equal(got[retain], images[retain])  # bit for bit


@pytest.mark.parametrize("backend,device", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images(backend, device, dtype):
    images, is_forget = make((4, 3, 16, 16), device, dtype)
    got = fastforget.make_teacher_batch(images, is_forget, generator=seeded(device), backend=backend)
    want = expected(images, is_forget, "normal", (0.0, 1.0), device)
    # One rounding to the 16-bit dtype of values that agree to float32 precision.
    torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    assert torch.equal(got[~is_forget], images[~is_forget])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_retain_is_a_copy_and_non_contiguous_input(backend, device):
    base = torch.rand(3, 8, 8, 2, device=device)
    images = base.permute(0, 3, 1, 2)  # (3, 2, 8, 8), not contiguous
    _, is_forget = make((3,), device, pattern="all_retain")
    got = fastforget.make_teacher_batch(images, is_forget.int(), backend=backend)
    assert torch.equal(got, images)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_generator_state_decides_the_noise(backend, device):
    images, is_forget = make((3, 3, 6, 6), device)
    a = fastforget.make_teacher_batch(images, is_forget, generator=seeded(device, 7), backend=backend)
    b = fastforget.make_teacher_batch(images, is_forget, generator=seeded(device, 7), backend=backend)
    c = fastforget.make_teacher_batch(images, is_forget, generator=seeded(device, 8), backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a[is_forget], c[is_forget])


@pytest.mark.parametrize("backend,device", KERNELS)
def test_shards_draw_the_whole_batch_stream(backend, device):
    """Rows 3.. of a batch, made alone with first_row=3, get the noise the whole batch gives them."""
    images, _ = make((5, 2, 6, 6), device)
    is_forget = torch.ones(5, dtype=torch.bool, device=device)
    whole = fastforget.make_teacher_batch(images, is_forget, noise="uniform", generator=seeded(device), backend=backend)
    shard = fastforget.make_teacher_batch(images[3:], is_forget[3:], noise="uniform", generator=seeded(device),
                                          first_row=3, backend=backend)
    torch.testing.assert_close(shard, whole[3:], rtol=0, atol=1e-7)
    want = expected(images[3:], is_forget[3:], "uniform", (0.0, 1.0), device, first_element=3 * 72)
    torch.testing.assert_close(shard, want, rtol=1e-6, atol=1e-7)


def test_backends_draw_the_same_noise():
    images, is_forget = make((6, 3, 10, 10), "cpu")
    on_cpu = ("torch", "cpu", "triton") if backends.triton_interpret() else ("torch", "cpu")  # Triton: the GPU tests
    outs = [fastforget.make_teacher_batch(images, is_forget, generator=seeded("cpu"), backend=b) for b in on_cpu]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


def test_normal_noise_has_the_batch_statistics():
    images = torch.rand(64, 3, 32, 32) * 0.5 + 0.25
    is_forget = torch.zeros(64, dtype=torch.bool)
    is_forget[32:] = True
    out = fastforget.make_teacher_batch(images, is_forget, clamp=None, generator=seeded("cpu"), backend="cpu")
    noise = out[32:]
    assert abs(noise.mean() - images.mean()) < 0.01
    assert abs(noise.std() / images.std() - 1) < 0.02
    u = fastforget.make_teacher_batch(images, is_forget, noise="uniform", clamp=(0.2, 0.4), backend="cpu")[32:]
    assert u.min() >= 0.2 and u.max() < 0.4 and abs(u.mean() - 0.3) < 0.005


def test_cpu_backend_is_bitwise_deterministic_across_threads():
    images, is_forget = make((8, 3, 64, 64), "cpu")
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (threads, 1):
            torch.set_num_threads(n)
            outs.append(fastforget.make_teacher_batch(images, is_forget, generator=seeded("cpu"), backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    images, is_forget = make((3, 2, 5, 5), device)
    stream = torch.tensor([99, 7], device=device)
    for noise, lo, hi in ((0, 0.0, 1.0), (1, None, None), (2, 0.1, 0.9)):
        torch.library.opcheck(torch.ops.fastforget.make_teacher_batch.default,
                              (images, is_forget.to(torch.uint8), stream, noise, lo, hi, backend))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_torch_compile_fullgraph(backend, device):
    images, is_forget = make((3, 2, 5, 5), device)

    def fn(x, m):
        return fastforget.make_teacher_batch(x, m, backend=backend) * 2

    out = torch.compile(fn, fullgraph=True)(images, is_forget)
    assert out.shape == images.shape
    assert torch.equal(out[~is_forget], images[~is_forget] * 2)


BAD = [
    (dict(images=torch.ones(2, 3, dtype=torch.int64)), TypeError, "images must be float32"),
    (dict(images=torch.ones(3)), ValueError, r"images must be \(B, ...\)"),
    (dict(is_forget=torch.tensor([1, 0, 1])), ValueError, r"is_forget must have shape \(2,\)"),
    (dict(is_forget=torch.tensor([0.5, 1.0])), TypeError, "is_forget must be bool or 0/1 integers"),
    (dict(noise="salt"), ValueError, "noise must be one of"),
    (dict(clamp=(1.0, 0.0)), ValueError, "clamp must be None or"),
    (dict(clamp=(0.0,)), ValueError, "clamp must be None or"),
    (dict(generator=42), TypeError, "generator must be a torch.Generator"),
    (dict(first_row=-1), ValueError, "first_row must be a non-negative int"),
    (dict(images=torch.ones(2, 3, device="meta"), is_forget=torch.ones(2, device="meta", dtype=torch.bool),
          generator=torch.Generator()), ValueError, "generator must be on images' device type meta, got cpu"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input(change, error, match):
    args = dict(images=torch.rand(2, 3, 4, 4), is_forget=torch.tensor([1, 0]))
    args.update(change)
    with pytest.raises(error, match=match):
        fastforget.make_teacher_batch(**args)
