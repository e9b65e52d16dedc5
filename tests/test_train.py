"""The trainer: data selection, the 1:1 stream, what trains, exact resumption, DDP, checkpoints."""
import json

import pytest
import torch

from fastforget.models import load_mae
from fastforget.train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from fastforget.train import data as data_lib
from fastforget.train.loop import load_checkpoint

from conftest import one_and_two_ranks


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A barely trained mae_vit_tiny: what unlearning starts from in these tests."""
    out = tmp_path_factory.mktemp("original")
    pretrain(PretrainConfig(device="cpu", loop=LoopConfig(out=str(out), epochs=0.1, batch_size=32, progress=False)))
    return str(out / "checkpoint.pt")


def test_select_builds_the_reference_sets():
    data = data_lib.load_digits("train", 16)
    sets = data_lib.select(data, ["0"], ["2", "3"], retain_ratio=0.5)
    assert set(sets.forget.labels.tolist()) == {0}
    assert set(sets.retain.labels.tolist()) <= {2, 3} and len(sets.retain) == round(0.5 * len(sets.forget))
    proxy = data_lib.select(data, ["0"], proxy=["7"], proxy_ratio=2.0)
    assert set(proxy.retain.labels.tolist()) == {7} and len(proxy.retain) == min(2 * len(proxy.forget), 
                                                                                 int((data.labels == 7).sum()))
    with pytest.raises(ValueError, match="unknown forget class 'eleven'; known classes: 0, 1, 2"):
        data_lib.select(data, ["eleven"])
    with pytest.raises(ValueError, match=r"classes \['1'\] are both forgotten and kept"):
        data_lib.select(data, ["1"], ["1"])


def test_stream_is_one_to_one_and_a_function_of_seed_and_epoch():
    data = data_lib.load_digits("train", 16)
    sets = data_lib.select(data, ["0", "1"], ["2"], retain_ratio=0.3)
    index, is_forget = data_lib.stream(sets, epoch=3, seed=5)
    assert int(is_forget.sum()) == len(is_forget) // 2 == max(len(sets.forget), len(sets.retain))
    assert bool((index[is_forget] < len(sets.forget)).all()) and bool((index[~is_forget] >= len(sets.forget)).all())
    again = data_lib.stream(sets, epoch=3, seed=5)
    assert torch.equal(index, again[0]) and not torch.equal(index, data_lib.stream(sets, epoch=4, seed=5)[0])


def _unlearn(original, out, augment=None, **loop):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), device="cpu",
                        augment=augment, loop=LoopConfig(out=str(out), epochs=0.5, batch_size=32, blr=1e-3,
                                                         log_every=2, progress=False, **loop))
    return unlearn(cfg)


def test_unlearning_trains_the_encoder_only(original, tmp_path):
    metrics = _unlearn(original, tmp_path)
    before, after = load_mae(original).state_dict(), load_mae(str(tmp_path / "checkpoint.pt")).state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        encoder = not name.startswith(("decoder", "mask_token")) and name != "pos_embed"
        assert changed == encoder, name
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["step"] == metrics["step"] and {"loss", "retain_loss", "forget_loss", "lr"} <= set(lines[-1])


@pytest.mark.parametrize("augment", ["none", "crop-flip"])
def test_resume_repeats_the_uninterrupted_run_bitwise(original, tmp_path, augment):
    _unlearn(original, tmp_path / "whole", augment)
    _unlearn(original, tmp_path / "parts", augment, stop_after=3)
    assert load_checkpoint(str(tmp_path / "parts" / "checkpoint.pt"))["step"] == 3
    _unlearn(original, tmp_path / "parts", augment, resume=True)
    whole = load_checkpoint(str(tmp_path / "whole" / "checkpoint.pt"))
    parts = load_checkpoint(str(tmp_path / "parts" / "checkpoint.pt"))
    assert whole["step"] == parts["step"] > 3
    for name, value in whole["model"].items():
        assert torch.equal(value, parts["model"][name]), name


def _encoder_change(original, path) -> float:
    """The trained parameters' relative change from the original (Frobenius, all together)."""
    before, after = load_mae(original).state_dict(), load_mae(path).state_dict()
    names = [n for n in before if n.startswith("blocks.")]
    return float(sum((after[n] - before[n]).pow(2).sum() for n in names) / sum(before[n].pow(2).sum() for n in names))


def test_anchor_pulls_the_trained_weights_back_to_the_original(original, tmp_path):
    """--anchor: p -= lr * anchor * (p - p_original) after each step. At full strength (lr * anchor
    clamps to 1) nothing moves; a moderate one moves the encoder less than none does, and the
    setting is part of the run's trajectory (its settings, and a resume repeats it bitwise)."""
    def run(out, anchor, **loop):
        unlearn(UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), device="cpu",
                              anchor=anchor, loop=LoopConfig(out=str(out), epochs=0.5, batch_size=32, lr=1e-3,
                                                             log_every=2, progress=False, **loop)))
        return str(out / "checkpoint.pt")

    held = run(tmp_path / "held", 1e9)
    assert _encoder_change(original, held) == 0.0
    free, pulled = _encoder_change(original, run(tmp_path / "free", 0.0)), _encoder_change(
        original, run(tmp_path / "pulled", 100.0))  # a tenth of the way back a step
    assert 0 < pulled < 0.5 * free
    assert load_checkpoint(str(tmp_path / "pulled" / "checkpoint.pt"))["settings"]["anchor"] == 100.0
    run(tmp_path / "parts", 100.0, stop_after=3)
    parts = load_checkpoint(run(tmp_path / "parts", 100.0, resume=True))["model"]
    whole = load_checkpoint(str(tmp_path / "pulled" / "checkpoint.pt"))["model"]
    assert all(torch.equal(whole[n], parts[n]) for n in whole)
    with pytest.raises(ValueError, match=r"anchor \(--anchor\) must be a finite number >= 0 \(0: off\), got -1"):
        UnlearnConfig(checkpoint=original, anchor=-1)


def test_forget_target_switches_the_forget_term_on_the_device():
    """The exact penalty: the first batch sets the limit (fraction * its forget loss); afterwards
    the forget term counts, with weight alpha, only while the forget loss is above it."""
    from fastforget.ops import unlearn_loss
    from fastforget.distributed import Dist
    from fastforget.train.unlearn import ForgetTarget

    target = ForgetTarget(0.5, 0.2, Dist())
    student = torch.randn(4, 3, requires_grad=True)
    teacher, is_forget = torch.zeros(4, 3), torch.tensor([True, False, True, False])

    def step(scale):
        out = unlearn_loss(student * scale, teacher, teacher, is_forget, forget_weight=0.2)
        return out, target.constrained(out, {"loss": out.loss})

    first, logged = step(1.0)
    assert float(target.limit) == pytest.approx(0.5 * float(first.forget_loss.detach()))
    assert float(logged["forget_on"]) == 1.0
    assert float(logged["loss"].detach()) == pytest.approx(float(first.loss.detach()))
    below, logged = step(0.5)  # a quarter of the first forget loss: under the limit, the term is off
    assert float(logged["forget_on"]) == 0.0 and float(logged["loss"]) == pytest.approx(float(below.retain_loss))
    student.grad = None
    logged["loss"].backward()
    assert torch.equal(student.grad[is_forget], torch.zeros(2, 3)) and student.grad[~is_forget].abs().sum() > 0


def test_forget_target_is_the_method_until_reached_and_resumes_exactly(original, tmp_path):
    """--forget-target: the limit is the original's forget loss on step 0's batch (the first logged
    one, where the student is still the original) times the target, and each step's forget term is
    on exactly when its forget loss is above it; a target never reached leaves the run as without
    one; and since the limit is measured on the original before training, a resume repeats the run."""
    def run(out, forget_target, **loop):
        unlearn(UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), device="cpu",
                              forget_target=forget_target, loop=LoopConfig(
                                  out=str(out), epochs=0.5, batch_size=32, lr=1e-3, log_every=1, progress=False,
                                  **loop)))
        return [json.loads(line) for line in open(out / "metrics.jsonl")], str(out / "checkpoint.pt")

    free, free_ckpt = run(tmp_path / "free", None)
    never, never_ckpt = run(tmp_path / "never", 1e-6)
    assert all(line["forget_on"] == 1.0 for line in never)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(
        load_checkpoint(free_ckpt)["model"].values(), load_checkpoint(never_ckpt)["model"].values()))
    held, held_ckpt = run(tmp_path / "held", 1.0)
    limit = held[0]["forget_loss"]
    assert limit == free[0]["forget_loss"] and held[0]["forget_on"] == 0.0 and held[0]["grad_norm"] == 0.0
    assert [line["forget_on"] for line in held] == [float(line["forget_loss"] > limit) for line in held]
    assert 0 < sum(line["forget_on"] for line in held) < len(held)
    assert load_checkpoint(held_ckpt)["settings"]["forget_target"] == 1.0
    run(tmp_path / "parts", 1.0, stop_after=2)
    _, parts = run(tmp_path / "parts", 1.0, resume=True)
    whole, parts = load_checkpoint(held_ckpt)["model"], load_checkpoint(parts)["model"]
    assert all(torch.equal(whole[n], parts[n]) for n in whole)
    with pytest.raises(ValueError, match=r"forget_target \(--forget-target\) must be None or a number in \(0, 1\]"):
        UnlearnConfig(checkpoint=original, forget_target=0)
    with pytest.raises(ValueError, match=r"with method one of \('ours', 'random-encoder'\), got 0.5"):
        UnlearnConfig(checkpoint=original, forget_target=0.5, method="max-loss")


def test_resume_refuses_a_run_with_other_settings(original, tmp_path):
    """Logging and saving may change on resume; what fixes the trajectory may not."""
    _unlearn(original, tmp_path, stop_after=2)

    def resume(forget_weight=0.2, batch_size=32):
        unlearn(UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"),
                              device="cpu", forget_weight=forget_weight,
                              loop=LoopConfig(out=str(tmp_path), epochs=0.5, batch_size=batch_size, blr=1e-3,
                                              resume=True, progress=False)))
    with pytest.raises(ValueError, match=r"--resume: .* other settings \(forget_weight was 0.2, now 0.5\)"):
        resume(forget_weight=0.5)
    with pytest.raises(ValueError, match=r"global_micro_batch was 32, now 16"):
        resume(batch_size=16)
    _unlearn(original, tmp_path, resume=True, save_every=1, augment="none")  # the digits' default, named
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] > 2


def test_compiled_step_trains_as_the_eager_one(original, tmp_path):
    """--compile: the same run under torch.compile ends where the eager run does, to float rounding."""
    eager = _unlearn(original, tmp_path / "eager")
    compiled = _unlearn(original, tmp_path / "compiled", compile=True)
    assert compiled["step"] == eager["step"]
    torch.testing.assert_close(compiled["loss"], eager["loss"], rtol=1e-4, atol=1e-6)
    a = load_checkpoint(str(tmp_path / "eager" / "checkpoint.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pt"))["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_two_ranks_compute_what_one_does(original, tmp_path):
    """torchrun, 2 CPU ranks (gloo) with 8 images each = 1 process with 16, to float rounding; each
    rank takes its rows of the global batch's masks, noise and crops."""
    (a, b), logs, (one_out, two_out) = one_and_two_ranks(
        ["unlearn", "--checkpoint", original, "--forget-classes", "0,1", "--retain-classes", "2,3", "--epochs", "0.4",
         "--blr", "1e-3", "--noise", "uniform", "--device", "cpu", "--log-every", "1", "--augment", "crop-flip"],
        8, tmp_path)
    assert a["step"] == b["step"] >= 2
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    # The log is the global batch's, and the run reads the same whatever its world size: one
    # summary line, the same losses in metrics.jsonl.
    assert [m["step"] for m in logs[0]] == [m["step"] for m in logs[1]]
    for m1, m2 in zip(*logs):
        for key in ("loss", "retain_loss", "forget_loss", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), (m1["step"], key)
    assert one_out.count("wrote ") == two_out.count("wrote ") == 1


def test_demo_runs_end_to_end_at_toy_length(tmp_path):
    """The demo's pipeline (not its numbers: make demo trains long enough for those)."""
    from fastforget.train.demo import DemoConfig, run

    report = run(DemoConfig(out=str(tmp_path), pretrain_epochs=0.2, unlearn_epochs=0.5, batch_size=64))
    assert set(report["models"]) == {"original", "ours", "ours_proxy"}
    assert report["forget_classes"] == ["0", "1"] and report["proxy_classes"] == ["6", "7", "8", "9"]
    saved = json.load(open(tmp_path / "report.json"))
    assert all(saved["models"][m][s]["mse"] > 0 for m in saved["models"] for s in ("forget", "retain"))
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000


def test_palette_demo_runs_end_to_end_at_toy_length(tmp_path, capsys):
    """The same report layout for the diffusion family: tasks.inpaint.<model>.<set>.<metric>, each
    metric the mean over the sampler seeds, with the seeds' values beside it."""
    from fastforget.train.demo import DemoConfig, run

    report = run(DemoConfig(out=str(tmp_path), family="palette", pretrain_epochs=0.05, unlearn_epochs=0.1,
                            eval_seeds=(0, 1), sample_steps=3))
    inpaint = json.load(open(tmp_path / "report.json"))["tasks"]["inpaint"]
    assert report["family"] == "palette" and set(inpaint) == {"original", "ours", "ours_proxy"}
    for model in inpaint.values():
        for s in ("forget", "retain"):
            assert len(model[s]["fid_seeds"]) == 2 and model[s]["fid"] == pytest.approx(sum(model[s]["fid_seeds"]) / 2)
    assert (tmp_path / "grid_inpaint.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "inpaint FID vs the original's" in out and "palette demo: wrote" in out


def test_mage_demo_pretrains_its_tokenizer_then_the_model_and_scores_both_tasks(tmp_path, capsys):
    from fastforget.train.demo import DemoConfig, run

    report = run(DemoConfig(out=str(tmp_path), family="mage", pretrain_epochs=0.05, unlearn_epochs=0.1,
                            eval_seeds=(0, 1), sample_steps=4))
    tasks = json.load(open(tmp_path / "report.json"))["tasks"]
    assert report["family"] == "mage" and set(tasks) == {"inpaint", "outpaint"}
    assert set(tasks["inpaint"]) == {"original", "ours", "ours_proxy"}
    assert len(tasks["outpaint"]["ours"]["forget"]["fid_seeds"]) == 2
    assert (tmp_path / "original" / "tokenizer" / "checkpoint.pt").exists()
    assert (tmp_path / "grid_outpaint.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "pretraining mage_tiny's tokenizer on the digits" in out and "mage demo: wrote" in out


@pytest.mark.parametrize("method", ["max-loss", "noisy-label", "retain-label", "random-encoder"])
def test_baselines_train_what_the_reference_trains(original, tmp_path, method):
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0",), retain_classes=("2",), method=method,
                        device="cpu", loop=LoopConfig(out=str(tmp_path), epochs=0.5, batch_size=16, blr=1e-3,
                                                      log_every=1, progress=False))
    metrics = unlearn(cfg)
    assert {"loss", "retain_loss", "forget_loss"} <= set(metrics)
    before, after = load_mae(original).state_dict(), load_mae(str(tmp_path / "checkpoint.pt")).state_dict()
    decoder_moved = not torch.equal(before["decoder_pred.weight"], after["decoder_pred.weight"])
    assert decoder_moved == (method != "random-encoder")
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert torch.equal(before["pos_embed"], after["pos_embed"])
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["method"] == method


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"method \(--method\) must be one of"):  # before the checkpoint is read
        UnlearnConfig(checkpoint=str(tmp_path / "never-read.pt"), forget_classes=("0",), method="forget-harder",
                      loop=LoopConfig(out=str(tmp_path)))


@pytest.mark.parametrize("family", ["mae", "palette"])
def test_sweep_draws_the_tradeoff_at_toy_length(tmp_path, family):
    from fastforget.train import sweep
    from fastforget.train.demo import DemoConfig

    toy = dict(pretrain_epochs=0.05, unlearn_epochs=0.05, eval_seeds=(0,), sample_steps=2) if family == "palette" \
        else dict(pretrain_epochs=0.2, unlearn_epochs=0.3)
    cfg = DemoConfig(out=str(tmp_path), family=family, batch_size=64, **toy)
    result = sweep.run(str(tmp_path), [0.1, 1.0], cfg)
    assert [p["model"] for p in result["points"]] == ["original", "alpha=0.1", "alpha=1"]
    assert result["points"][0]["forget_fid_ratio"] == 1.0
    assert (tmp_path / "tradeoff_inpaint.png").stat().st_size > 1000 and (tmp_path / "sweep_inpaint.json").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ours", "noisy-label"])
def test_unlearning_runs_on_the_gpu(original, tmp_path, method):
    """The GPU path: data staged on the device, bf16 autocast, the teacher in bf16."""
    cfg = UnlearnConfig(checkpoint=original, forget_classes=("0", "1"), retain_classes=("2", "3"), method=method,
                        device="cuda", loop=LoopConfig(out=str(tmp_path), epochs=0.5, batch_size=32, blr=1e-3,
                                                       log_every=2, progress=False))
    metrics = unlearn(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k)
    assert load_mae(str(tmp_path / "checkpoint.pt")).encode(
        torch.rand(2, 1, 16, 16), torch.arange(16).expand(2, -1)).shape == (2, 17, 64)


def test_task_shaped_pretraining_masks():
    from fastforget.ops import random_masking
    from fastforget.train.loop import Dist
    from fastforget.families.mae import square_noise as _square_noise

    gen = torch.Generator().manual_seed(0)
    for hole, kept in ((True, 48), (False, 16)):
        noise, ratio = _square_noise(gen, 5, (8, 8), Dist(), hole=hole)
        ids_keep, _, mask = random_masking(5, 64, ratio, noise=noise)
        assert ids_keep.shape == (5, kept)
        grids = mask.view(5, 8, 8)
        for g in grids:  # the removed (hole) or kept (window) patches form one 4 x 4 square
            square = g if hole else 1 - g
            rows, cols = square.nonzero().unbind(1)
            assert square.sum() == 16 and rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
