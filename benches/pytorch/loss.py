#!/usr/bin/env python3
"""Times the reference PyTorch Barlow Twins loss (forward + autograd backward).

The loss is written exactly as the reference implementation does it: BatchNorm1d(affine=False),
c = bn(z1).T @ bn(z2) / N, the diagonal via torch.diagonal().add_(-1).pow_(2).sum(), the
off-diagonal via the flatten/view trick, .pow_(2).sum(). Modes: eager with fp32 matmul, eager with
TF32 allowed, eager under bf16 autocast, and each of those under torch.compile.

Prints one JSON line per measurement, in the row format `barlow bench loss --with FILE` merges:
{"device", "path": "pytorch-eager" | "pytorch-compile", "math": "f32" | "tf32" | "bf16", "n", "d",
 "status": "ok" | "oom" | message, "median_ms", "min_ms", "peak_bytes"}.
"""
import argparse
import json
import os
import statistics
import sys
import time


def off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def make_loss(torch, d, lambd, device):
    bn = torch.nn.BatchNorm1d(d, affine=False).to(device)

    def loss_fn(z1, z2):
        c = bn(z1).T @ bn(z2)
        c.div_(z1.shape[0])
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        off_diag = off_diagonal(c).pow_(2).sum()
        return on_diag + lambd * off_diag

    return loss_fn


def inputs(torch, n, d, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shift = 3.0 * torch.randn(d, generator=g)
    scale = 0.5 + 2.0 * torch.rand(d, generator=g)
    z1 = shift + scale * torch.randn(n, d, generator=g)
    z2 = 0.8 * z1 + 0.5 * torch.randn(n, d, generator=g) + 0.1
    return (z1.to(device).requires_grad_(True), z2.to(device).requires_grad_(True))


def timed(torch, args, step):
    """Runs `step` args.warmup times, then args.repeats timed times (CUDA events on a GPU);
    returns {"median_ms", "min_ms", "peak_bytes"} (peak on a GPU only)."""
    cuda = args.device == "cuda"
    for _ in range(args.warmup):
        step()
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated())
    times = []
    for _ in range(args.repeats):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_bytes": peak}


def measure(torch, args, n, d, math, compiled):
    device = args.device
    cuda = device == "cuda"
    row = {
        "device": device,
        "path": "pytorch-compile" if compiled else "pytorch-eager",
        "math": math,
        "n": n,
        "d": d,
        "status": "ok",
        "median_ms": None,
        "min_ms": None,
        "peak_bytes": None,
    }
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = math == "tf32"
        torch.backends.cudnn.allow_tf32 = math == "tf32"
        torch.cuda.empty_cache()
    try:
        z1, z2 = inputs(torch, n, d, device, args.seed)
        loss_fn = make_loss(torch, d, args.lambd, device)
        if compiled:
            loss_fn = torch.compile(loss_fn)

        def step():
            z1.grad = None
            z2.grad = None
            if math == "bf16":
                with torch.autocast(device_type=device, dtype=torch.bfloat16):
                    loss = loss_fn(z1, z2)
            else:
                loss = loss_fn(z1, z2)
            loss.backward()
            return loss

        row.update(timed(torch, args, step))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except RuntimeError as e:  # CPU allocators report exhaustion as RuntimeError
        row["status"] = "oom" if "out of memory" in str(e).lower() else str(e).splitlines()[0]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def parser(doc, n, d):
    """The options loss.py and extension.py share, with default grids `n` and `d`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--n", default=n)
    p.add_argument("--d", default=d)
    p.add_argument("--math", default="f32,tf32,bf16", help="on a GPU; the CPU runs f32")
    p.add_argument("--modes", default="eager,compile", help="eager, compile or both")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: leave as is)")
    p.add_argument("--lambd", type=float, default=0.0051)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="-", help="JSON-lines output file ('-': stdout)")
    return p


class Rows:
    """JSON lines to stdout, or to a file written whole (temporary file, then renamed)."""

    def __init__(self, path):
        self.path = path
        self.file = sys.stdout if path == "-" else open(path + ".tmp", "w")

    def write(self, row):
        print(json.dumps(row), file=self.file, flush=True)

    def close(self):
        if self.file is not sys.stdout:
            self.file.close()
            os.replace(self.path + ".tmp", self.path)


def main():
    args = parser(__doc__, "256,512,1024,2048,4096", "1024,2048,4096,8192,16384").parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("loss.py: CUDA is not available to PyTorch", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Rows(args.out)
    maths = args.math.split(",") if args.device == "cuda" else ["f32"]
    for n in map(int, args.n.split(",")):
        for d in map(int, args.d.split(",")):
            for math in maths:
                for mode in args.modes.split(","):
                    row = measure(torch, args, n, d, math, mode == "compile")
                    out.write(row)
                    print(f"pytorch {mode} N={n} D={d} {math}: {row['median_ms']} ms {row['status']}",
                          file=sys.stderr)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
