#!/usr/bin/env python3
"""Times each distinct convolution of the CPU main job's network in PyTorch, beside `cargo bench --bench layers`.

ResNet-18, width 16, small stem, 28x28x3, batch 256, f32, NCHW (PyTorch's default memory format):
forward, and backward (input and weight gradients; the first convolution's weight gradient only).
Prints one line per layer and pass with the median time of --steps calls and GFLOP/s.

    python3 benches/pytorch/layers.py --threads 2
"""
import argparse
import statistics
import time

import torch

# (name, side, in, out, kernel, stride): the distinct convolutions, in network order.
LAYERS = [
    ("conv1", 28, 3, 16, 3, 1),
    ("layer1.0.conv1", 28, 16, 16, 3, 1),
    ("layer2.0.conv1", 28, 16, 32, 3, 2),
    ("layer2.0.conv2", 14, 32, 32, 3, 1),
    ("layer2.0.downsample.0", 28, 16, 32, 1, 2),
    ("layer3.0.conv1", 14, 32, 64, 3, 2),
    ("layer3.0.conv2", 7, 64, 64, 3, 1),
    ("layer3.0.downsample.0", 14, 32, 64, 1, 2),
    ("layer4.0.conv1", 7, 64, 128, 3, 2),
    ("layer4.0.conv2", 4, 128, 128, 3, 1),
    ("layer4.0.downsample.0", 7, 64, 128, 1, 2),
]


def median_ms(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'layer':<24} {'shape':<22} {'pass':<8} {'ms':>8} {'GFLOP/s':>8}")
    for name, side, cin, cout, k, s in LAYERS:
        conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, bias=False)
        x = torch.randn(args.batch, cin, side, side, requires_grad=name != "conv1")
        y = conv(x)
        dy = torch.randn_like(y)
        flops = 2 * y.numel() * cin * k * k
        fwd = median_ms(lambda: conv(x), args.warmup, args.steps)

        def bwd():
            conv.weight.grad = None
            x.grad = None
            conv(x).backward(dy)

        # The backward call includes a forward; subtract the forward's median.
        back = median_ms(bwd, args.warmup, args.steps) - fwd
        shape = f"{side}x{side} {cin}->{cout} k{k} s{s}"
        passes = 1 + (name != "conv1")
        print(f"{name:<24} {shape:<22} {'forward':<8} {fwd:8.2f} {flops / fwd / 1e6:8.1f}")
        print(f"{name:<24} {shape:<22} {'backward':<8} {back:8.2f} {passes * flops / back / 1e6:8.1f}")


if __name__ == "__main__":
    main()
