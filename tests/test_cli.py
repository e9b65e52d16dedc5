"""The fastforget command."""
import os
import re
import subprocess
import sys

import pytest

from fastforget import cli
from fastforget.ops import backends


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in backends.BACKENDS:
        assert f"  {name}" in out
    assert "cpu     available" in out


def test_bench_loss_runs_and_writes_csv(tmp_path, capsys):
    csv = tmp_path / "loss.csv"
    assert cli.main(["bench", "loss", "--shape", "4", "8", "--reps", "1", "--device", "cpu", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "eager" in out and "cpu" in out
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("op,provider,") and any(r.startswith("loss,cpu,4x8,float32,cpu,") for r in rows[1:])


def test_bench_patch_and_teacher_run(tmp_path, capsys):
    csv = str(tmp_path / "ops.csv")
    assert cli.main(["bench", "patch", "--batch-size", "2", "--image-size", "32", "--dim", "16", "--reps", "1",
                     "--device", "cpu", "--csv", csv]) == 0
    assert cli.main(["bench", "teacher", "--batch-size", "2", "--image-size", "16", "--reps", "1", "--device", "cpu",
                     "--csv", csv]) == 0
    out = capsys.readouterr().out
    assert "matmul rate" in out and "copy bandwidth" in out
    rows = open(csv).read().splitlines()
    assert any(r.startswith("patch,cpu,") for r in rows) and any(r.startswith("teacher,cpu,") for r in rows)


UNLEARN = ["unlearn", "--checkpoint", "x.pt", "--forget-classes", "0"]


@pytest.mark.parametrize("argv,match", [
    (UNLEARN + ["--batch-size", "0"], r"batch_size \(--batch-size\) must be an int >= 1, got 0"),
    (UNLEARN + ["--accum-steps", "0"], r"accum_steps \(--accum-steps\) must be"),
    (["pretrain", "--log-every", "0"], r"log_every \(--log-every\) must be an int >= 1"),
    (["pretrain", "--epochs", "nan"], r"epochs \(--epochs\) must be a finite number > 0"),
    (["pretrain", "--warmup-fraction", "1"], r"warmup_fraction \(--warmup-fraction\) must be a number in \[0, 1\)"),
    (["pretrain", "--mask-ratio", "1"], r"mask_ratio \(--mask-ratio\) must be a number in \[0, 1\)"),
    (["pretrain", "--min-lr", "-1"], r"min_lr \(--min-lr\) must be a finite number >= 0"),
    (UNLEARN + ["--forget-weight", "-1"], r"forget_weight \(--forget-weight\)"),
    (UNLEARN + ["--mask-ratio", "1"], r"mask_ratio \(--mask-ratio\)"),
])
def test_bad_training_settings_are_named_before_any_work(argv, match, capsys):
    """Checked when the config is made: no checkpoint is read, no data loaded; one line, exit 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and re.search(match, err) and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["eval", "--models", "a.pt", "--forget-classes", "0", "--retain-classes", "1"], "--models must be NAME=CHECKPOINT"),
    (["eval", "--models", "=a.pt", "--forget-classes", "0", "--retain-classes", "1"], "--models must be NAME="),
    (["sweep", "--forget-weights", "0.1,a"], "--forget-weights must be comma-separated numbers >= 0"),
    (["sweep", "--forget-weights", "-0.5"], "--forget-weights must be comma-separated numbers >= 0"),
])
def test_malformed_lists_are_usage_errors_that_name_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and match in capsys.readouterr().err


# -- what a user who gives it something wrong sees: the real console script, one line, exit code 2

FASTFORGET = os.path.join(os.path.dirname(sys.executable), "fastforget")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real (tiny) checkpoint, a truncated copy of it, and an RGB image folder."""
    from PIL import Image

    from fastforget.train import LoopConfig, PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("cli")
    pretrain(PretrainConfig(device="cpu", loop=LoopConfig(out=str(root / "orig"), epochs=0.05, batch_size=32,
                                                           progress=False)))
    good = root / "orig" / "checkpoint.pt"
    (root / "truncated.pt").write_bytes(good.read_bytes()[:1000])
    for cls in ("cats", "dogs"):
        (root / "rgb" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(root / "rgb" / cls / f"{i}.png")
    (root / "a_file").write_text("not a directory")
    return root


CASES = {
    "missing checkpoint": (["unlearn", "--checkpoint", "{root}/missing.pt", "--forget-classes", "0"],
                           "fastforget unlearn: error: model file {root}/missing.pt does not exist"),
    "truncated checkpoint": (["unlearn", "--checkpoint", "{root}/truncated.pt", "--forget-classes", "0"],
                             "fastforget unlearn: error: model file {root}/truncated.pt cannot be read"),
    "missing data": (["unlearn", "--checkpoint", "{ckpt}", "--data", "{root}/nowhere", "--forget-classes", "0"],
                     "fastforget unlearn: error: --data directory '{root}/nowhere' does not exist"),
    "unknown class": (["unlearn", "--checkpoint", "{ckpt}", "--forget-classes", "0,11"],
                      "fastforget unlearn: error: unknown forget class '11'; known classes: 0, 1, 2"),
    "batch size 0": (["unlearn", "--checkpoint", "{ckpt}", "--forget-classes", "0", "--batch-size", "0"],
                     "fastforget unlearn: error: batch_size (--batch-size) must be an int >= 1, got 0"),
    "out is a file": (["unlearn", "--checkpoint", "{ckpt}", "--forget-classes", "0", "--out", "{root}/a_file/x"],
                      "fastforget unlearn: error: --out '{root}/a_file/x' cannot be made a directory"),
    "model does not fit the data": (["pretrain", "--model", "mae_vit_tiny", "--data", "{root}/rgb"],
                                    "fastforget pretrain: error: model mae_vit_tiny takes 1-channel images, but "
                                    "--data directory '{root}/rgb' gives RGB images (3 channels)"),
    "no cuda": (["pretrain", "--device", "cuda"], "fastforget pretrain: error: --device cuda: this machine has no CUDA"),
    "eval missing model": (["eval", "--models", "original={root}/missing.pt", "--forget-classes", "0",
                            "--retain-classes", "1"], "fastforget eval: error: model file {root}/missing.pt does not"),
    "eval unknown features": (["eval", "--models", "original={ckpt}", "--forget-classes", "0", "--retain-classes", "1",
                               "--features", "clip"], "fastforget eval: error: --features must be 'digits', 'encoder'"),
    "sweep weights": (["sweep", "--forget-weights", "x"], "fastforget sweep: error: --forget-weights must be"),
    "demo out": (["demo", "--out", "{root}/a_file/demo"], "fastforget demo: error: --out '{root}/a_file/demo' cannot"),
    "bench model": (["bench", "step", "--model", "mae_vit_gigantic"],
                    "fastforget bench: error: --model: unknown model 'mae_vit_gigantic'"),
    "bench group-norm shape": (["bench", "group-norm", "--shape", "2", "6", "4", "4"],
                               "fastforget bench: error: --shape: the channels must be a multiple of the 32 groups"),
    "eval classes": (["eval", "--models", "o={ckpt}", "--data", "{root}", "--classes", "{root}/nope.txt",
                      "--forget-classes", "0", "--retain-classes", "1"],
                     "fastforget eval: error: --classes file '{root}/nope.txt' does not exist"),
    "info backend": (["info"], "fastforget info: error: FASTFORGET_BACKEND must be one of"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_code_2(case, files):
    argv, expected = CASES[case]
    fill = {"root": str(files), "ckpt": str(files / "orig" / "checkpoint.pt")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTFORGET_BACKEND": "gpu" if case == "info backend" else ""}
    proc = subprocess.run([FASTFORGET, *(a.format(**fill) for a in argv)], capture_output=True, text=True,
                          cwd=files, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(expected.format(**fill))


def test_a_bug_keeps_its_traceback(tmp_path):
    """An exception that is not about what the user gave (here a RuntimeError injected into the
    loop) is fastforget's fault: its traceback stays."""
    script = tmp_path / "bug.py"
    script.write_text("import sys\nfrom fastforget import cli\nfrom fastforget.train import loop\n"
                      "def broken(*a, **k):\n    raise RuntimeError('an injected bug')\n"
                      "loop.optimizer_step = broken\nsys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, str(script), "pretrain", "--out", str(tmp_path / "run"), "--epochs", "0.05"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: an injected bug" in proc.stderr


def test_a_user_error_under_torchrun_reaches_its_error_file(tmp_path):
    """Both ranks meet the unknown class; the line is printed once, and torchrun's summary (read from
    the ranks' error files) names the error."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastforget.cli", "unlearn", "--checkpoint", str(tmp_path / "missing.pt"),
                           "--forget-classes", "0"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("fastforget unlearn: error: model file") == 1
    assert "MissingPath: model file" in proc.stderr  # torchrun's failure summary, from the error file
