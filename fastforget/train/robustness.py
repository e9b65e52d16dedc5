"""`fastforget robustness`: do the demo's claims hold on class splits nobody tuned on?

Draws N distinct random (forget, retain, proxy) splits of the digits from a seed (2 forget, 4
retain, 4 proxy), unlearns each with ours (the real retain digits) and ours_proxy (the proxy
digits instead), with the family's demo settings and its demo model (pretrained once, shared with
`fastforget demo` under the same --out), and evaluates inpainting on the test images. Reports each
split and the distribution over splits (median and worst) of the forget and retain FID and MSE
ratios to the original's and the accuracy changes, against the goals: ours forget FID >= 2x and
retain FID <= 1.5x; ours_proxy retain FID <= 2x. Writes robustness.json, robustness.md and
robustness.png.

Choosing settings: --forget-weight, --unlearn-epochs, --lr, --weight-decay, --anchor and
--forget-target replace the demo's, and --images train scores each class's first TRAIN_PER_CLASS
training images instead of the test images, so that settings are chosen on training images (and
then judged on the test images of splits drawn from another seed). Each setting's runs have their own folders, reused
when present, and a run that tries any writes robustness-{images}-{setting}.* instead.
"""
from __future__ import annotations

import json
import os
import statistics

import torch

from .. import families
from ..console import say
from ..eval.features import extractor
from ..eval.pictures import scatter
from ..eval.run import evaluate
from ..errors import InvalidValue
from .demo import DemoConfig, demo_sets, ensure_original, unlearn_digits
from .loop import output_dir

METHODS = {"ours": "retain_classes", "ours_proxy": "proxy_classes"}
GOALS = {"ours": (("forget_fid", ">=", 2.0), ("retain_fid", "<=", 1.5)), "ours_proxy": (("retain_fid", "<=", 2.0),)}
TASK = "inpaint"
IMAGES = ("test", "train")
TRAIN_PER_CLASS = 60  # training images scored per class with --images train (the test split has about 36)


def draw_splits(count: int, seed: int) -> list[dict]:
    """count distinct splits of the ten digits, each a random permutation's first 2 (forget), next
    4 (retain) and last 4 (proxy), from seed."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100:
        raise InvalidValue(f"splits (--splits) must be an int in [1, 100], got {count!r}")
    gen = torch.Generator().manual_seed(seed)
    splits, seen = [], set()
    while len(splits) < count:
        perm = [str(d) for d in torch.randperm(10, generator=gen).tolist()]
        split = {"forget": sorted(perm[:2]), "retain": sorted(perm[2:6]), "proxy": sorted(perm[6:])}
        key = (tuple(split["forget"]), tuple(split["retain"]))
        if key not in seen:
            seen.add(key)
            splits.append(split)
    return splits


def ratios(report: dict, name: str) -> dict:
    """One model's inpainting numbers against the original's on the same split."""
    base, r = report["original"], report[name]
    return {"forget_fid": r["forget"]["fid"] / base["forget"]["fid"],
            "retain_fid": r["retain"]["fid"] / base["retain"]["fid"],
            "forget_mse": r["forget"]["mse"] / base["forget"]["mse"],
            "retain_mse": r["retain"]["mse"] / base["retain"]["mse"],
            "forget_accuracy": r["forget"]["accuracy"] - base["forget"]["accuracy"],
            "retain_accuracy": r["retain"]["accuracy"] - base["retain"]["accuracy"]}


def worst(key: str, values: list[float]) -> float:
    """The worst value of a ratio or change: the least forgetting (the lowest forget FID or MSE, the
    smallest forget accuracy drop) or the most retain damage."""
    higher_is_worse = key.startswith("retain") != key.endswith("accuracy")
    return max(values) if higher_is_worse else min(values)


def summarise(rows: list[dict]) -> dict:
    """Per method and quantity: median and worst over the splits, and each goal met or not."""
    out = {}
    for method in METHODS:
        values = {k: [r[method][k] for r in rows] for k in rows[0][method]}
        out[method] = {k: {"median": statistics.median(v), "worst": worst(k, v)} for k, v in values.items()}
        out[method]["goals"] = [
            {"quantity": k, "goal": f"{op} {bound:g}",
             **{at: (out[method][k][at] >= bound if op == ">=" else out[method][k][at] <= bound)
                for at in ("median", "worst")}} for k, op, bound in GOALS[method]]
    return out


def markdown(rows: list[dict], summary: dict, family: str, seed: int, setting: str = "the demo's settings",
             images: str = "test") -> str:
    scored = "test images" if images == "test" else f"training images ({TRAIN_PER_CLASS} a class)"
    lines = [f"### {family}: {len(rows)} random splits (seed {seed}), {setting}, inpainting on the {scored}, "
             "ratios to the original's", "",
             "| split (forget / retain / proxy) | method | forget FID | retain FID | forget MSE | retain MSE | "
             "forget acc | retain acc |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = f"{','.join(r['split']['forget'])} / {','.join(r['split']['retain'])} / {','.join(r['split']['proxy'])}"
        for method in METHODS:
            m = r[method]
            lines.append(f"| {split} | {method} | {m['forget_fid']:.2f}x | {m['retain_fid']:.2f}x | "
                         f"{m['forget_mse']:.2f}x | {m['retain_mse']:.2f}x | {100 * m['forget_accuracy']:+.0f} | "
                         f"{100 * m['retain_accuracy']:+.0f} |")
    lines += ["", "| method | quantity | median | worst |", "|---|---|---|---|"]
    for method, s in summary.items():
        for k, v in s.items():
            if k != "goals":
                unit = (lambda x: f"{100 * x:+.0f} points") if k.endswith("accuracy") else (lambda x: f"{x:.2f}x")
                lines.append(f"| {method} | {k.replace('_', ' ')} | {unit(v['median'])} | {unit(v['worst'])} |")
    lines += ["", "goals: " + "; ".join(
        f"{method} {g['quantity'].replace('_', ' ')} {g['goal']}: median {'met' if g['median'] else 'MISSED'}, worst "
        f"{'met' if g['worst'] else 'MISSED'}" for method, s in summary.items() for g in s["goals"]), ""]
    return "\n".join(lines)


def setting_name(cfg: DemoConfig, family: families.Family) -> str:
    """The unlearning settings the runs use, as a folder name: epochs, then the options, sorted."""
    epochs, options = cfg.unlearning(family)
    return "-".join(f"{k}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}" for k, v in
                    [("epochs", epochs)] + sorted(options.items()))


def run(out: str, family: str = "mae", splits: int = 8, seed: int = 0, cfg: DemoConfig = None,
        images: str = "test") -> dict:
    cfg = cfg or DemoConfig(out=out, family=family)
    if images not in IMAGES:
        raise InvalidValue(f"images (--images) must be one of {IMAGES}, got {images!r}")
    output_dir(out)
    fam = families.get(cfg.family)
    original = ensure_original(cfg)
    seeds = cfg.eval_seeds or fam.demo.eval_seeds
    setting = setting_name(cfg, fam)
    say(f"unlearning settings: {setting}; scored on the {images} images")
    rows = []
    for k, split in enumerate(draw_splits(splits, seed)):
        say(f"split {k + 1} of {splits}: forget {split['forget']}, retain {split['retain']}, proxy {split['proxy']}")
        models = {"original": families.load(original)}
        for method, option in METHODS.items():
            path = os.path.join(out, f"split{seed}-{k}", setting, method)
            if not os.path.exists(os.path.join(path, "checkpoint.pt")):
                unlearn_digits(cfg, original, path, forget=split["forget"],
                               **{option: split["retain" if method == "ours" else "proxy"]})
            models[method] = families.load(os.path.join(path, "checkpoint.pt"))
        sets = demo_sets(images, split["forget"], split["retain"], TRAIN_PER_CLASS if images == "train" else None)
        report = evaluate(models, sets, extractor("digits"), (TASK,), 0.5, seeds=seeds,
                          sample_steps=cfg.sample_steps)[TASK]
        rows.append({"split": split, **{m: ratios(report, m) for m in METHODS}, "report": report})
    summary = summarise(rows)
    text = markdown(rows, summary, cfg.family, seed, setting, images)
    say(text)
    name = f"robustness-{images}-{setting}" if (images, cfg.unlearn) != ("test", {}) else "robustness"
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"family": cfg.family, "seed": seed, "setting": setting, "images": images, "splits": rows,
                   "summary": summary}, f, indent=2)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    scatter({m: [(r[m]["forget_fid"], r[m]["retain_fid"], str(k + 1)) for k, r in enumerate(rows)] for m in METHODS},
            "forget FID / original's (higher: more forgotten)", "retain FID / original's (lower: better kept)",
            os.path.join(out, f"{name}.png"), lines=(("x", 2.0), ("y", 1.5), ("y", 2.0)))
    say(f"wrote {out}/{name}.json, {name}.md and {name}.png")
    return {"splits": rows, "summary": summary, "setting": setting}
