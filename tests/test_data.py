"""Image folders: bad data is a clear error before training starts, or a counted skip."""
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (torchvision brings it)")

from fastforget.train import UnlearnConfig, unlearn
from fastforget.train import data as data_lib


def _folder(root, classes=("cat", "dog"), per_class=3, size=12):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_reads_an_image_folder(tmp_path):
    data = data_lib.load(str(_folder(tmp_path / "d")), 8)
    assert data.images.shape == (6, 3, 8, 8) and data.classes == ["cat", "dog"] and data.skipped == 0
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_file_is_named_or_skipped_when_asked(tmp_path, damage, capsys):
    root = _folder(tmp_path / "d")
    bad = root / "dog" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match=r"--data directory .*: 1 of 6 image files cannot be read: .*dog/1.png .*"
                                         r"--skip-bad-images"):
        data_lib.load(str(root), 8, what="--data directory")
    data = data_lib.load(str(root), 8, what="--data directory", skip_bad=True)
    assert len(data) == 5 and data.skipped == 1
    assert "skipped 1 unreadable image files of 6" in capsys.readouterr().out


def test_missing_or_empty_directories_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--proxy-data directory .*nowhere' does not exist"):
        data_lib.load(str(tmp_path / "nowhere"), 8, what="--proxy-data directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data directory .*empty' holds no images"):
        data_lib.load(str(tmp_path / "empty"), 8, what="--data directory")


def test_bad_data_stops_unlearning_before_it_starts(tmp_path):
    """Errors come from reading the data, before any model is touched or any file is written."""
    from fastforget.models import create_mae
    from fastforget.train.loop import LoopConfig, save_atomic

    rgb = {"in_chans": 3, "pixel_mean": (0.5,) * 3, "pixel_std": (0.5,) * 3}
    ckpt = str(tmp_path / "original.pt")
    save_atomic({"model": create_mae("mae_vit_tiny", **rgb).state_dict(), "optimizer": {}, "step": 0,
                 "config": {"model": "mae_vit_tiny", "overrides": rgb}}, ckpt)
    root = _folder(tmp_path / "d", size=16)
    out = tmp_path / "out"
    cases = [
        (dict(forget_classes=("bird",)), ValueError, "unknown forget class 'bird'; known classes: cat, dog"),
        (dict(forget_classes=()), ValueError, "forget classes must name at least one class"),
        (dict(forget_classes=("cat",), proxy_data=str(tmp_path / "gone")), FileNotFoundError,
         "--proxy-data directory .*gone' does not exist"),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            unlearn(UnlearnConfig(checkpoint=ckpt, data=str(root), device="cpu", **change,
                                  loop=LoopConfig(out=str(out), progress=False)))
        assert not out.exists()
