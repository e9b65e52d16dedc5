"""The fastforget command."""
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
def test_bad_training_settings_are_named_before_any_work(argv, match):
    """Checked when the config is made: no checkpoint is read, no data loaded."""
    with pytest.raises(ValueError, match=match):
        cli.main(argv)


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
