"""`fastforget demo` (`make demo`): the main job on the embedded digits, end to end, per family.

For a family (--family; all of them by default, each under DIR/<family>): pretrains its demo model
on all ten digits (cached in DIR/<family>/original), unlearns the forget digits {0, 1} with the real
retain digits {2, 3, 4, 5} ("ours") and with the proxy digits {6, 7, 8, 9} instead
("ours_proxy"), then evaluates every model on the test images with the paper's metrics on the
family's tasks (fastforget eval, digits features; sampler-based families averaged over several
seeds), plus the family's own quick numbers (MAE: removed-patch MSE at random masks). Writes
report.json, results.md, the CSVs and labelled pictures.

With baselines, the reference's four baselines train too (same data, steps and learning rate as
ours) and join the tables. The settings are each family's DemoSettings, chosen on the training
images, never on the test split.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import families
from ..console import say
from . import data as data_lib
from .loop import LoopConfig, output_dir
from .unlearn import PretrainConfig, UnlearnConfig, pretrain, unlearn

FORGET, RETAIN, PROXY = ("0", "1"), ("2", "3", "4", "5"), ("6", "7", "8", "9")
BASELINES = ("max-loss", "noisy-label", "retain-label", "random-encoder")
LOOP_FIELDS = ("blr", "lr", "min_lr", "weight_decay", "betas", "schedule", "warmup_fraction", "clip_grad")


@dataclass
class DemoConfig:
    out: str = "demo-out"
    family: str = "mae"
    baselines: bool = False
    seed: int = 0
    # None: the family's DemoSettings (tests shorten them; pretrain_epochs: every part's)
    pretrain_epochs: Optional[float] = None
    unlearn_epochs: Optional[float] = None
    batch_size: Optional[int] = None
    eval_seeds: Optional[tuple] = None
    sample_steps: Optional[int] = None  # diffusion models: a strided sampler (None: the model's whole schedule)
    # Unlearning settings over the family's DemoSettings (epochs, LoopConfig fields such as lr, and
    # UnlearnConfig options such as forget_weight): what `fastforget robustness` tries.
    unlearn: dict = field(default_factory=dict)

    def settings(self, family: families.Family):
        s = family.demo
        return (self.pretrain_epochs or s.pretrain_epochs, self.unlearn_epochs or s.unlearn_epochs,
                self.batch_size or s.batch_size)

    def unlearning(self, family: families.Family) -> tuple[float, dict]:
        """(epochs, options): the family's demo unlearning with this config's settings over it (an lr
        replaces a blr)."""
        base = dict(family.demo.unlearn)
        if "lr" in self.unlearn or "blr" in self.unlearn:
            base.pop("lr", None), base.pop("blr", None)
        options = {**base, **self.unlearn}
        return options.pop("epochs", self.settings(family)[1]), options


def _split(options: dict) -> tuple[dict, dict]:
    """A DemoSettings dict as (LoopConfig fields, the run config's own options)."""
    return ({k: v for k, v in options.items() if k in LOOP_FIELDS},
            {k: v for k, v in options.items() if k not in LOOP_FIELDS})


def ensure_original(cfg: DemoConfig) -> str:
    """DIR/original/checkpoint.pt: the family's demo model pretrained on all ten digits, made once
    and reused."""
    family = families.get(cfg.family)
    path = os.path.join(cfg.out, "original", "checkpoint.pt")
    if os.path.exists(path):
        say(f"reusing the pretrained model in {path}")
        return path
    epochs, _, batch = cfg.settings(family)
    init = None
    for part, part_epochs, part_options in family.demo.pretrain_first:  # MAGE's tokenizer, then the model
        init = _pretrain_part(cfg, part, cfg.pretrain_epochs or part_epochs, part_options, batch,
                              os.path.join(cfg.out, "original", part))
    final = family.pretrain_parts[-1]
    return _pretrain_part(cfg, final, epochs, family.demo.pretrain, batch, os.path.dirname(path), init)


def _pretrain_part(cfg: DemoConfig, part: str, epochs: float, options: dict, batch: int, out: str,
                   init: Optional[str] = None) -> str:
    family = families.get(cfg.family)
    path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(path):
        say(f"reusing the pretrained {part} in {path}")
        return path
    loop, options = _split(options)
    what = family.demo.model if part == "model" else f"{family.demo.model}'s {part}"
    say(f"pretraining {what} on the digits ({epochs:g} epochs)")
    pretrain(PretrainConfig(model=family.demo.model, device="cpu", part=part, init=init, **options, loop=LoopConfig(
        out=out, epochs=epochs, batch_size=batch, seed=cfg.seed, log_every=50, **loop)))
    return path


def unlearn_digits(cfg: DemoConfig, original: str, out: str, forget=FORGET, **run) -> None:
    """One unlearning run of the forget digits (the demo's by default) with the family's demo settings."""
    family = families.get(cfg.family)
    batch = cfg.settings(family)[2]
    epochs, options = cfg.unlearning(family)
    loop, options = _split(options)
    unlearn(UnlearnConfig(checkpoint=original, forget_classes=forget, device="cpu", **{**options, **run},
                          loop=LoopConfig(out=out, epochs=epochs, batch_size=batch, seed=cfg.seed, log_every=50,
                                          **loop)))


def demo_sets(split: str = "test", forget=FORGET, retain=RETAIN, per_class: Optional[int] = None) -> dict:
    """The forget and retain digits of a split: the test images (the metrics'), or the training
    images (the membership-inference test's members; the images settings are chosen on), each
    class's first per_class only when given."""
    data = data_lib.load_digits(split, 16)

    def rows(classes) -> torch.Tensor:
        picked = [(data.labels == int(c)).nonzero()[:, 0][:per_class] for c in classes]
        return torch.cat(picked).sort().values

    return {s: data.subset(rows(classes)) for s, classes in (("forget", forget), ("retain", retain))}


def run(cfg: DemoConfig) -> dict:
    """The demo of one family (cfg.family), or of each under cfg.out/<family> ("all")."""
    if cfg.family == "all":
        from dataclasses import replace

        output_dir(cfg.out)
        return {name: run(replace(cfg, family=name, out=os.path.join(cfg.out, name))) for name in families.FAMILIES}
    from ..eval.features import extractor
    from ..eval import mia
    from ..eval.run import evaluate, markdown

    t0 = time.perf_counter()
    family = families.get(cfg.family)
    output_dir(cfg.out)
    original = ensure_original(cfg)
    runs = {"ours": dict(retain_classes=RETAIN), "ours_proxy": dict(proxy_classes=PROXY)}
    if cfg.baselines:
        runs.update({m: dict(retain_classes=RETAIN, method=m) for m in BASELINES})
    for name, classes in runs.items():
        say(f"unlearning digits {', '.join(FORGET)} ({name}, {cfg.settings(family)[1]:g} epochs)")
        unlearn_digits(cfg, original, os.path.join(cfg.out, name), **classes)

    sets = demo_sets()
    models = {"original": families.load(original)}
    models.update({name: families.load(os.path.join(cfg.out, name, "checkpoint.pt")) for name in runs})
    report = {"family": family.name, "model": family.demo.model, "forget_classes": list(FORGET),
              "retain_classes": list(RETAIN), "proxy_classes": list(PROXY)}
    entries, table = family.demo_summary(models, sets, cfg.out, cfg.seed)
    report.update(entries)
    if table:
        say(table)
    seeds = cfg.eval_seeds or family.demo.eval_seeds
    report["tasks"] = evaluate(models, sets, extractor("digits"), family.tasks, 0.5, cfg.out, seeds=seeds,
                               sample_steps=cfg.sample_steps)
    say(markdown(report["tasks"]))
    say(fid_ratios(report["tasks"], len(seeds)))
    report["mia"] = mia.attack(models, {s: d.images for s, d in demo_sets("train").items()},
                               {s: d.images for s, d in sets.items()}, family.tasks[0], 0.5,
                               sample_steps=cfg.sample_steps)
    say(mia.markdown(report["mia"]))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    minutes, seconds = divmod(int(report["seconds"]), 60)
    say(f"{family.name} demo: wrote {cfg.out}/report.json and its pictures in {minutes} min {seconds} s")
    return report


def fid_ratios(tasks: dict, seeds: int) -> str:
    """The claim in one line per task: each unlearned model's FID over the original's."""
    lines = []
    for task, models in tasks.items():
        base = models["original"]
        ratios = "; ".join(f"{name} forget {m['forget']['fid'] / base['forget']['fid']:.2f}x, retain "
                           f"{m['retain']['fid'] / base['retain']['fid']:.2f}x" for name, m in models.items()
                           if name != "original")
        mean = f", mean of {seeds} sampler seeds" if seeds > 1 else ""
        lines.append(f"{task} FID vs the original's (forget {base['forget']['fid']:.1f}, retain "
                     f"{base['retain']['fid']:.1f}{mean}): {ratios}")
    return "\n".join(lines)
