"""Image folders larger than the memory budget stream from disk, and train what the held ones do."""
import json
import re
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL.Image", reason="image folders need Pillow (torchvision brings it)")

from conftest import RGB_MAE, image_folder, rgb_mae_checkpoint
from fastforget.distributed import Dist
from fastforget.train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain, unlearn
from fastforget.train import batches as batches_lib, data as data_lib
from fastforget.train.loop import load_checkpoint


def _jpegs(root, classes=("cat", "dog", "fox"), per_class=10, size=24):
    return image_folder(root, classes, per_class, size, ext="jpg")


def test_streamed_batches_are_the_held_ones_on_every_rank_from_any_step(tmp_path):
    """Each rank's micro-batches over two epochs, streamed by 2 workers or none, equal the held
    ones bit for bit, started at step 0 or mid-epoch (a resumed run's first call)."""
    index = data_lib.load(str(_jpegs(tmp_path / "d")), 16)
    held = batches_lib.feed([index], memory_mb=100)
    streamed = batches_lib.feed([index], memory_mb=0, workers=2)
    assert held.images is not None and streamed.images is None and len(streamed.files) == 30

    def order(epoch):
        gen = torch.Generator().manual_seed(epoch)
        return torch.randperm(30, generator=gen), torch.rand(30, generator=gen) < 0.5

    loop = LoopConfig(out="unused", batch_size=3, accum_steps=2)
    keys = [(s, m) for s in range(4) for m in range(2)]  # steps_per_epoch 2: two epochs
    for rank in (0, 1):
        d = Dist(rank, 2)
        reference = held.batches(order, 2, loop, d)
        expected = [reference(*k) for k in keys]
        for workers, start in ((2, 0), (0, 3)):
            feed = batches_lib.Feed(streamed.parts, files=streamed.files, size=16, workers=workers)
            got = feed.batches(order, 2, loop, d)
            for (key, (images, is_forget)) in zip(keys[start:], expected[start:]):
                out_images, out_forget = got(*key)
                assert out_images.dtype == torch.float32 and torch.equal(out_images, images), (rank, key)
                assert torch.equal(out_forget, is_forget)
    assert not torch.equal(expected[0][0], held.batches(order, 2, loop, Dist(0, 2))(0, 1)[0])


def _unlearn(tmp_path, root, out, **kw):
    loop = dict(epochs=2, batch_size=4, progress=False, log_every=1)
    loop.update(kw.pop("loop", {}))
    return unlearn(UnlearnConfig(checkpoint=str(tmp_path / "original.pt"), data=str(root), forget_classes=("cat",),
                                 retain_classes=("dog", "fox"), device="cpu", augment="crop-flip",
                                 loop=LoopConfig(out=str(tmp_path / out), **loop), **kw))


def test_a_streaming_run_trains_the_in_memory_runs_parameters_bit_for_bit(tmp_path, capsys):
    """The same settings held (a budget that fits) and streamed (a tiny one), and streamed in two
    parts with --resume mid-epoch: the same parameters, bit for bit, and the same logged losses."""
    rgb_mae_checkpoint(tmp_path)
    root = _jpegs(tmp_path / "d")
    _unlearn(tmp_path, root, "held", data_memory_mb=64)
    assert "20 images at 18² take 0.0 MB decoded; the budget is 64.0 MB (--data-memory-mb): held" \
        in capsys.readouterr().out
    _unlearn(tmp_path, root, "streamed", data_memory_mb=0.01, data_workers=2)
    assert "streamed from disk by 2 worker processes" in capsys.readouterr().out
    _unlearn(tmp_path, root, "parts", data_memory_mb=0, loop=dict(stop_after=3, save_every=1))
    _unlearn(tmp_path, root, "parts", data_memory_mb=0, data_workers=1, loop=dict(resume=True, save_every=1))
    states = [load_checkpoint(str(tmp_path / run / "checkpoint.pt")) for run in ("held", "streamed", "parts")]
    assert states[0]["step"] == 10
    for state in states[1:]:
        assert state["step"] == 10
        assert all(torch.equal(state["model"][k], v) for k, v in states[0]["model"].items())
    logs = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")] for run in ("held", "parts")]
    assert logs[0] == logs[1]


def test_a_file_that_goes_bad_while_streaming_is_named_and_the_last_checkpoint_kept(tmp_path, monkeypatch):
    """A file readable at the start and damaged later (here in the worker, just before step 4's
    batch reads it) stops the run with its name and the step; the checkpoint of step 4 is whole."""
    rgb_mae_checkpoint(tmp_path)
    root = _jpegs(tmp_path / "d")
    index = data_lib.load(str(root), 18)
    sets = data_lib.select(index, ["cat"], ["dog", "fox"])
    order, _ = data_lib.stream(sets, 0, 0)  # step 4 of epoch 0 starts at row 16
    files = sets.forget.files + sets.retain.files
    victim = files[order[16]]
    read = batches_lib._Files.__getitem__

    def damaging(self, key):  # runs in the forked worker
        if key[0] == 4:
            with open(victim, "wb") as f:
                f.write(b"not a JPEG any more")
        return read(self, key)

    monkeypatch.setattr(batches_lib._Files, "__getitem__", damaging)
    with pytest.raises(OSError, match=rf"image file {re.escape(victim)} \(UnidentifiedImageError.*\) could not be read at step 4 "
                                      rf"\(it was readable when the run started\); stopped there, and the last "
                                      rf"checkpoint is .*checkpoint.pt \(step 4\)"):
        _unlearn(tmp_path, root, "run", data_memory_mb=0, data_workers=1, loop=dict(save_every=2))
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 4


def test_bad_files_are_named_before_streaming_starts_or_skipped_as_held_runs_skip_them(tmp_path):
    rgb_mae_checkpoint(tmp_path)
    root = _jpegs(tmp_path / "d")
    (root / "dog" / "3.jpg").write_bytes((root / "dog" / "3.jpg").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"1 of 10 image files cannot be read: .*dog/3.jpg"):
        _unlearn(tmp_path, root, "bad", data_memory_mb=0)
    assert not (tmp_path / "bad").exists()
    _unlearn(tmp_path, root, "held", data_memory_mb=64, skip_bad_images=True, loop=dict(epochs=1))
    _unlearn(tmp_path, root, "streamed", data_memory_mb=0, skip_bad_images=True, loop=dict(epochs=1))
    held, streamed = (load_checkpoint(str(tmp_path / r / "checkpoint.pt"))["model"] for r in ("held", "streamed"))
    assert all(torch.equal(streamed[k], v) for k, v in held.items())


@pytest.mark.parametrize("model,overrides", [
    ("mae_vit_tiny", RGB_MAE),
    ("palette_tiny", {"in_channel": 6, "out_channel": 3}),
    ("mage_tiny", {"vqgan": {"in_channels": 3, "out_ch": 3}}),
])
def test_every_family_pretrains_the_same_from_a_stream(tmp_path, model, overrides):
    root = _jpegs(tmp_path / "d", per_class=6, size=20)
    states = []
    for run, memory in (("held", 64), ("streamed", 0)):
        pretrain(PretrainConfig(model=model, data=str(root), overrides=overrides, device="cpu", data_memory_mb=memory,
                                data_workers=1, loop=LoopConfig(out=str(tmp_path / run), epochs=1, batch_size=4,
                                                                stop_after=3, progress=False)))
        states.append(load_checkpoint(str(tmp_path / run / "checkpoint.pt")))
    assert states[1]["step"] == 3
    assert all(torch.equal(states[1]["model"][k], v) for k, v in states[0]["model"].items())


def test_budget_and_worker_settings_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"data_memory_mb \(--data-memory-mb\) must be None or a number >= 0"):
        UnlearnConfig(checkpoint="x", data_memory_mb=-1)
    with pytest.raises(ValueError, match=r"data_workers \(--data-workers\) must be None or an int >= 0"):
        PretrainConfig(data_workers=1.5)
    proc = subprocess.run([sys.executable, "-m", "fastforget.cli", "pretrain", "--data-memory-mb", "-2",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "fastforget pretrain: error: data_memory_mb (--data-memory-mb) must be None or a number >= 0 (0: always "
        "stream), got -2.0"]
    budget, why = batches_lib.memory_budget(None)
    assert 0 < budget < batches_lib.free_memory_bytes() and why.startswith("the default: half the")


PEAK = r"""
import json, resource, sys, torch
from fastforget.distributed import Dist
from fastforget.train import LoopConfig, batches as batches_lib, data as data_lib

root, size, memory_mb = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
index = data_lib.load(root, size)
rss = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) // 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here on
feed = batches_lib.feed([index], memory_mb=memory_mb, workers=2)
order = lambda epoch: (torch.randperm(len(index), generator=torch.Generator().manual_seed(epoch)), None)
batches = feed.batches(order, len(index) // 16, LoopConfig(out="unused", batch_size=16), Dist())
total = sum(float(batches(step, 0)[0].sum()) for step in range(2 * (len(index) // 16)))
del batches
print(json.dumps({"growth_mb": rss("VmHWM:") - before, "streamed": feed.images is None, "total": total}))
"""


def test_streaming_memory_stays_flat_however_large_the_set(tmp_path):
    """Two epochs of 600 images at 160² (46 MB decoded) under an 8 MB budget: the process's peak
    grows by less than the budget plus a fixed overhead; holding the same set grows it by the set
    (so this test could fail)."""
    root = image_folder(tmp_path / "d", ("a", "b", "c"), per_class=200, size=16, ext="jpg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode, memory_mb in (("streamed", 8), ("held", 1000)):
        proc = subprocess.run([sys.executable, "-c", PEAK, str(root), "160", str(memory_mb)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    set_mb = 600 * 3 * 160 * 160 / 2**20
    assert runs["streamed"]["streamed"] and not runs["held"]["streamed"]
    assert runs["streamed"]["total"] == runs["held"]["total"]
    assert runs["held"]["growth_mb"] > set_mb, runs
    assert runs["streamed"]["growth_mb"] < 8 + 16, runs


def test_two_ranks_streaming_train_what_two_ranks_holding_train(tmp_path):
    """torchrun, 2 CPU ranks, each streaming its rows with a worker of its own: the held run's
    parameters bit for bit (gloo sums the same gradients in the same order). Each rank checks half
    the files; both skip the damaged file the other found."""
    ckpt = rgb_mae_checkpoint(tmp_path)
    root = _jpegs(tmp_path / "d")
    for damaged in ("dog/3.jpg", "fox/4.jpg"):  # one in each rank's half of the checked files
        (root / damaged).write_text("damaged")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run, memory in (("held", "64"), ("streamed", "0")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "fastforget.cli", "unlearn", "--checkpoint", ckpt, "--data", str(root),
                               "--forget-classes", "cat", "--retain-classes", "dog,fox", "--device", "cpu",
                               "--epochs", "1", "--batch-size", "2", "--data-memory-mb", memory, "--data-workers", "1",
                               "--skip-bad-images", "--out", str(tmp_path / run)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("skipped 2 unreadable image files of 10") == 1, proc.stdout
    held, streamed = (load_checkpoint(str(tmp_path / r / "checkpoint.pt")) for r in ("held", "streamed"))
    assert streamed["step"] == 5
    assert all(torch.equal(streamed["model"][k], v) for k, v in held["model"].items())


@pytest.mark.gpu
def test_streamed_batches_reach_the_gpu_as_the_held_ones(tmp_path):
    """Pinned uint8 pixels, converted on the GPU: the held batches (staged on the GPU) bit for bit."""
    index = data_lib.load(str(_jpegs(tmp_path / "d")), 16)
    order = lambda epoch: (torch.randperm(30, generator=torch.Generator().manual_seed(epoch)), None)  # noqa: E731
    loop, d = LoopConfig(out="unused", batch_size=5), Dist(device=torch.device("cuda"))
    held = batches_lib.feed([index], memory_mb=100).batches(order, 6, loop, d)
    streamed = batches_lib.feed([index], memory_mb=0, workers=2).batches(order, 6, loop, d)
    for step in range(12):
        (a,), (b,) = held(step, 0), streamed(step, 0)
        assert a.is_cuda and b.is_cuda and torch.equal(a, b)
