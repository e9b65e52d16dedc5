"""The fastforget command."""
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
