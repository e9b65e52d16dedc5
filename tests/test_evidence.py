"""Evidence of forgetting: the audit record and `fastforget verify`, the membership-inference test, and the claims on random splits."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import RGB_MAE, image_folder, rgb_mae_checkpoint
from fastforget import audit, cli
from fastforget.models import create_mae
from fastforget.train import LoopConfig, UnlearnConfig, unlearn
from fastforget.train import data as data_lib
from fastforget.train.loop import save_atomic


def _digits_checkpoint(tmp_path) -> str:
    ckpt = str(tmp_path / "original.pt")
    save_atomic({"model": create_mae("mae_vit_tiny").state_dict(), "optimizer": {}, "step": 0,
                 "config": {"model": "mae_vit_tiny", "overrides": {}}}, ckpt)
    return ckpt


def _run(ckpt, out, data="digits", forget=("0",), **loop):
    return unlearn(UnlearnConfig(checkpoint=ckpt, data=data, forget_classes=forget, device="cpu",
                                 loop=LoopConfig(out=str(out), epochs=1, batch_size=32, progress=False, **loop)))


def _verify(record, capsys) -> tuple[int, list[str]]:
    code = cli.main(["verify", str(record)])
    return code, capsys.readouterr().out.strip().splitlines()


def test_a_run_writes_a_record_that_verifies_and_a_changed_checkpoint_is_named(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    metrics = _run(ckpt, tmp_path / "run", forget=("0", "1"))
    record = json.load(open(tmp_path / "run" / "audit.json"))
    train = data_lib.load_digits()
    forget_rows = sorted(int(r) for r in train.rows[torch.isin(train.labels, torch.tensor([0, 1]))])
    assert sorted(record["forget"]["samples"]) == forget_rows and record["forget"]["count"] == len(forget_rows)
    assert record["forget"]["digest"] == audit.list_digest(record["forget"]["samples"])
    assert record["retain"]["count"] == len(forget_rows)  # retain ratio 1
    assert record["original"]["sha256"] == audit.sha256_file(ckpt)
    assert record["unlearned"]["sha256"] == audit.sha256_file(str(tmp_path / "run" / "checkpoint.pt"))
    assert record["data"]["digits_csv"]["sha256"] == audit.sha256_file(data_lib.DIGITS_CSV)
    assert record["method"] == "ours" and record["settings"]["forget_classes"] == ["0", "1"]
    assert record["final_losses"] == {k: v for k, v in metrics.items() if k.endswith("loss")}
    assert [p["from_step"] for p in record["parts"]] == [0] and record["started"] <= record["ended"]
    assert "does not certify" in record["scope"]
    code, out = _verify(tmp_path / "run" / "audit.json", capsys)
    assert code == 0 and out == [f"fastforget verify: {tmp_path}/run/audit.json: all 5 checks pass (every recorded "
                                 f"hash matches)"]
    with open(tmp_path / "run" / "checkpoint.pt", "ab") as f:
        f.write(b"!")
    code, out = _verify(tmp_path / "run" / "audit.json", capsys)
    assert code == 1 and len(out) == 2
    assert out[0].startswith(f"fastforget verify: unlearned checkpoint {tmp_path}/run/checkpoint.pt: changed "
                             f"(recorded sha256 {record['unlearned']['sha256'][:12]}..., now ")
    assert out[1] == f"fastforget verify: 1 of 5 checks failed for {tmp_path}/run/audit.json"


def test_a_changed_or_missing_forget_file_and_an_edited_list_are_caught_by_name(tmp_path, capsys):
    ckpt = rgb_mae_checkpoint(tmp_path)
    root = image_folder(tmp_path / "d", ("cat", "dog"), per_class=6, size=20, ext="jpg")
    _run(ckpt, tmp_path / "run", data=str(root), forget=("cat",))
    path = tmp_path / "run" / "audit.json"
    record = json.load(open(path))
    files = sorted(s["path"] for s in record["forget"]["samples"])
    assert files == sorted(str(root / "cat" / f"{i}.jpg") for i in range(6))
    assert all(s["sha256"] == audit.sha256_file(s["path"]) for s in record["retain"]["samples"])
    assert _verify(path, capsys)[0] == 0
    (root / "cat" / "2.jpg").write_bytes(b"another image")
    (root / "cat" / "4.jpg").unlink()
    code, out = _verify(path, capsys)
    assert code == 1 and len(out) == 3
    assert out[0].startswith(f"fastforget verify: forget file {root}/cat/2.jpg: changed (recorded sha256 ")
    assert out[1].startswith(f"fastforget verify: forget file {root}/cat/4.jpg: cannot be read (No such file")
    record["forget"]["samples"] = record["forget"]["samples"][1:]
    json.dump(record, open(path, "w"))
    code, out = _verify(path, capsys)
    assert code == 1 and "fastforget verify: forget set list: edited (its digest does not match the list)" in out


def test_a_resumed_runs_record_covers_the_whole_run(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    _run(ckpt, tmp_path / "run", stop_after=3)
    first = json.load(open(tmp_path / "run" / "audit.json"))
    assert [p["to_step"] for p in first["parts"]] == [3]
    _run(ckpt, tmp_path / "run", resume=True)
    record = json.load(open(tmp_path / "run" / "audit.json"))
    assert [(p["from_step"], p["to_step"]) for p in record["parts"]] == [(0, 3), (3, 8)]
    assert record["started"] == first["started"] and record["ended"] == record["parts"][1]["ended"]
    assert record["unlearned"]["sha256"] == audit.sha256_file(str(tmp_path / "run" / "checkpoint.pt"))
    assert _verify(tmp_path / "run" / "audit.json", capsys)[0] == 0


def test_eval_adds_its_metrics_and_the_models_hashes_to_the_record(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    _run(ckpt, tmp_path / "run")
    path = tmp_path / "run" / "audit.json"
    unlearned = str(tmp_path / "run" / "checkpoint.pt")
    assert cli.main(["eval", "--models", f"original={ckpt},ours={unlearned}", "--forget-classes", "0",
                     "--retain-classes", "2,3", "--task", "inpaint", "--features", "encoder", "--device", "cpu",
                     "--out", str(tmp_path / "eval"), "--audit", str(path)]) == 0
    record = json.load(open(path))
    (evaluation,) = record["evaluations"]
    assert evaluation["models"]["ours"]["sha256"] == record["unlearned"]["sha256"]
    report = json.load(open(tmp_path / "eval" / "report.json"))
    assert evaluation["report"] == report and evaluation["settings"]["forget_classes"] == ["0"]
    capsys.readouterr()
    assert _verify(path, capsys) == (0, [f"fastforget verify: {path}: all 7 checks pass (every recorded hash "
                                         f"matches)"])


def test_bad_records_are_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"kind": "something else"}')
    for record, message in ((tmp_path / "none.json", "does not exist"), (tmp_path / "bad.json", "cannot be read as "
                            "JSON"), (tmp_path / "other.json", "is not a fastforget unlearning record")):
        proc = subprocess.run([sys.executable, "-m", "fastforget.cli", "verify", str(record)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"fastforget verify: error: audit record '{record}' ") and message in proc.stderr


def test_the_mia_auc_is_mann_whitneys_with_ties_and_its_interval_holds_it():
    from fastforget.eval import mia

    members, unseen = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.4, 0.5, 0.3])
    assert mia.auc(members, unseen) == pytest.approx(10.5 / 12)  # 4 + 4 + 2 pairs below, one tie
    assert mia.auc(unseen, unseen) == pytest.approx(0.5) and mia.auc(unseen + 1, unseen) == 0.0
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(200, generator=gen, dtype=torch.float64), torch.rand(150, generator=gen, dtype=torch.float64)
    low, high = mia.bootstrap_interval(a * 0.8, b)
    assert low < mia.auc(a * 0.8, b) < high and high - low < 0.2


def _blocks(root, per_class: int, gen: torch.Generator):
    """Images of 4x4 blocks of random colours at 16x16: the removed centre's four blocks cannot be
    told from the rest, so only a model that memorised an image fills them in."""
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            x = torch.rand(4, 4, 3, generator=gen).repeat_interleave(4, 0).repeat_interleave(4, 1)
            Image.fromarray((x * 255).to(torch.uint8).numpy()).save(root / c / f"{i}.png")
    return root


def test_eval_mia_tells_memorised_training_images_from_unseen_ones(tmp_path, capsys):
    """An MAE trained for 800 steps on 20 block images tells them from 20 unseen ones of the same
    classes (AUC near 1); an untrained model is at chance."""
    from fastforget.train import PretrainConfig, pretrain

    gen = torch.Generator().manual_seed(0)
    train, test = _blocks(tmp_path / "train", 10, gen), _blocks(tmp_path / "test", 10, gen)
    pretrain(PretrainConfig(model="mae_vit_tiny", data=str(train), overrides=RGB_MAE, augment="none", task_masks=True,
                            device="cpu", loop=LoopConfig(out=str(tmp_path / "fit"), epochs=800, batch_size=20,
                                                          lr=3e-3, progress=False, log_every=10**6)))
    fresh = rgb_mae_checkpoint(tmp_path)
    fit = str(tmp_path / "fit" / "checkpoint.pt")
    assert cli.main(["eval", "--models", f"fit={fit},fresh={fresh}", "--data", str(test), "--members", str(train),
                     "--forget-classes", "a", "--retain-classes", "b", "--task", "inpaint", "--features", "encoder",
                     "--device", "cpu", "--mia", "--out", str(tmp_path / "eval")]) == 0
    report = json.load(open(tmp_path / "eval" / "report.json"))
    fit_auc, fresh_auc = report["mia"]["fit"], report["mia"]["fresh"]
    for s in ("forget", "retain"):
        assert fit_auc[s]["members"] == fit_auc[s]["non_members"] == 10
        assert fit_auc[s]["low"] <= fit_auc[s]["auc"] <= fit_auc[s]["high"]
        assert fit_auc[s]["auc"] > 0.9 and fresh_auc[s]["low"] < 0.5 < fresh_auc[s]["high"], report["mia"]
    results = open(tmp_path / "eval" / "results.md").read()
    assert "### membership inference (inpaint" in results and "| fit | " in results
    proc = subprocess.run([sys.executable, "-m", "fastforget.cli", "eval", "--models", f"a={fresh}", "--data",
                           str(test), "--forget-classes", "a", "--retain-classes", "b", "--mia"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--mia on an image directory needs --members DIR" in proc.stderr


def test_robustness_draws_distinct_splits_from_its_seed_and_reports_their_distribution(tmp_path):
    from fastforget.train import robustness
    from fastforget.train.demo import DemoConfig

    splits = robustness.draw_splits(8, seed=5)
    assert splits == robustness.draw_splits(8, seed=5) != robustness.draw_splits(8, seed=6)
    assert len({(tuple(s["forget"]), tuple(s["retain"])) for s in splits}) == 8
    for s in splits:
        assert len(s["forget"]) == 2 and len(s["retain"]) == 4 and len(s["proxy"]) == 4
        assert sorted(s["forget"] + s["retain"] + s["proxy"]) == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match=r"splits \(--splits\) must be an int in \[1, 100\]"):
        robustness.draw_splits(0, 0)
    cfg = DemoConfig(out=str(tmp_path), family="mae", pretrain_epochs=2, unlearn_epochs=1, eval_seeds=(0,))
    result = robustness.run(str(tmp_path), "mae", splits=2, seed=5, cfg=cfg)
    rows, summary = result["splits"], result["summary"]
    assert [r["split"] for r in rows] == splits[:2]
    for method in ("ours", "ours_proxy"):
        values = [r[method]["retain_fid"] for r in rows]
        assert summary[method]["retain_fid"]["worst"] == max(values)
        assert summary[method]["forget_fid"]["worst"] == min(r[method]["forget_fid"] for r in rows)
        assert rows[0][method]["forget_fid"] == pytest.approx(
            rows[0]["report"][method]["forget"]["fid"] / rows[0]["report"]["original"]["forget"]["fid"])
    assert [g["quantity"] for g in summary["ours"]["goals"]] == ["forget_fid", "retain_fid"]
    text = open(tmp_path / "robustness.md").read()
    assert "2 random splits (seed 5)" in text and "goals: ours forget fid >= 2:" in text
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    assert json.load(open(tmp_path / "robustness.json"))["seed"] == 5


def test_robustness_tries_other_settings_on_training_images_in_their_own_folders(tmp_path):
    from fastforget.train import robustness
    from fastforget.train.demo import DemoConfig, demo_sets

    base = DemoConfig(out=str(tmp_path), family="mae", pretrain_epochs=2, unlearn_epochs=1, eval_seeds=(0,))
    robustness.run(str(tmp_path), "mae", splits=1, seed=5, cfg=base)
    tried = DemoConfig(out=str(tmp_path), family="mae", pretrain_epochs=2, unlearn_epochs=2, eval_seeds=(0,),
                       unlearn={"forget_weight": 0.5, "lr": 1e-3})
    result = robustness.run(str(tmp_path), "mae", splits=1, seed=5, cfg=tried, images="train")
    assert result["setting"] == "epochs2-forget_weight0.5-lr0.001"  # the demo's blr gives way to the lr
    runs = sorted(p.name for p in (tmp_path / "split5-0").iterdir())
    assert runs == ["epochs1-blr0.02", "epochs2-forget_weight0.5-lr0.001"]
    saved = torch.load(tmp_path / "split5-0" / result["setting"] / "ours" / "checkpoint.pt", weights_only=True)
    assert saved["settings"]["forget_weight"] == 0.5 and saved["loop"]["lr"] == 1e-3 and saved["loop"]["epochs"] == 2
    split = result["splits"][0]["split"]
    train = demo_sets("train", split["forget"], split["retain"], robustness.TRAIN_PER_CLASS)
    test = demo_sets("test", split["forget"], split["retain"])
    assert len(train["forget"]) == 2 * robustness.TRAIN_PER_CLASS != len(test["forget"])
    everything = demo_sets("train", split["forget"], split["retain"])["forget"]
    for c in split["forget"]:  # each class's first 60 training images, in order
        assert torch.equal(train["forget"].images[train["forget"].labels == int(c)],
                           everything.images[everything.labels == int(c)][:robustness.TRAIN_PER_CLASS])
    name = f"robustness-train-{result['setting']}"
    assert "training images (60 a class)" in open(tmp_path / f"{name}.md").read()
    assert json.load(open(tmp_path / f"{name}.json"))["images"] == "train"
    assert json.load(open(tmp_path / "robustness.json"))["setting"] == "epochs1-blr0.02"  # the default's, kept
    longer = DemoConfig(out=str(tmp_path), family="mae", pretrain_epochs=2, unlearn_epochs=1, eval_seeds=(0,),
                        unlearn={"epochs": 2})  # --unlearn-epochs 2
    robustness.run(str(tmp_path), "mae", splits=1, seed=5, cfg=longer)  # only the epochs tried: named too
    assert json.load(open(tmp_path / "robustness-test-epochs2-blr0.02.json"))["setting"] == "epochs2-blr0.02"
    assert json.load(open(tmp_path / "robustness.json"))["setting"] == "epochs1-blr0.02"


@pytest.mark.parametrize("flag, value, message", [
    ("--forget-weight", "-1", "--forget-weight must be a finite number >= 0, got -1.0"),
    ("--forget-target", "2", "--forget-target must be a finite number > 0 and <= 1, got 2.0")])
def test_robustness_refuses_bad_settings_in_one_line(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, "-m", "fastforget.cli", "robustness", "--family", "mae", "--out",
                           str(tmp_path), flag, value], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert message in proc.stderr
    assert not (tmp_path / "original").exists()  # refused before anything was pretrained
