"""The `fastforget` command: `info` and `bench`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastforget", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and every backend with available / why not")
    bench = sub.add_parser("bench", help="time an op against its eager reference and torch.compile")
    bench_sub = bench.add_subparsers(dest="op", required=True)
    loss = bench_sub.add_parser("loss", help="unlearn_loss forward+backward")
    loss.add_argument("--shape", type=int, nargs="+", default=[256, 50, 1024], help="student shape (B, ...)")
    loss.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    loss.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    loss.add_argument("--reps", type=int, default=10)
    loss.add_argument("--csv", default=None, help="append one row per provider to this CSV file")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .info import report

        print(report())
        return 0
    from .bench import loss as bench_loss

    return bench_loss.main(args)


if __name__ == "__main__":
    sys.exit(main())
