"""`fastforget sweep`: the paper's ablation over the forget weight alpha, as a curve.

Runs ours on the demo's digits once per alpha (sharing the demo's pretrained model; a finished
run is reused), evaluates one task with the digits features, and draws tradeoff_{task}.png:
retain quality (accuracy of the retain digits' completions) against forget removal (forget FID
over the original's), one point per alpha.
"""
from __future__ import annotations

import json
import os

from .. import families
from ..console import say
from ..eval.features import extractor
from ..eval.pictures import scatter
from ..eval.run import evaluate
from .demo import RETAIN, DemoConfig, ensure_original, demo_sets, unlearn_digits


def run(out: str, forget_weights, cfg: DemoConfig = None, task: str = "inpaint") -> dict:
    cfg = cfg or DemoConfig(out=out)
    original = ensure_original(cfg)
    models = {"original": families.load(original)}
    seeds = cfg.eval_seeds or families.get(cfg.family).demo.eval_seeds
    for alpha in forget_weights:
        name = f"alpha={alpha:g}"
        path = os.path.join(out, f"ours_alpha{alpha:g}")
        if os.path.exists(os.path.join(path, "checkpoint.pt")):
            say(f"reusing {path}")
        else:
            say(f"unlearning with forget weight {alpha:g}")
            unlearn_digits(cfg, original, path, retain_classes=RETAIN, forget_weight=alpha)
        models[name] = families.load(os.path.join(path, "checkpoint.pt"))
    report = evaluate(models, demo_sets(), extractor("digits"), (task,), 0.5, seeds=seeds,
                      sample_steps=cfg.sample_steps)[task]
    base = report["original"]
    points = [{"model": name, "forget_fid_ratio": r["forget"]["fid"] / base["forget"]["fid"],
               "retain_accuracy": r["retain"]["accuracy"], "forget_accuracy": r["forget"]["accuracy"],
               "retain_fid_ratio": r["retain"]["fid"] / base["retain"]["fid"]} for name, r in report.items()]
    with open(os.path.join(out, f"sweep_{task}.json"), "w") as f:
        json.dump({"task": task, "points": points, "report": report}, f, indent=2)
    scatter({"original": [(p["forget_fid_ratio"], p["retain_accuracy"], p["model"]) for p in points[:1]],
             "ours": [(p["forget_fid_ratio"], p["retain_accuracy"], p["model"]) for p in points[1:]]},
            "forget removal: forget FID / original's", f"retain quality: accuracy on retain completions ({task})",
            os.path.join(out, f"tradeoff_{task}.png"), connect=True)
    for p in points:
        say(f"{p['model']:<12} forget FID x{p['forget_fid_ratio']:.2f}  retain accuracy {p['retain_accuracy']:.3f}"
            f"  forget accuracy {p['forget_accuracy']:.3f}")
    return {"points": points}
