#!/usr/bin/env python3
"""Times the full reference Barlow Twins training step in PyTorch on one device, beside `barlow bench train`.

One step is: zero_grad(set_to_none=True), forward of both views through backbone and projector plus
the loss, backward, LARS step -- the model, projector, loss and LARS of train.py, which follow the
reference training code. Inputs are two fixed random device-resident views, so no data loading is
measured. Prints one JSON line per mode (eager, compile):
{"impl": "pytorch-eager" | "pytorch-compile", "arch", "stem", "image", "batch", "width", "projector",
 "precision", "channels_last", "warmup", "steps", "step_ms_median", "step_ms_mean", "images_per_s",
 "views_per_s", "breakdown_ms": {"forward", "backward", "optimizer"}, "peak_mem_bytes", "loss",
 "device", "torch"}, or the configuration with "error" when a mode fails.

    python3 benches/pytorch/train_bench.py --preset paper --mode both
    python3 benches/pytorch/train_bench.py --preset small --precision f32 --no-channels-last --steps 50
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train import LARS, BarlowTwins  # noqa: E402  (same model, loss and optimizer as the recipe)

PRESETS = {
    # The paper's ImageNet setting.
    "paper": dict(arch="resnet50", stem="imagenet", image=224, batch=256, width=64, projector="8192,8192,8192"),
    # CIFAR-sized inputs: 3x3 stride-1 stem, no max-pool.
    "small": dict(arch="resnet18", stem="small", image=32, batch=256, width=64, projector="8192,8192,8192"),
}
# Peak learning rates of the reference recipe (scaled by batch/256 below); the schedule itself is
# host-side arithmetic and does not change the step's work, so they stay fixed.
LR_WEIGHTS, LR_BIASES = 0.2, 0.0048


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="defaults for the flags below")
    p.add_argument("--arch", choices=["resnet50", "resnet18"])
    p.add_argument("--stem", choices=["imagenet", "small"])
    p.add_argument("--image", type=int, help="view side in pixels")
    p.add_argument("--batch", type=int, help="images per step (each seen as two views)")
    p.add_argument("--width", type=int, help="first-stage channel width")
    p.add_argument("--projector", help="projector layer sizes, comma-separated")
    p.add_argument("--precision", choices=["bf16", "f32"], default="bf16",
                   help="bf16: bf16 autocast; f32: fp32 with TF32 disabled")
    p.add_argument("--mode", choices=["eager", "compile", "both"], default="eager")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=True)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--breakdown-steps", type=int, default=10, help="extra steps timed per phase (0: none)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: leave as is)")
    p.add_argument("--lambd", type=float, default=0.0051)
    p.add_argument("--weight-decay", type=float, default=1.5e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.projector = [int(v) for v in args.projector.split(",")]
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


class Timer:
    """Marks points in the step; CUDA events on the GPU (device time, no host sync in between),
    perf_counter on the CPU (where every op is synchronous)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def run_mode(args, compiled, dev, y1, y2):
    cuda = dev.type == "cuda"
    # Same initial weights in every mode.
    torch.manual_seed(args.seed)
    model = BarlowTwins(args, in_ch=3).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = [q for q in model.parameters() if q.ndim != 1]
    biases = [q for q in model.parameters() if q.ndim == 1]
    scale = args.batch / 256
    opt = LARS([{"params": weights, "lr": LR_WEIGHTS * scale}, {"params": biases, "lr": LR_BIASES * scale}],
               lr=0, weight_decay=args.weight_decay)
    # Only forward + loss is compiled, as in train.py; backward follows from the compiled graph.
    fn = torch.compile(model) if compiled else model
    bf16 = args.precision == "bf16"

    def forward():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(y1, y2)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        opt.step()
        return loss

    t = Timer(cuda)
    for _ in range(args.warmup):
        step()
    t.sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    # Timed steps are queued back to back with no sync, so host launch overhead shows up in the
    # device-side gaps just as it does in training.
    marks = [t.mark()]
    for _ in range(args.steps):
        loss = step()
        marks.append(t.mark())
    t.sync()
    times = [t.ms(a, b) for a, b in zip(marks, marks[1:])]
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    last_loss = loss.item()

    # Per-phase times come from separate steps, so the marks cannot disturb the timed ones.
    phases = {"forward": [], "backward": [], "optimizer": []}
    pending = []
    for _ in range(args.breakdown_steps):
        opt.zero_grad(set_to_none=True)
        m0 = t.mark()
        loss = forward()
        m1 = t.mark()
        loss.backward()
        m2 = t.mark()
        opt.step()
        m3 = t.mark()
        pending.append((m0, m1, m2, m3))
    t.sync()
    for m0, m1, m2, m3 in pending:
        phases["forward"].append(t.ms(m0, m1))
        phases["backward"].append(t.ms(m1, m2))
        phases["optimizer"].append(t.ms(m2, m3))

    median = statistics.median(times)
    return {
        "step_ms_median": median,
        "step_ms_mean": statistics.mean(times),
        "images_per_s": args.batch / (median / 1e3),
        "views_per_s": 2 * args.batch / (median / 1e3),
        "breakdown_ms": {k: statistics.median(v) for k, v in phases.items()} if args.breakdown_steps else None,
        "peak_mem_bytes": peak,
        # A diverged step costs the same, but a non-finite loss is worth knowing about.
        "loss": last_loss if math.isfinite(last_loss) else None,
    }


def error_text(e):
    # Compiler failures can put the useful part after a generic first line; keep a few lines,
    # less the trailing hints about verbose logging.
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    lines = [s for s in lines if "TORCHDYNAMO_VERBOSE" not in s and "TORCH_LOGS" not in s]
    return (f"{type(e).__name__}: " + " | ".join(lines[:3]))[:600]


def main():
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_bench.py: CUDA is not available to PyTorch", file=sys.stderr)
        return 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        # As the reference training code does.
        torch.backends.cudnn.benchmark = True
        if args.precision == "f32":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    # Two fixed random views (not zeros: values should look like normalized images), made once.
    g = torch.Generator(device=dev).manual_seed(args.seed)
    shape = (args.batch, 3, args.image, args.image)
    y1 = torch.randn(shape, generator=g, device=dev)
    y2 = torch.randn(shape, generator=g, device=dev)
    if args.channels_last:
        y1, y2 = y1.contiguous(memory_format=torch.channels_last), y2.contiguous(memory_format=torch.channels_last)

    modes = ["eager", "compile"] if args.mode == "both" else [args.mode]
    ran = 0
    for mode in modes:
        row = {"impl": f"pytorch-{mode}", "arch": args.arch, "stem": args.stem, "image": args.image,
               "batch": args.batch, "width": args.width, "projector": args.projector,
               "precision": args.precision, "channels_last": args.channels_last,
               "warmup": args.warmup, "steps": args.steps}
        try:
            row.update(run_mode(args, mode == "compile", dev, y1, y2))
            ran += 1
        except Exception as e:  # OOM, compiler failures: report and go on with the next mode
            traceback.print_exc(file=sys.stderr)
            row["error"] = "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else error_text(e)
        row["device"] = device_name
        row["torch"] = torch.__version__
        print(json.dumps(row), flush=True)
        # Release this mode's model, optimizer state and compiled graphs before the next one.
        gc.collect()
        if mode == "compile":
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
