"""The compiled module's CUDA entry point without PyTorch: device memory and a caller's stream
made through the CUDA driver API (ctypes), the inputs copied in on that stream, the loss queued
after them, the results copied back on the same stream, and everything compared with the float64
reference the module also carries. It runs wherever libcuda has a device, the project's virtual
device included (scripts/test-vgpu.sh), which reports any access the call leaves unordered.

    PYTHONPATH=DIR_WITH__native.abi3.so python3 native_cuda.py
"""

import ctypes
import math
import random
import struct
import sys

import _native

cuda = ctypes.CDLL("libcuda.so.1")
u64, size, ptr = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), size]
cuda.cuMemFree_v2.argtypes = [u64]
cuda.cuMemcpyHtoDAsync_v2.argtypes = [u64, ptr, size, ptr]
cuda.cuMemcpyDtoHAsync_v2.argtypes = [ptr, u64, size, ptr]
cuda.cuStreamSynchronize.argtypes = [ptr]


def check(result, what):
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA error {result}")


check(cuda.cuInit(0), "cuInit")
device = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
context = ptr()
check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
stream = ptr()
check(cuda.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking


class Buffer:
    """`count` elements of `width` bytes on the device, with a host copy."""

    def __init__(self, count, width):
        self.count, self.width = count, width
        self.host = (ctypes.c_uint8 * (count * width))()
        self.dev = u64()
        check(cuda.cuMemAlloc_v2(ctypes.byref(self.dev), count * width), "cuMemAlloc")

    def upload(self):
        check(cuda.cuMemcpyHtoDAsync_v2(self.dev, ctypes.addressof(self.host), len(self.host),
                                        stream), "cuMemcpyHtoDAsync")

    def download(self):
        check(cuda.cuMemcpyDtoHAsync_v2(ctypes.addressof(self.host), self.dev, len(self.host),
                                        stream), "cuMemcpyDtoHAsync")

    def free(self):
        check(cuda.cuMemFree_v2(self.dev), "cuMemFree")


# Element codecs: float32, and bfloat16 / float16 by their bits.
def f32_pack(v):
    return struct.pack("<f", v)


def bf16_pack(v):
    return struct.pack("<f", v)[2:]  # the upper half of the f32 bits (rounded toward zero)


def f16_pack(v):
    return struct.pack("<e", v)


def f32_unpack(b):
    return struct.unpack("<f", b)[0]


def bf16_unpack(b):
    return struct.unpack("<f", b"\0\0" + b)[0]


def f16_unpack(b):
    return struct.unpack("<e", b)[0]


CODECS = {"float32": (4, f32_pack, f32_unpack), "bfloat16": (2, bf16_pack, bf16_unpack),
          "float16": (2, f16_pack, f16_unpack)}


def put(buf, values, pack):
    data = b"".join(pack(v) for v in values)
    ctypes.memmove(buf.host, data, len(data))


def get(buf, unpack):
    raw = bytes(buf.host)
    return [unpack(raw[i:i + buf.width]) for i in range(0, len(raw), buf.width)]


def reference(loss, za, zb, n, d):
    """Loss terms and gradients from the module's float64 reference."""
    a = (ctypes.c_double * (n * d))(*za)
    b = (ctypes.c_double * (n * d))(*zb)
    ga, gb = (ctypes.c_double * (n * d))(), (ctypes.c_double * (n * d))()
    terms = loss.cpu_f64(ctypes.addressof(a), ctypes.addressof(b), n, d,
                         ctypes.addressof(ga), ctypes.addressof(gb))
    return terms, list(ga), list(gb)


def rel(got, want):
    num = math.sqrt(sum((g - w) ** 2 for g, w in zip(got, want)))
    return num / max(math.sqrt(sum(w * w for w in want)), 1e-30)


def case(loss, dtype, n, d, seed, tol):
    width, pack, unpack = CODECS[dtype]
    rng = random.Random(seed)
    za = [unpack(pack(3.0 + rng.gauss(0, 1))) for _ in range(n * d)]  # as the device sees them
    zb = [unpack(pack(0.5 * rng.gauss(0, 1) - 1.0)) for _ in range(n * d)]
    (total, on, off), want_a, want_b = reference(loss, za, zb, n, d)
    a, b, ga, gb = (Buffer(n * d, width) for _ in range(4))
    out = Buffer(4, 4)
    put(a, za, pack)
    put(b, zb, pack)
    put(ga, [math.nan] * (n * d), pack)  # outputs poisoned
    put(gb, [math.nan] * (n * d), pack)
    put(out, [math.nan] * 4, f32_pack)
    for buf in (a, b, ga, gb, out):
        buf.upload()
    loss.cuda(dtype, 0, stream.value or 0, a.dev.value, b.dev.value, n, d, out.dev.value, 4,
              ga.dev.value, gb.dev.value)
    for buf in (out, ga, gb):
        buf.download()
    check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
    got = get(out, f32_unpack)
    assert abs(got[0] - total) <= tol * total, (got, total)
    assert abs(got[1] - on) <= tol * total and abs(got[2] - off) <= tol * total, (got, on, off)
    assert got[3] == 0.0, got
    ea, eb = rel(get(ga, unpack), want_a), rel(get(gb, unpack), want_b)
    assert ea <= tol and eb <= tol, (ea, eb)
    for buf in (a, b, ga, gb, out):
        buf.free()
    return f"{dtype} {n}x{d}: loss {got[0]:.6g} (float64 {total:.6g}), gradient errors {ea:.1e} {eb:.1e}"


def raises(kind, text, fn, *args):
    try:
        fn(*args)
    except kind as e:
        assert text in str(e), str(e)
        return
    raise AssertionError(f"expected {kind.__name__} ({text})")


def main():
    loss = _native.Loss(0.0051, 1e-5, "f32", "auto")
    print(case(loss, "float32", 37, 29, 1, 1e-5))
    print(case(loss, "float32", 19, 70, 2, 1e-5))  # the Gram path, a new workspace
    print(case(loss, "bfloat16", 64, 48, 3, 1e-2))
    print(case(loss, "float16", 40, 24, 4, 1e-2))
    buf = Buffer(16, 4)
    call = lambda dtype, n: loss.cuda(dtype, 0, stream.value or 0, buf.dev.value, buf.dev.value,
                                      n, 2, buf.dev.value, 4)
    raises(ValueError, "float64", call, "float64", 4)
    raises(ValueError, "N >= 2", call, "float32", 1)
    check(cuda.cuStreamSynchronize(stream), "cuStreamSynchronize")
    buf.free()
    print("native cuda: 4 cases and 2 errors passed")


if __name__ == "__main__":
    sys.exit(main())
