#!/usr/bin/env python3
"""Writes the built-in dataset: a balanced subset of Fashion-MNIST (MIT licence) taken from
Debian's dataset-fashion-mnist package, as gzipped IDX files in data/fashion-mnist-sample/.

    apt-get install dataset-fashion-mnist && python3 scripts/make-builtin-sample.py

The first 1,000 training images of each class (10,000) and the first 200 test images of each
class (2,000), in their original order. The output is deterministic (gzip mtime 0).
"""
import gzip
import os
import struct
import sys

SRC = "/usr/share/datasets/fashion-mnist"
DST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "fashion-mnist-sample")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return shape, data[4 + 4 * dims :]


def write_idx(path, magic_dims, shape, payload):
    header = struct.pack(">I", 0x0800 | magic_dims) + struct.pack(">" + "I" * len(shape), *shape)
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
            f.write(header + payload)


def subset(split, per_class):
    img_shape, pixels = read_idx(os.path.join(SRC, f"{split}-images-idx3-ubyte.gz"))
    _, labels = read_idx(os.path.join(SRC, f"{split}-labels-idx1-ubyte.gz"))
    n, h, w = img_shape
    taken = {c: 0 for c in range(10)}
    keep = []
    for i in range(n):
        c = labels[i]
        if taken[c] < per_class:
            taken[c] += 1
            keep.append(i)
    px = b"".join(pixels[i * h * w : (i + 1) * h * w] for i in keep)
    lb = bytes(labels[i] for i in keep)
    write_idx(os.path.join(DST, f"{split}-images-idx3-ubyte.gz"), 3, (len(keep), h, w), px)
    write_idx(os.path.join(DST, f"{split}-labels-idx1-ubyte.gz"), 1, (len(keep),), lb)
    return len(keep)


def main():
    if not os.path.isdir(SRC):
        print(f"{SRC} not found: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 1
    os.makedirs(DST, exist_ok=True)
    print("train", subset("train", 1000), "test", subset("t10k", 200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
