"""The `fastforget` command: `info` and `bench`."""
from __future__ import annotations

import argparse
import sys


def _common(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    parser.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions at least")
    parser.add_argument("--csv", default=None, help="append one row per provider to this CSV file")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastforget", description="Fast machine unlearning for image-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and every backend with available / why not")
    bench = sub.add_parser("bench", help="time an op against its eager reference and torch.compile")
    ops = bench.add_subparsers(dest="op", required=True)

    loss = ops.add_parser("loss", help="unlearn_loss forward+backward")
    loss.add_argument("--shape", type=int, nargs="+", default=[256, 50, 1024], help="student shape (B, ...)")
    _common(loss)
    patch = ops.add_parser("patch", help="masked_patch_embed forward+backward")
    patch.add_argument("--batch-size", type=int, default=64)
    patch.add_argument("--image-size", type=int, default=224)
    patch.add_argument("--patch-size", type=int, default=16)
    patch.add_argument("--dim", type=int, default=768)
    patch.add_argument("--mask-ratio", type=float, default=0.75)
    _common(patch)
    teacher = ops.add_parser("teacher", help="make_teacher_batch")
    teacher.add_argument("--batch-size", type=int, default=64)
    teacher.add_argument("--image-size", type=int, default=224)
    _common(teacher)
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import report

        print(report())
        return 0
    from .bench import loss as bench_loss, patch as bench_patch, teacher as bench_teacher

    return {"loss": bench_loss, "patch": bench_patch, "teacher": bench_teacher}[args.op].main(args)


if __name__ == "__main__":
    sys.exit(main())
