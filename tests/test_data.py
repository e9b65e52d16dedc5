"""Image folders: bad data is a clear error before training starts, or a counted skip."""
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (torchvision brings it)")

from conftest import image_folder, rgb_mae_checkpoint
from fastforget.train import UnlearnConfig, unlearn
from fastforget.train import data as data_lib


def test_reads_an_image_folder_only_where_chosen(tmp_path):
    index = data_lib.load(str(image_folder(tmp_path / "d")), 8)
    assert index.images is None and len(index.files) == 6 and index.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "d" / "cat" / "0.png").write_text("damaged, but never chosen")
    dogs = data_lib.decode(index.subset(torch.tensor([3, 5])))
    assert dogs.images.shape == (2, 3, 8, 8) and dogs.labels.tolist() == [1, 1] and dogs.classes == ["cat", "dog"]
    data = data_lib.decode(data_lib.load(str(image_folder(tmp_path / "e")), 8))
    assert data.images.shape == (6, 3, 8, 8) and data.skipped == 0


def test_folder_images_are_held_as_pixels_and_used_as_torchvisions_floats(tmp_path):
    """uint8 in memory (a quarter of float32's), in file order whatever the threads; a batch's
    floats are bit for bit what ToTensor gives."""
    from torchvision import transforms

    index = data_lib.load(str(image_folder(tmp_path / "d", per_class=5, size=20)), 8)
    data = data_lib.decode(index)
    assert data.images.dtype == torch.uint8 and data.labels.tolist() == [0] * 5 + [1] * 5
    to_tensor = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    for file, pixels in zip(index.files, data.images):
        with Image.open(file) as img:
            assert torch.equal(data_lib.unit_float(pixels), to_tensor(img.convert("RGB")))
    digits = data_lib.load_digits()
    assert data_lib.unit_float(digits.images) is digits.images  # float images as they are


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_file_is_named_or_skipped_when_asked(tmp_path, damage, capsys):
    root = image_folder(tmp_path / "d")
    bad = root / "dog" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_text("this is text, not a PNG")
    index = data_lib.load(str(root), 8, what="--data directory")
    with pytest.raises(ValueError, match=r"--data directory .*: 1 of 6 image files cannot be read: .*dog/1.png .*"
                                         r"--skip-bad-images"):
        data_lib.decode(index)
    data = data_lib.decode(index, skip_bad=True)
    assert len(data) == 5 and data.skipped == 1
    assert "skipped 1 unreadable image files of 6" in capsys.readouterr().out


def test_places365_selection_class_list_ranges_caps_and_the_retain_cut(tmp_path):
    """Places365's layout (class folders two levels down, named by class.txt), the reference's
    per-class cap (first files in sorted order), classes by index range, and its retain list cut
    at the end to the forget count."""
    root = tmp_path / "train_256"
    names = ("a/airfield", "b/badlands", "b/bakery/shop", "c/cafe")
    for name in names:
        image_folder(root, (name,), per_class=4, size=8)
    (root / "a" / "airfield" / "notes.txt").write_text("not an image")
    class_txt = tmp_path / "class.txt"
    class_txt.write_text("/b/badlands\n/a/airfield 1\n\n/b/bakery/shop\n/c/cafe\n")
    data = data_lib.load(str(root), 8, class_list=str(class_txt), per_class=3)
    assert data.classes == ["b/badlands", "a/airfield", "b/bakery/shop", "c/cafe"]
    assert data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert [f.rsplit("/", 1)[1] for f in data.files[:3]] == ["0.png", "1.png", "2.png"]
    assert data_lib.class_indices(data, ["1-2", "c/cafe"], "retain") == [1, 2, 3]
    sets = data_lib.select(data, ["0"], ["1-3"], retain_pick="first")
    assert len(sets.retain) == 3 and sets.retain.labels.tolist() == [1, 1, 1]  # the last classes lose images
    with pytest.raises(ValueError, match=r"unknown forget class '2-9'"):
        data_lib.class_indices(data, ["2-9"], "forget")
    (tmp_path / "bad.txt").write_text("/a/airfield\n/z/zoo\n")
    with pytest.raises(FileNotFoundError, match=r"has no folder 'z/zoo' \(line 2 of"):
        data_lib.load(str(root), 8, class_list=str(tmp_path / "bad.txt"))
    with pytest.raises(ValueError, match="--classes and --per-class select an image directory's classes"):
        data_lib.load("digits", 8, per_class=3)
    with pytest.raises(ValueError, match=r"retain_pick \(--retain-pick\) must be one of"):
        data_lib.select(data, ["0"], ["1"], retain_pick="last")


def test_missing_or_empty_directories_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--proxy-data directory .*nowhere' does not exist"):
        data_lib.load(str(tmp_path / "nowhere"), 8, what="--proxy-data directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data directory .*empty' holds no images"):
        data_lib.load(str(tmp_path / "empty"), 8, what="--data directory")


def test_bad_data_stops_unlearning_before_it_starts(tmp_path):
    """Errors come from reading the data, before any model is touched or any file is written."""
    from fastforget.train.loop import LoopConfig

    ckpt = rgb_mae_checkpoint(tmp_path)
    root = image_folder(tmp_path / "d", size=16)
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


def test_unlearning_on_image_folders_reads_only_the_chosen_files(tmp_path):
    """Forget 'cat' with the real 'dog' retain set and a proxy folder: a damaged file of a class that
    is not chosen is never read; one in the forget set stops the run before it starts, unless
    skipped."""
    from fastforget.train.loop import LoopConfig, load_checkpoint

    ckpt = rgb_mae_checkpoint(tmp_path)
    root = image_folder(tmp_path / "d", classes=("cat", "dog", "fox"), per_class=8, size=16)
    proxy = image_folder(tmp_path / "p", classes=("owl",), per_class=8, size=16)
    (root / "fox" / "0.png").write_text("damaged, never chosen")

    def run(out, **kw):
        return unlearn(UnlearnConfig(checkpoint=ckpt, data=str(root), forget_classes=("cat",), device="cpu",
                                     loop=LoopConfig(out=str(tmp_path / out), epochs=1, batch_size=4,
                                                     progress=False), **kw))

    run("real", retain_classes=("dog",))
    run("proxy", proxy_data=str(proxy))
    assert load_checkpoint(str(tmp_path / "proxy" / "checkpoint.pt"))["step"] == 4
    (root / "cat" / "1.png").write_text("damaged, in the forget set")
    with pytest.raises(ValueError, match=r"--data directory .*1 of 8 image files cannot be read: .*cat/1.png"):
        run("bad", retain_classes=("dog",))
    assert not (tmp_path / "bad").exists()
    run("skipped", retain_classes=("dog",), skip_bad_images=True)
    assert (tmp_path / "skipped" / "checkpoint.pt").exists()


def test_eval_scores_models_on_image_folders(tmp_path):
    from fastforget.eval.run import evaluate_checkpoints

    ckpt = rgb_mae_checkpoint(tmp_path)
    root = image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=10, size=16)
    report = evaluate_checkpoints({"original": ckpt, "again": ckpt}, str(root), ("cat",), ("dog",), ("inpaint",),
                                  0.5, "encoder", str(tmp_path / "eval"))
    row = report["inpaint"]["again"]["forget"]
    assert row["mse"] > 0 and row["fid"] == pytest.approx(report["inpaint"]["original"]["forget"]["fid"])


@pytest.mark.gpu
def test_pixels_become_the_same_floats_on_the_gpu():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(data_lib.unit_float(pixels.cuda()).cpu(), data_lib.unit_float(pixels))


@pytest.mark.gpu
def test_unlearning_on_an_image_folder_on_the_gpu(tmp_path):
    """uint8 pixels staged on the GPU, cropped and flipped there (the image folders' default)."""
    from fastforget.train.loop import LoopConfig, load_checkpoint

    ckpt = rgb_mae_checkpoint(tmp_path)
    root = image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=8, size=20)
    unlearn(UnlearnConfig(checkpoint=ckpt, data=str(root), forget_classes=("cat",), device="cuda",
                          loop=LoopConfig(out=str(tmp_path / "run"), epochs=1, batch_size=4, progress=False)))
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 4
