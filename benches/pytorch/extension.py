#!/usr/bin/env python3
"""Times barlow's PyTorch extension against the official loss code, in one process.

For each N, D and precision: the official loss eager, the official loss under torch.compile
(loss.py's measurements), and `barlow.BarlowTwinsLoss` (math "f32", "tf32" or "bf16" for the
official loss's fp32, TF32 and bf16-autocast runs), each forward + backward on the same inputs,
timed the same way (CUDA events on a GPU, medians after warm-up). Needs the extension installed
(`pip install ./python`).

Prints one JSON line per measurement in loss.py's row format (path "barlow-extension" for the
extension), then a table with the extension's speed-up over each.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loss import Rows, inputs, measure, parser, timed  # noqa: E402


def measure_extension(torch, barlow, args, n, d, math):
    row = {"device": args.device, "path": "barlow-extension", "math": math, "n": n, "d": d,
           "status": "ok", "median_ms": None, "min_ms": None, "peak_bytes": None}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    try:
        z1, z2 = inputs(torch, n, d, args.device, args.seed)
        loss_fn = barlow.BarlowTwinsLoss(lambd=args.lambd, math=math)

        def step():
            z1.grad = None
            z2.grad = None
            loss = loss_fn(z1, z2)
            loss.backward()
            return loss

        row.update(timed(torch, args, step))
    except (torch.cuda.OutOfMemoryError, MemoryError):
        row["status"] = "oom"
    except (RuntimeError, ValueError) as e:
        row["status"] = "oom" if "out of memory" in str(e).lower() else str(e).splitlines()[0]
    return row


def main():
    p = parser(__doc__, "512,2048", "2048,8192")
    args = p.parse_args()

    import torch

    try:
        import barlow
    except ImportError as e:
        print(f"extension.py: the barlow extension is not installed ({e})", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("extension.py: CUDA is not available to PyTorch", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Rows(args.out)
    maths = args.math.split(",") if args.device == "cuda" else ["f32"]
    table = []
    for n in map(int, args.n.split(",")):
        for d in map(int, args.d.split(",")):
            for math in maths:
                rows = [measure(torch, args, n, d, math, mode == "compile")
                        for mode in args.modes.split(",")]
                rows.append(measure_extension(torch, barlow, args, n, d, math))
                for row in rows:
                    out.write(row)
                table.append(rows)
    out.close()

    ms = lambda r: f"{r['median_ms']:.3f}" if r["status"] == "ok" else r["status"]
    head = [r["path"] for r in table[0]] if table else []
    print(f"{'N':>6} {'D':>6} {'math':>5} " + " ".join(f"{h:>18}" for h in head) + "   speed-up",
          file=sys.stderr)
    for rows in table:
        ext = rows[-1]
        ups = [f"{r['median_ms'] / ext['median_ms']:.2f}x" if r["status"] == ext["status"] == "ok"
               else "-" for r in rows[:-1]]
        print(f"{rows[0]['n']:>6} {rows[0]['d']:>6} {rows[0]['math']:>5} "
              + " ".join(f"{ms(r):>18}" for r in rows) + "   " + " ".join(ups), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
