"""fastforget eval: tasks, feature extractors and the reference's output formats."""
import csv
import json

import pytest
import torch

from fastforget.eval.features import Extractor, embed_all, extractor
from fastforget.eval.run import evaluate
from fastforget.families import get
from fastforget.models import create_mae
from fastforget.train.data import ImageSet


MAE = get("mae")


def test_tasks_remove_the_centre_or_the_border():
    model = create_mae("mae_vit_tiny")  # 8 x 8 patches
    inpaint = MAE.removed_patches(model, "inpaint", 0.5).view(8, 8)
    assert inpaint.sum() == 16 and inpaint[2:6, 2:6].all()
    assert torch.equal(MAE.removed_patches(model, "outpaint", 0.5).view(8, 8), ~inpaint)
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate({"original": model}, _sets(), _pixels(), ("colorize",))
    with pytest.raises(ValueError, match=r"ratio \(--ratio\) must be in \(0, 1\)"):
        evaluate({"original": model}, _sets(), _pixels(), ("inpaint",), ratio=1.5)


def test_completion_keeps_the_given_pixels():
    model = create_mae("mae_vit_tiny").eval()
    images = torch.rand(3, 1, 16, 16)
    out, region = MAE.complete(model, images, "inpaint", 0.5, seed=0), MAE.removed_region(model, "inpaint", 0.5)
    assert region.sum() == 64 and torch.equal(out * (1 - region), images * (1 - region))
    assert not torch.equal(out, images)


def _pixels(device="cpu"):
    """A stand-in extractor: the first pixels as features and logits."""
    return Extractor("fake", lambda x: (x.flatten(1)[:, :8], x.flatten(1)[:, :10]), labels=True,
                     device=torch.device(device))


def _sets(n=12):
    g = torch.Generator().manual_seed(0)
    return {s: ImageSet(torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g),
                        [str(i) for i in range(10)]) for s in ("retain", "forget")}


def test_evaluate_writes_the_reference_formats(tmp_path):
    models = {"original": create_mae("mae_vit_tiny"), "other": create_mae("mae_vit_tiny")}
    fake = Extractor("fake", lambda x: (x.flatten(1)[:, :8], x.flatten(1)[:, :10]), labels=True)
    report = evaluate(models, _sets(), fake, ("inpaint", "outpaint"), 0.5, str(tmp_path))
    row = report["inpaint"]["other"]["forget"]
    assert {"mse", "psnr", "fid", "is_mean", "is_std", "cosine", "accuracy"} <= set(row)
    rows = list(csv.reader(open(tmp_path / "fid_is_eval_inpaint.csv")))
    assert [r[0] for r in rows] == ["original", "other"] and len(rows[0]) == 7
    assert float(rows[1][4]) == pytest.approx(row["fid"])
    cos = list(csv.reader(open(tmp_path / "clip_cosine_outpaint.csv")))
    assert len(cos) == 2 and len(cos[0]) == 3
    assert json.load(open(tmp_path / "report.json"))["outpaint"]["original"]["retain"]["mse"] > 0
    for name in ("results.md", "grid_inpaint.png", "grid_outpaint.png", "tsne_inpaint.png"):
        assert (tmp_path / name).stat().st_size > 100, name


def test_batches_change_nothing_but_rounding():
    models = {"original": create_mae("mae_vit_tiny")}
    fake = Extractor("fake", lambda x: (x.flatten(1)[:, :8], x.flatten(1)[:, :10]), labels=True)
    whole = evaluate(models, _sets(), fake, ("inpaint",), 0.5)
    batched = evaluate(models, _sets(), fake, ("inpaint",), 0.5, batch_size=5)
    for s in ("retain", "forget"):
        for metric, value in whole["inpaint"]["original"][s].items():
            assert batched["inpaint"]["original"][s][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be an int >= 1, got 0"):
        evaluate(models, _sets(), fake, ("inpaint",), 0.5, batch_size=0)


@pytest.mark.gpu
def test_evaluation_on_the_gpu_matches_the_cpu():
    """Models and features on the GPU, metrics from what they return (8 features: FID well posed)."""
    models = {"original": create_mae("mae_vit_tiny").eval()}
    on_cpu = evaluate(models, _sets(), _pixels(), ("inpaint",), 0.5)
    on_gpu = evaluate({k: m.cuda() for k, m in models.items()}, _sets(), _pixels("cuda"), ("inpaint",), 0.5)
    for s in ("retain", "forget"):
        for metric, value in on_cpu["inpaint"]["original"][s].items():
            assert on_gpu["inpaint"]["original"][s][metric] == pytest.approx(value, rel=1e-3, abs=1e-4), metric
    images = _sets()["retain"].images
    for spec in ("digits", "encoder"):
        cpu = embed_all(extractor(spec, models["original"].cpu()), images)[0]
        gpu = embed_all(extractor(spec, models["original"].cuda(), device="cuda"), images)[0]
        assert gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_feature_extractors(tmp_path):
    images = torch.rand(4, 1, 16, 16)
    model = create_mae("mae_vit_tiny")
    feats, logits = extractor("encoder", model).embed(images)
    assert feats.shape == (4, 64) and logits is None

    class Inception(torch.nn.Module):  # the shape of clean-fid's TorchScript: features and logits
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299)
            return x.mean((2, 3)).repeat(1, 4), x.mean((2, 3))

    path = str(tmp_path / "inception.pt")
    torch.jit.script(Inception()).save(path)
    feats, logits = extractor(f"inception:{path}").embed(images)
    assert feats.shape == (4, 12) and logits.shape == (4, 3)
    with pytest.raises(FileNotFoundError, match="no TorchScript file"):
        extractor("inception:/nowhere.pt")
    with pytest.raises(ValueError, match="--features must be"):
        extractor("clip")
