"""The benchmarks measure what they claim: the reference re-creation computes the model's function,
FLOPs are counted right, and the commands write their CSV rows and plots."""
import csv
import re
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastforget import cli
from fastforget.bench import ops as bench_ops, overhead as bench_overhead, step as bench_step, timing
from fastforget.bench.steps import mae as mae_steps, mage as mage_steps, palette as palette_steps
from fastforget.models import create_mae
from fastforget.ops import random_masking


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_mae("mae_vit_tiny").eval()


@pytest.mark.parametrize("explicit_attention", [False, True])
def test_reference_encoder_is_the_models_encoder(tiny, explicit_attention):
    """The reference provider's MAE (every patch convolved, then gathered; timm 0.3's attention)
    computes what fastforget's encoder computes, so the providers time the same function."""
    imgs = torch.rand(5, 1, 16, 16)
    ids_keep = random_masking(5, tiny.num_patches, 0.75, generator=torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        ours = tiny.encode(imgs, ids_keep)
        theirs = mae_steps.mae_encode(tiny, imgs, ids_keep, explicit_attention)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_kept_ids_are_mae_masks(tiny):
    noise = torch.rand(4, tiny.num_patches, generator=torch.Generator().manual_seed(2))
    assert torch.equal(mae_steps._kept_ids(noise, 0.75), random_masking(4, tiny.num_patches, 0.75, noise=noise)[0])


@pytest.mark.parametrize("name", ["mae_vit_tiny", "mae_vit_base_patch16"])
def test_encoder_flops_match_torchs_flop_counter(name):
    """encoder_flops = patch embedding of the kept patches + the blocks, as FlopCounterMode counts
    the blocks' matmuls and attention (through the math kernel: the counter knows its matmuls)."""
    model = create_mae(name, depth=2) if name != "mae_vit_tiny" else create_mae(name)
    batch, ratio = 2, 0.75
    kept = model.num_patches - int(model.num_patches * ratio)
    x = torch.randn(batch, 1 + kept, model.pos_embed.shape[-1])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for blk in model.blocks:
            x = blk(x)
    patch = 2 * batch * kept * model.patch_embed.proj.weight[0].numel() * model.pos_embed.shape[-1]
    assert mae_steps.encoder_flops(model, batch, ratio) == patch + counter.get_total_flops()
    assert mae_steps.step_flops(model, batch, ratio) == 3 * patch + 4 * counter.get_total_flops()


@pytest.mark.parametrize("plain", [False, True])
def test_palette_providers_compute_the_models_encoder(plain):
    """The reference re-creation (GroupNorm32, the legacy attention under its checkpoint, the host
    frequencies) and plain PyTorch's (SDPA) compute the features fastforget's model does."""
    from fastforget.models import create_palette

    torch.manual_seed(0)
    model = create_palette("palette_tiny", attn_res=(2,))  # attention in an input block too
    x, gammas = torch.randn(3, 2, 16, 16), torch.rand(3)
    ours = model.encoder_features(x, gammas)
    theirs = palette_steps.encoder_features(model.denoise_fn, x.requires_grad_(), gammas, plain)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(sum(f.square().sum() for f in theirs), x)[0]  # through the checkpoint
    assert torch.isfinite(grads).all()


def test_palette_step_flops_are_the_methods():
    """Student forward and backward and one teacher forward: about four encoder forwards (102.19
    GFLOP an image at 256 px; backward is twice the forward's matmuls, less the first conv's input
    gradient, which the images do not take), for every image of the batch."""
    from fastforget.models import create_palette

    with torch.device("meta"):
        model = create_palette("palette_places2")
    spec = bench_step.Spec("fastforget", "palette_places2", 2, None, "cpu")
    per_image = palette_steps.flops(model, spec) / 2
    assert 3.85 < per_image / 102_193_659_904 < 4.0


@pytest.mark.parametrize("plain", [False, True])
def test_mage_providers_compute_the_models_tokens_and_latent(plain):
    """The reference re-creation (its masks by cut-off, nonzero scatter and gather, all positions
    embedded, q.k^T in fp32) and plain PyTorch's (ranks, SDPA) give fastforget's model's tokens
    and latent under the same masks."""
    from fastforget.models.mage import create_mage

    torch.manual_seed(0)
    model = create_mage("mage_tiny").eval()
    images = torch.rand(3, 1, 16, 16)
    tokens = model.tokenize(images)
    assert torch.equal(mage_steps.tokenize(model, images, keep_all=not plain), tokens)
    masks = model.draw_masks(3, torch.Generator().manual_seed(1))
    ours = model.encode_tokens(tokens, masks.keep, masks.masked)
    if plain:
        theirs = mage_steps._plain_encoder(model, tokens, masks.keep, masks.all > 0)
    else:
        theirs = mage_steps._reference_encoder(model, images, masks.drop, masks.all)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    drop, every = mage_steps._reference_masks(model, 4, "cpu")
    assert drop.sum(1).tolist() == [32] * 4 and (drop <= every).all()


def test_mage_step_flops_are_the_methods():
    """1.5 tokenizations (the clean batch and the forget half's noise), the student's forward and
    backward and one teacher pass: at ViT-B, 256 px, 1.5 x 128.6 GFLOP of VQGAN encoder (mage.md
    §6.1) and 4 x 22.5 GFLOP of ViT."""
    from fastforget.models.mage import create_mage

    with torch.device("meta"):
        model = create_mage("mage_vit_base_patch16")
    spec = bench_step.Spec("fastforget", "mage_vit_base_patch16", 2, None, "cpu")
    per_image = mage_steps.flops(model, spec) / 2
    assert 1.5 * 128.6e9 + 3.8 * 22.3e9 < per_image < 1.5 * 129.5e9 + 4.0 * 22.6e9


def test_bench_step_writes_rows_plot_and_profiles(tmp_path, capsys):
    path = tmp_path / "step.csv"
    (tmp_path / "profile" / "pytorch.txt").mkdir(parents=True)  # that provider's profile cannot be written
    assert cli.main(["bench", "step", "--batch-size", "4", "--reps", "2", "--min-time", "0", "--device", "cpu",
                     "--csv", str(path), "--profile", str(tmp_path / "profile")]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "MFU" in out
    assert out.index("wrote") < out.index("profile of reference:")  # the results are out before any profiling
    assert "profile of pytorch: failed" in out and "IsADirectoryError" in out
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == list(bench_step.PROVIDERS)
    assert list(rows[0]) == list(bench_step.CSV_COLUMNS)
    for r in rows:
        assert float(r["ms_per_step"]) > 0 and float(r["peak_mem_mb"]) > 0 and 0 < float(r["mfu"]) < 1
    assert float(rows[0]["speedup"]) == 1.0
    assert (tmp_path / "step.png").stat().st_size > 0
    for provider in ("reference", "fastforget"):  # each provider's own ops, after its timing
        table = (tmp_path / "profile" / f"{provider}.txt").read_text()
        assert "self_cpu_time_total" in table and "aten::" in table
        assert (tmp_path / "profile" / f"{provider}.json.gz").stat().st_size > 0
    assert "fastforget_cpu::qkv_attention" in (tmp_path / "profile" / "fastforget.txt").read_text()


def test_bench_step_rejects_unknown_provider():
    with pytest.raises(ValueError, match="--providers"):
        bench_step.main(cli.build_parser().parse_args(["bench", "step", "--providers", "reference,fast"]))


def test_bench_ops_sweeps_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_ops, "SMALL", [("loss", "float32", ((4, 3, 8),)),
                                             ("patch", "float32", (2, 32, 16, 16, 0.75)),
                                             ("teacher", "float32", (2, 16))])
    path = tmp_path / "ops.csv"
    assert cli.main(["bench", "ops", "--device", "cpu", "--reps", "1", "--csv", str(path)]) == 0
    with open(path) as f:
        rows = list(csv.DictReader(f))
    roofline = [r for r in rows if r["unit"] != "call"]
    assert {r["op"] for r in roofline} == {"loss", "patch", "teacher"}
    assert all(float(r["ms"]) > 0 and float(r["ceiling"]) > 0 for r in roofline)
    calls = {(r["op"], r["provider"]): float(r["ms"]) for r in rows if r["unit"] == "call"}
    assert set(calls) == {(f"overhead:{op}", p) for op in bench_overhead.OPS for p in bench_overhead.PROVIDERS}
    assert all(ms > 0 for ms in calls.values())
    assert (tmp_path / "ops.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "op call overhead at tiny shapes" in out and "fastforget - kernel" in out


def test_bench_step_names_what_failed_in_a_provider_process():
    with pytest.raises((RuntimeError, ValueError), match="unknown model 'nope'"):
        bench_step.run([bench_step.Spec("reference", "nope", 2, 0.75, "cpu", min_time_s=0)])


def _host_bound(device):
    """A call whose host takes ~2 ms and whose GPU work is one tiny kernel."""
    x = torch.zeros(16, device=device)

    def call():
        time.sleep(2e-3)
        x.add_(1)
    return call


def test_median_ms_times_the_call_on_the_cpu():
    ms = timing.median_ms(_host_bound(torch.device("cpu")), torch.device("cpu"), warmup=1, reps=5, min_time_s=0)
    assert 1.9 < ms < 20


@pytest.mark.gpu
@pytest.mark.timing
def test_median_ms_on_cuda_times_the_loop_or_the_gpu_alone():
    """By default the host's time shows (training waits on it); gpu_only hides it behind a GPU
    sleep, so a tiny kernel times as a tiny kernel."""
    device = torch.device("cuda")
    call = _host_bound(device)
    assert timing.median_ms(call, device, warmup=1, reps=5, min_time_s=0) > 1.9
    assert timing.median_ms(call, device, warmup=1, reps=5, min_time_s=0, gpu_only=True) < 0.2


def test_paired_rounds_cancel_drift_and_take_more_rounds_when_unsettled():
    """A machine whose speed drifts 3x over the run slows both providers of a round alike: the paired
    ratio stays exact and settles in the first rounds; a provider whose own times jump is flagged
    after more rounds, and the note says so."""
    drift = iter([1.0 + 0.4 * k for k in range(100)])
    speed = [1.0]

    def baseline():
        speed[0] = next(drift)
        return 10.0 * speed[0]

    steady = timing.paired_rounds({"eager": baseline, "fast": lambda: 4.0 * speed[0]}, "eager")
    assert steady["fast"].ratio == pytest.approx(2.5) and steady["fast"].spread < 1e-9
    assert len(steady["fast"].rounds) == timing.ROUNDS and timing.unsettled_note(steady) == ""
    jumpy = iter([1.0, 3.0] * 50)
    loose = timing.paired_rounds({"eager": lambda: 10.0, "noisy": lambda: next(jumpy)}, "eager")
    assert len(loose["noisy"].rounds) == timing.MAX_ROUNDS and not loose["noisy"].settled
    assert "unsettled" in timing.unsettled_note(loose) and "noisy" in timing.unsettled_note(loose)


@pytest.mark.parametrize("model", ["palette_tiny", "mage_tiny"])
def test_bench_step_takes_any_family(capsys, model):
    assert cli.main(["bench", "step", "--model", model, "--batch-size", "4", "--reps", "2", "--min-time", "0",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"unlearning step, {model}, batch 4 on cpu" in out
    assert all(any(line.startswith(p) for line in out.splitlines()) for p in bench_step.PROVIDERS)
    with pytest.raises(SystemExit, match="2"):
        cli.main(["bench", "step", "--model", "palette_tiny", "--mask-ratio", "0.5"])
    assert "mask_ratio (--mask-ratio) does not apply to the palette family" in capsys.readouterr().err


def test_bench_data_rates_the_streamed_decoding_against_a_models_step(tmp_path, capsys):
    from conftest import image_folder

    root = image_folder(tmp_path / "d", ("a", "b"), per_class=4, size=20, ext="jpg")
    assert cli.main(["bench", "data", "--data", str(root), "--workers", "0,2", "--images", "24", "--batch-size", "4",
                     "--model", "mae_vit_tiny", "--step-batch", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"decoding 24 files of {root} (mean ") and "to 18² RGB uint8, in batches of 4" in out[0]
    rates = [line.split() for line in out[2:4]]
    assert [r[0] for r in rates] == ["0", "2"] and all(float(r[1]) > 0 for r in rates)
    assert float(rates[1][2]) == pytest.approx(float(rates[1][1]) / 2, rel=0.01)
    assert re.match(r"the step of mae_vit_tiny at batch 8 on cpu takes [\d.]+ images/s: \d+ workers at [\d.]+ "
                    r"images/s each keep up with it", out[4])
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "data", "--data", str(root), "--workers", "two"])
    assert stop.value.code == 2 and "--workers must be comma-separated ints >= 0" in capsys.readouterr().err
