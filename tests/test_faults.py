"""Faults an unlearning run must survive: kills, damaged or hostile files, NaN, a failing rank.

Every kill here is a real SIGKILL of a real subprocess; every damaged file is a real file."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from fastforget.models import load_mae
from fastforget.train import LoopConfig, PretrainConfig, pretrain
from fastforget.train.loop import Dist, load_checkpoint, run, save_atomic
from fastforget.weights import load_weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("original")
    pretrain(PretrainConfig(device="cpu", loop=LoopConfig(out=str(out), epochs=0.1, batch_size=32, progress=False)))
    return str(out / "checkpoint.pt")


# -- checkpoints and model files --------------------------------------------------------------

def _damaged(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]
    elif how == "empty":
        data = b""
    else:
        data = b"not a checkpoint at all\n" * 10
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["truncated", "flipped", "empty", "garbage"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, how):
    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"model": {"w": torch.randn(64, 64)}, "optimizer": {}, "step": 1}, path)
    assert load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]
    _damaged(path, how)
    with pytest.raises(ValueError, match=f"checkpoint {path} (cannot be read|is corrupted)"):
        load_checkpoint(path)


def test_missing_file_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file .*nothing.pt does not exist"):
        load_mae(str(tmp_path / "nothing.pt"))


class _Payload:
    """Pickles as a call to os.system: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("loader", ["checkpoint", "model", "weights"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, loader):
    marker, path = tmp_path / "ran", str(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {}, "step": 1, "config": _Payload(marker)}, path)
    load = {"checkpoint": load_checkpoint, "model": load_mae, "weights": load_weights}[loader]
    with pytest.raises(ValueError, match="was refused: it carries pickled objects"):
        load(path)
    assert not marker.exists()


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """The writer is killed with half the new file written: the old checkpoint loads, whole; the
    next run removes the orphaned temporary."""
    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"model": {"w": torch.zeros(3)}, "optimizer": {}, "step": 1}, path)
    writer = f"""
import io, time, torch
from fastforget.train.loop import save_atomic
real = torch.save
def half_then_hang(obj, f):
    buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
    f.write(data[:len(data) // 2]); f.flush(); print("half written", flush=True); time.sleep(120)
torch.save = half_then_hang
save_atomic({{"model": {{"w": torch.ones(1 << 20)}}, "optimizer": {{}}, "step": 2}}, {path!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "half written"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith("checkpoint.pt.tmp.")]
    assert len(leftovers) == 1
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))
    os.makedirs(tmp_path / "next")
    os.replace(tmp_path / leftovers[0], tmp_path / "next" / leftovers[0])
    model = nn.Linear(2, 1)
    run(LoopConfig(out=str(tmp_path / "next"), epochs=1, progress=False), Dist(), model, model, 1,
        lambda step, micro: (torch.ones(4, 2),), lambda batch, gen, m: {"loss": m(batch[0]).sum()}, dict)
    assert set(os.listdir(tmp_path / "next")) == {"checkpoint.pt", "metrics.jsonl"}


# -- NaN and Inf ----------------------------------------------------------------------------

def _toy_run(out, bad_from, kind, **loop):
    """10 steps of a linear model; from step bad_from the loss (kind="loss") or only the gradient
    (kind="grad": sqrt at 0) is not finite."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)

    def batches(step, micro):
        return torch.randn(8, 4, generator=torch.Generator().manual_seed(step)), step

    def loss_fn(batch, gen, m):
        x, step = batch
        loss = (m(x) ** 2).mean()
        if step >= bad_from:
            loss = loss * float("nan") if kind == "loss" else loss + torch.sqrt(m.weight.sum() * 0)
        return {"loss": loss}

    cfg = LoopConfig(out=str(out), epochs=10, batch_size=8, save_every=2, progress=False, **loop)
    return run(cfg, Dist(), model, model, 1, batches, loss_fn, dict)


@pytest.mark.parametrize("kind", ["loss", "grad"])
@pytest.mark.parametrize("bad_from,log_every,accum,stops_at", [(5, 10, 1, 6), (4, 5, 1, 5), (5, 10, 2, 6)],
                         ids=["found-at-save", "found-at-log", "accumulating"])
def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, kind, bad_from, log_every, accum,
                                                                  stops_at):
    _toy_run(tmp_path, bad_from=99, kind=kind, stop_after=4, log_every=log_every, accum_steps=accum)
    good = open(tmp_path / "checkpoint.pt", "rb").read()
    with pytest.raises(FloatingPointError, match=rf"stopped at step {stops_at}: a loss, gradient norm or parameter "
                                                 rf"became NaN or Inf after step 4 .*checkpoint.pt \(step 4\)"):
        _toy_run(tmp_path, bad_from=bad_from, kind=kind, resume=True, log_every=log_every, accum_steps=accum)
    assert open(tmp_path / "checkpoint.pt", "rb").read() == good
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 4


# -- SIGKILL and resume ----------------------------------------------------------------------

UNLEARN = ["-m", "fastforget.cli", "unlearn", "--forget-classes", "0,1", "--retain-classes", "2,3", "--epochs", "3",
           "--batch-size", "16", "--blr", "1e-3", "--device", "cpu", "--log-every", "1", "--save-every", "1"]


def _steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = [line for line in open(path).read().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def test_sigkill_at_random_steps_then_resume_ends_bitwise_where_an_unbroken_run_does(original, tmp_path):
    whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
    done = subprocess.run([sys.executable, *UNLEARN, "--checkpoint", original, "--out", whole], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    total = load_checkpoint(os.path.join(whole, "checkpoint.pt"))["step"]
    assert total >= 20
    rng = random.Random(20261129)
    kills = sorted(rng.sample(range(2, total - 4), 3))
    killed_at = []
    for k in kills:
        resumed_from = _steps_logged(broken)  # the new process logs steps after this one
        proc = subprocess.Popen([sys.executable, *UNLEARN, "--checkpoint", original, "--out", broken, "--resume"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _steps_logged(broken) < max(k, resumed_from + 1) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, "the run ended before the kill: make it longer"
        killed_at.append(_steps_logged(broken))
    assert killed_at == sorted(killed_at) and killed_at[-1] < total
    final = subprocess.run([sys.executable, *UNLEARN, "--checkpoint", original, "--out", broken, "--resume"],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    a = load_checkpoint(os.path.join(whole, "checkpoint.pt"))
    b = load_checkpoint(os.path.join(broken, "checkpoint.pt"))
    assert a["step"] == b["step"] == total
    for group in ("model",):
        for name, value in a[group].items():
            assert torch.equal(value, b[group][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][key]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- DDP -------------------------------------------------------------------------------------

def test_a_failing_rank_stops_the_whole_run_with_its_error(original, tmp_path):
    """Rank 1 raises at its third optimizer step; torchrun must end (no hang) and report it."""
    script = tmp_path / "failing_rank.py"
    script.write_text(
        "import os, sys\n"
        "from fastforget import cli\n"
        "from fastforget.train import loop\n"
        "if os.environ['RANK'] == '1':\n"
        "    real, calls = loop.optimizer_step, [0]\n"
        "    def failing(*args, **kwargs):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:\n"
        "            raise RuntimeError('injected failure on rank 1 at step 3')\n"
        "        return real(*args, **kwargs)\n"
        "    loop.optimizer_step = failing\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    args = [a for a in UNLEARN[2:]] + ["--checkpoint", original, "--out", str(tmp_path / "run")]
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 3" in proc.stdout + proc.stderr
    assert time.time() - start < 120


def test_nan_on_one_rank_stops_every_rank_with_the_message(original, tmp_path):
    """Rank 1's loss turns NaN at its third step: both ranks stop with the trainer's message (they
    agree through an all-reduce), and the checkpoint rank 0 wrote before stays as it was."""
    script = tmp_path / "nan_rank.py"
    script.write_text(
        "import os, sys\n"
        "from fastforget import cli\n"
        "import importlib\n"
        "unlearn = importlib.import_module('fastforget.train.unlearn')\n"
        "if os.environ['RANK'] == '1':\n"
        "    real, calls = unlearn.unlearn_loss, [0]\n"
        "    def poisoned(*args, **kwargs):\n"
        "        calls[0] += 1\n"
        "        out = real(*args, **kwargs)\n"
        "        return out._replace(loss=out.loss * float('nan')) if calls[0] >= 3 else out\n"
        "    unlearn.unlearn_loss = poisoned\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    args = [a for a in UNLEARN[2:]] + ["--checkpoint", original, "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], env=ENV, capture_output=True, text=True, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("stopped at step 3: a loss, gradient norm or parameter became NaN or Inf after step 2") >= 2, \
        text[-3000:]
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
