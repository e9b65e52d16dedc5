"""The `fastforget` command: `demo`, `unlearn`, `pretrain`, `eval`, `verify`, `sweep`, `info` and `bench`."""
from __future__ import annotations

import argparse
import math
import sys

from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from . import families
from .console import say
from .errors import InvalidValue, UserError, one_line


def count(text: str) -> int:
    """argparse type: an int >= 1 (batch sizes, shapes, repetitions)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def ratio(text: str) -> float:
    """argparse type: a mask ratio in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--reps", type=count, default=10, help="timed repetitions at least")
    parser.add_argument("--csv", default=None, help="append one row per provider to this CSV file")


def data_args(p: argparse.ArgumentParser) -> None:
    """How an image directory's classes are chosen (Places365's layout and the reference's caps)."""
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="image directories: a file naming the class folders, one per line (Places365's class.txt: "
                        "'/b/badlands'); classes are then these, in order, and --*-classes may give index ranges "
                        "such as 50-99")
    p.add_argument("--per-class", type=count, default=None, metavar="N",
                   help="image directories: each class's first N files in sorted order (the reference's cap)")


def reading_args(p: argparse.ArgumentParser) -> None:
    """How a training run reads an image directory: bad files, and held in memory or streamed."""
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out (counted) instead of stopping before training")
    p.add_argument("--data-memory-mb", type=float, default=None, metavar="MB",
                   help="image directories: hold the decoded images in memory up to this size, else stream them "
                        "from disk (default: half the free memory, split over this machine's ranks; 0: stream)")
    p.add_argument("--data-workers", type=int, default=None, metavar="N",
                   help="streaming: decoding processes per rank (default: the spare cores, at most 12; 0: decode in "
                        "the step's process)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastforget", description="Fast machine unlearning for image-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and every backend with available / why not")
    bench = sub.add_parser("bench", help="time an op against its eager reference and torch.compile")
    ops = bench.add_subparsers(dest="op", required=True)

    loss = ops.add_parser("loss", help="unlearn_loss forward+backward")
    loss.add_argument("--shape", type=count, nargs="+", default=[256, 50, 1024], help="student shape (B, ...)")
    _common(loss)
    patch = ops.add_parser("patch", help="masked_patch_embed forward+backward")
    patch.add_argument("--batch-size", type=count, default=64)
    patch.add_argument("--image-size", type=count, default=224)
    patch.add_argument("--patch-size", type=count, default=16)
    patch.add_argument("--dim", type=count, default=768)
    patch.add_argument("--mask-ratio", type=ratio, default=0.75)
    _common(patch)
    attn = ops.add_parser("attention", help="qkv_attention forward+backward")
    attn.add_argument("--batch-size", type=count, default=128)
    attn.add_argument("--tokens", type=count, default=17)
    attn.add_argument("--heads", type=count, default=4)
    attn.add_argument("--head-dim", type=count, default=16)
    _common(attn)
    teacher = ops.add_parser("teacher", help="make_teacher_batch")
    teacher.add_argument("--batch-size", type=count, default=64)
    teacher.add_argument("--image-size", type=count, default=224)
    _common(teacher)
    norm = ops.add_parser("group-norm", help="group_norm_silu forward+backward (32 groups, FiLM, SiLU)")
    norm.add_argument("--shape", type=count, nargs=4, default=[12, 64, 256, 256],
                      help="x's shape (B, C, H, W), C a multiple of the 32 groups")
    _common(norm)
    diffusion = ops.add_parser("diffusion-inputs", help="make_diffusion_inputs (the student's and teacher's)")
    diffusion.add_argument("--shape", type=count, nargs=4, default=[12, 3, 256, 256], help="y_0's shape (B, C, H, W)")
    _common(diffusion)

    overhead = ops.add_parser("overhead", help="what each op call costs beyond its kernel, at a tiny shape")
    overhead.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    overhead.add_argument("--reps", type=count, default=10, help="timed calls per sample at least")
    overhead.add_argument("--csv", default=None, help="append one row per provider to this CSV file")
    sweep_ops = ops.add_parser("ops", help="every op over MAE/MAGE shapes and providers, against the roofline")
    sweep_ops.add_argument("--size", default=None, choices=["small", "large"],
                           help="shape set (default: large on CUDA, small on the CPU)")
    sweep_ops.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    sweep_ops.add_argument("--reps", type=count, default=10, help="timed repetitions at least")
    sweep_ops.add_argument("--csv", default=None, help="append one row per provider (and draw a PNG beside it)")
    step = ops.add_parser("step", help="one whole unlearning step: reference loop, plain PyTorch, fastforget")
    step.add_argument("--model", default="mae_vit_tiny", help="a config name of any family (mae_vit_tiny, "
                                                                 "palette_tiny, palette_places2, ...)")
    step.add_argument("--batch-size", type=count, default=128)
    step.add_argument("--mask-ratio", type=ratio, default=None, help="MAE: the share of patches removed (0.75)")
    step.add_argument("--providers", default="reference,pytorch,fastforget")
    step.add_argument("--compile", action="store_true", help="also time each provider under torch.compile")
    step.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    step.add_argument("--reps", type=count, default=10, help="timed steps at least")
    step.add_argument("--min-time", type=float, default=3.0, help="seconds of timed steps per provider at least")
    step.add_argument("--csv", default=None, help="append one row per provider to this CSV (and draw a PNG beside it)")
    step.add_argument("--profile", default=None, metavar="DIR",
                      help="after timing, profile each provider's steps into DIR (top ops table, Chrome trace)")

    data = ops.add_parser("data", help="how fast a streamed image folder decodes, per worker, against a model's step")
    data.add_argument("--data", required=True, help="an ImageFolder directory")
    data.add_argument("--size", type=count, default=None,
                      help="the side decoded to (default: what --model's runs hold, 8/7 of its side with crop-flip; "
                           "else 256)")
    data.add_argument("--images", type=count, default=512, help="files decoded per worker count (repeated if fewer)")
    data.add_argument("--batch-size", type=count, default=64, help="images a worker decodes per item")
    data.add_argument("--workers", default=None, help="comma-separated worker counts (default 1, 2, 4, ... to the "
                                                      "cores; 0: this process)")
    data.add_argument("--model", default=None, help="also time this model's unlearning step (bench step's fastforget)")
    data.add_argument("--step-batch", type=count, default=64, help="the step's batch for --model")
    data.add_argument("--device", default=None, help="for --model's step: cpu or cuda (default: cuda when present)")

    def loop_args(p, out_default, epochs):
        p.add_argument("--out", default=out_default, help="output directory (checkpoint.pt, metrics.jsonl)")
        p.add_argument("--epochs", type=float, default=epochs)
        p.add_argument("--batch-size", type=int, default=64, help="per rank and micro-batch")
        p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation")
        recipe = "default: the model family's, as its reference trains"
        p.add_argument("--blr", type=float, default=None, help=f"base lr: lr = blr * global batch / 256 ({recipe})")
        p.add_argument("--lr", type=float, default=None, help=f"absolute lr, instead of --blr ({recipe})")
        p.add_argument("--min-lr", type=float, default=0.0, help="where the cosine schedule ends")
        p.add_argument("--schedule", default=None, choices=["cosine", "constant"], help=recipe)
        p.add_argument("--weight-decay", type=float, default=None, help=recipe)
        p.add_argument("--warmup-fraction", type=float, default=None, help=recipe)
        p.add_argument("--clip-grad", type=float, default=None, help=f"gradient-norm clip, 0: none ({recipe})")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
        p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (checkpointed)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        p.add_argument("--compile", action="store_true", help="run the step's forward under torch.compile")
        p.add_argument("--deterministic", action="store_true",
                       help="torch.use_deterministic_algorithms for the run (fastforget's kernels are deterministic)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
        p.add_argument("--augment", default=None, choices=["none", "crop-flip"],
                       help="crop-flip: MAE's reference RandomResizedCrop(0.2-1) and flip, on the GPU (default: "
                            "the family's on image folders, MAE's crop-flip, Palette's none; none on the digits)")

    unlearn = sub.add_parser("unlearn", help="make a pretrained model forget classes (Li et al., ICLR 2024)")
    unlearn.add_argument("--checkpoint", required=True,
                         help="the original model: fastforget's checkpoint or a family's official file")
    unlearn.add_argument("--model", default=None, help="config name when the checkpoint does not record it")
    unlearn.add_argument("--data", default="digits", help="'digits' or an ImageFolder directory")
    unlearn.add_argument("--forget-classes", required=True, help="comma-separated names or indices")
    unlearn.add_argument("--retain-classes", default="", help="real retain classes (default: all others)")
    unlearn.add_argument("--proxy-classes", default="", help="proxy retain classes of the same data")
    unlearn.add_argument("--proxy-data", default=None, help="an ImageFolder directory of proxy retain images")
    data_args(unlearn)
    reading_args(unlearn)
    unlearn.add_argument("--retain-ratio", type=float, default=1.0, help="real retain samples per forget sample")
    unlearn.add_argument("--proxy-ratio", type=float, default=1.0, help="retain samples in all per forget sample")
    unlearn.add_argument("--retain-pick", default="random", choices=["random", "first"],
                         help="which real retain samples: random, or the first in class order (Palette's reference "
                              "cuts its retain list at the end)")
    unlearn.add_argument("--method", default="ours",
                         choices=["ours", "max-loss", "noisy-label", "retain-label", "random-encoder"],
                         help="the method (ours) or one of the reference's baselines")
    unlearn.add_argument("--forget-weight", type=float, default=0.2, help="alpha, the forget loss's weight")
    unlearn.add_argument("--anchor", type=float, default=0.0,
                         help="pull toward the original weights: after each step p -= lr * ANCHOR * (p - p_original) "
                              "(0: off)")
    unlearn.add_argument("--forget-target", type=float, default=None,
                         help="the epsilon-constrained form: the forget term is on only while the forget loss is above "
                              "FORGET_TARGET times the original's (a number in (0, 1]; default: always on)")
    unlearn.add_argument("--normalize", default=None, choices=["reference", "set", "batch"],
                         help="loss normalisation (default: the family's reference's: MAE reference, Palette batch)")
    unlearn.add_argument("--noise", default=None, choices=["normal", "uniform", "constant"],
                         help="MAE: the forget rows' noise images (default normal)")
    unlearn.add_argument("--mask-ratio", type=float, default=None, help="MAE: the share of patches removed (0.75)")
    loop_args(unlearn, "unlearned", 10)
    pretrain = sub.add_parser("pretrain", help="train a model from scratch (the demo's original models)")
    pretrain.add_argument("--model", default="mae_vit_tiny", help="a config name of any family")
    pretrain.add_argument("--data", default="digits")
    data_args(pretrain)
    reading_args(pretrain)
    pretrain.add_argument("--mask-ratio", type=float, default=None, help="MAE: the share of patches removed (0.75)")
    pretrain.add_argument("--part", default=None, help="what trains, for families that pretrain in parts (MAGE: "
                          "tokenizer, then model; default the last)")
    pretrain.add_argument("--init", default=None, help="start from this checkpoint (the previous part's)")
    pretrain.add_argument("--task-masks", action="store_true",
                          help="MAE, MAGE: every fourth step removes a random square of half the grid's side")
    loop_args(pretrain, "pretrained", 80)
    ev = sub.add_parser("eval", help="the paper's metrics for models on the retain and forget sets")
    ev.add_argument("--models", required=True, help="NAME=CHECKPOINT,... (the first is the original model)")
    ev.add_argument("--data", default="digits", help="'digits' (its test split) or an ImageFolder directory")
    data_args(ev)
    ev.add_argument("--forget-classes", required=True)
    ev.add_argument("--retain-classes", required=True)
    ev.add_argument("--task", default="all", choices=["inpaint", "outpaint", "all"],
                    help="all: the models' family's tasks (MAE: both; Palette: inpaint)")
    ev.add_argument("--ratio", type=float, default=0.5, help="side of the centre square, as a fraction")
    ev.add_argument("--features", default="digits", help="digits, encoder or inception:PATH")
    ev.add_argument("--seeds", type=count, default=1, help="sampler seeds; each metric is their mean")
    ev.add_argument("--sample-steps", type=count, default=None,
                    help="diffusion models: a strided schedule of N steps (faster; not the reference's sampler, "
                         "which takes every step of the model's own schedule)")
    ev.add_argument("--out", default="eval-out")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ev.add_argument("--batch-size", type=int, default=256, help="images per model call")
    ev.add_argument("--mia", action="store_true",
                    help="also the membership-inference test: the AUC, by each model's error on the removed region, of "
                         "telling the classes' training images from their test images (0.5 is chance)")
    ev.add_argument("--members", default=None, metavar="DIR",
                    help="--mia on an image directory: the training images of its classes (the digits: their train "
                         "split)")
    ev.add_argument("--audit", default=None, metavar="AUDIT_JSON",
                    help="an unlearning run's OUT/audit.json: add these metrics (and the checkpoints' hashes) to it")
    verify = sub.add_parser("verify", help="recompute every hash of an unlearning run's audit record")
    verify.add_argument("record", help="OUT/audit.json of a fastforget unlearn run")
    family_names = sorted(families.FAMILIES)
    sweep = sub.add_parser("sweep", help="ours over forget weights on the digits: the retain/forget trade-off curve")
    sweep.add_argument("--family", default="mae", choices=family_names)
    sweep.add_argument("--forget-weights", default="0.05,0.1,0.2,0.5,1.0")
    sweep.add_argument("--task", default="inpaint", choices=["inpaint", "outpaint"])
    sweep.add_argument("--out", default=None, help="shares the demo's pretrained model (default demo-out/FAMILY)")
    robust = sub.add_parser("robustness", help="ours and ours_proxy on random digit splits: the claims' distribution")
    robust.add_argument("--family", default="mae", choices=family_names)
    robust.add_argument("--splits", type=count, default=8, help="random (forget, retain, proxy) splits: 2, 4, 4 digits")
    robust.add_argument("--seed", type=int, default=0, help="draws the splits")
    robust.add_argument("--out", default=None, help="shares the demo's pretrained model (default demo-out/FAMILY)")
    robust.add_argument("--images", default="test", choices=["test", "train"],
                        help="scored on: the test images, or training images (to choose settings on)")
    robust.add_argument("--forget-weight", type=float, default=None, help="alpha, instead of the demo's")
    robust.add_argument("--unlearn-epochs", type=float, default=None, help="instead of the demo's")
    robust.add_argument("--lr", type=float, default=None, help="the absolute unlearning lr, instead of the demo's")
    robust.add_argument("--weight-decay", type=float, default=None, help="instead of the demo's")
    robust.add_argument("--anchor", type=float, default=None, help="unlearn's --anchor, instead of the demo's")
    robust.add_argument("--forget-target", type=float, default=None, help="unlearn's --forget-target (default: none)")
    demo = sub.add_parser("demo", help="pretrain, unlearn digits 0 and 1 two ways, evaluate (make demo)")
    demo.add_argument("--family", default="all", choices=family_names + ["all"],
                      help="all: each family in turn, under OUT/<family>")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--baselines", action="store_true",
                      help="also train the four baselines and evaluate all seven models with the paper's metrics")
    return parser


@record  # under torchrun, a failing rank's traceback reaches the run's error summary
def main(argv=None) -> int:
    """Runs a command. What the user gave it being wrong (a UserError) is one line on stderr and
    exit code 2, as argparse's own errors are; anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        get_error_handler().record_exception(err)  # torchrun's error file (a no-op without torchrun)
        say(f"fastforget {args.command}: error: {one_line(err)}", err=True)
        raise SystemExit(2) from None


def finished(metrics: dict, out: str) -> str:
    """A training run's last line: where it got to, its last logged losses, what it wrote."""
    losses = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.endswith("loss"))
    return (f"step {metrics['step']} (epoch {metrics['epoch']:.3g}) in {metrics['seconds']:.1f} s; {losses}; "
            f"wrote {out}/checkpoint.pt and {out}/metrics.jsonl")


def run(args: argparse.Namespace) -> int:
    if args.command in ("unlearn", "pretrain"):
        from .train import LoopConfig, PretrainConfig, UnlearnConfig, pretrain as run_pretrain, unlearn as run_unlearn

        loop = LoopConfig(out=args.out, epochs=args.epochs, batch_size=args.batch_size, accum_steps=args.accum_steps,
                          blr=args.blr, lr=args.lr, min_lr=args.min_lr, schedule=args.schedule,
                          weight_decay=args.weight_decay, warmup_fraction=args.warmup_fraction,
                          clip_grad=args.clip_grad, seed=args.seed, log_every=args.log_every,
                          save_every=args.save_every, stop_after=args.stop_after, resume=args.resume,
                          compile=args.compile, deterministic=args.deterministic)
        if args.command == "pretrain":
            say(finished(run_pretrain(PretrainConfig(model=args.model, data=args.data, mask_ratio=args.mask_ratio,
                                                     part=args.part, init=args.init, task_masks=args.task_masks,
                                                     class_list=args.classes, per_class=args.per_class,
                                                     skip_bad_images=args.skip_bad_images,
                                                     data_memory_mb=args.data_memory_mb,
                                                     data_workers=args.data_workers, device=args.device, augment=args.augment, loop=loop)), args.out))
            return 0
        split = lambda text: tuple(c for c in text.split(",") if c)  # noqa: E731
        say(finished(run_unlearn(UnlearnConfig(
            checkpoint=args.checkpoint, model=args.model, data=args.data, forget_classes=split(args.forget_classes),
            retain_classes=split(args.retain_classes), proxy_classes=split(args.proxy_classes),
            proxy_data=args.proxy_data, skip_bad_images=args.skip_bad_images, retain_ratio=args.retain_ratio,
            proxy_ratio=args.proxy_ratio, retain_pick=args.retain_pick, class_list=args.classes,
            per_class=args.per_class, data_memory_mb=args.data_memory_mb, data_workers=args.data_workers,
            forget_weight=args.forget_weight, anchor=args.anchor, forget_target=args.forget_target,
            normalize=args.normalize, noise=args.noise,
            mask_ratio=args.mask_ratio, method=args.method, device=args.device, augment=args.augment, loop=loop)),
            args.out))
        return 0
    if args.command == "eval":
        from .eval.run import evaluate_checkpoints

        split = lambda text: tuple(c for c in text.split(",") if c)  # noqa: E731
        pairs = [pair.split("=", 1) for pair in split(args.models)]
        if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
            raise InvalidValue(f"--models must be NAME=CHECKPOINT,... (the first the original model), got {args.models!r}")
        evaluate_checkpoints(dict(pairs), args.data, split(args.forget_classes), split(args.retain_classes),
                             None if args.task == "all" else (args.task,), args.ratio, args.features, args.out,
                             args.device, args.batch_size, seeds=tuple(range(args.seeds)),
                             sample_steps=args.sample_steps, class_list=args.classes, per_class=args.per_class,
                             audit_record=args.audit, mia=args.mia, members=args.members)
        return 0
    if args.command == "verify":
        from .audit import verify

        problems, checked = verify(args.record)
        for line in problems:
            print(f"fastforget verify: {line}")
        if problems:
            print(f"fastforget verify: {len(problems)} of {checked} checks failed for {args.record}")
            return 1
        print(f"fastforget verify: {args.record}: all {checked} checks pass (every recorded hash matches)")
        return 0
    if args.command == "sweep":
        from .train.sweep import run as run_sweep

        try:
            weights = [float(a) for a in args.forget_weights.split(",") if a]
        except ValueError:
            weights = []
        if not weights or not all(0 <= w < float("inf") for w in weights):
            raise InvalidValue(f"--forget-weights must be comma-separated numbers >= 0, got {args.forget_weights!r}")
        from .train.demo import DemoConfig

        out = args.out or f"demo-out/{args.family}"
        run_sweep(out, weights, DemoConfig(out=out, family=args.family), task=args.task)
        return 0
    if args.command == "robustness":
        from .train.demo import DemoConfig
        from .train.robustness import run as run_robustness

        # each setting: (its name, its value, whether 0 is allowed, its upper bound), checked before
        # anything is pretrained
        inf = math.inf
        settings = (("forget_weight", args.forget_weight, True, inf), ("epochs", args.unlearn_epochs, False, inf),
                    ("lr", args.lr, False, inf), ("weight_decay", args.weight_decay, True, inf),
                    ("anchor", args.anchor, True, inf), ("forget_target", args.forget_target, False, 1.0))
        for name, value, zero, top in settings:
            if value is not None and not (math.isfinite(value) and (value >= 0 if zero else value > 0) and value <= top):
                flag = "unlearn-epochs" if name == "epochs" else name.replace("_", "-")
                bound = "" if top == inf else f" and <= {top:g}"
                raise InvalidValue(f"--{flag} must be a finite number {'>= 0' if zero else '> 0'}{bound}, "
                                   f"got {value!r}")
        out = args.out or f"demo-out/{args.family}"
        unlearn = {name: value for name, value, _, _ in settings if value is not None}
        cfg = DemoConfig(out=out, family=args.family, unlearn=unlearn)
        run_robustness(out, args.family, args.splits, args.seed, cfg, images=args.images)
        return 0
    if args.command == "demo":
        from .train.demo import DemoConfig, run as run_demo

        run_demo(DemoConfig(out=args.out, family=args.family, baselines=args.baselines))
        return 0
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    from .bench import loss as bench_loss, ops as bench_ops, patch as bench_patch, step as bench_step
    from .bench import attention as bench_attention, overhead as bench_overhead, teacher as bench_teacher
    from .bench import data as bench_data, diffusion as bench_diffusion, group_norm as bench_group_norm

    return {"loss": bench_loss, "patch": bench_patch, "attention": bench_attention, "teacher": bench_teacher,
            "group-norm": bench_group_norm, "diffusion-inputs": bench_diffusion, "step": bench_step, "ops": bench_ops, "data": bench_data,
            "overhead": bench_overhead}[args.op].main(args)


if __name__ == "__main__":
    sys.exit(main())
