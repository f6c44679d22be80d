// Self-test of the virtual CUDA device: a program that uses the driver API, the project's kernels
// and cublasGemmEx through libvgpu.so as any program would. Every check runs its violation in a
// child process, which must abort with the `vgpu: <kind>:` report, next to a legal control that
// must exit 0 without one, so a check that reports too much fails as surely as one that misses.
// scripts/test-vgpu.sh builds and runs it; by hand, after scripts/build-vgpu.sh:
//
//   c++ -std=c++20 -I .cuda/nvidia/cu13/include tests/vgpu/selftest.cpp -o target/vgpu/selftest
//     -L target/vgpu -lvgpu -Wl,-rpath,$PWD/target/vgpu -pthread && target/vgpu/selftest
#include <cuda.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "cublas_enums.h"

#define X(type, name, value) constexpr int name = value;
VGPU_CUBLAS_ENUMS(X)
#undef X

extern "C" {
struct cublasContext;
int cublasCreate_v2(cublasContext** handle);
int cublasGemmEx(cublasContext* handle, int transa, int transb, int m, int n, int k,
                 const void* alpha, const void* A, int Atype, int lda, const void* B, int Btype,
                 int ldb, const void* beta, void* C, int Ctype, int ldc, int computeType, int algo);
const char* vgpu_cublas_enum_table();
const char* vgpu_cudnn_enum_table();
struct ncclComm;
int ncclCommInitAll(ncclComm** comms, int n, const int* devices);
int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, ncclComm* comm,
                  CUstream stream);
int ncclGroupStart();
int ncclGroupEnd();
}

namespace {

// ---- In a child: the device, and helpers that end the child with a message on a surprise

[[noreturn]] void die(const char* what) {
  fprintf(stderr, "selftest: %s\n", what);
  _exit(1);
}
void expect(bool ok, const char* what) {
  if (!ok) die(what);
}
#define CK(call)                                                             \
  do {                                                                       \
    CUresult r_ = (call);                                                    \
    if (r_ != CUDA_SUCCESS) {                                                \
      fprintf(stderr, "selftest: %s returned %d\n", #call, int(r_));         \
      _exit(1);                                                              \
    }                                                                        \
  } while (0)

CUcontext primary;
CUmodule module;

template <class T>
void put(std::vector<unsigned char>& b, size_t at, T v) {
  memcpy(&b[at], &v, sizeof v);
}

// A fatbin header (magic, version, header size 16, payload size) and then `payload`.
std::vector<unsigned char> fatbin_of(const void* payload, size_t bytes) {
  std::vector<unsigned char> image(16 + bytes);
  put<uint32_t>(image, 0, 0xBA55ED50u);
  put<uint16_t>(image, 4, 1);
  put<uint16_t>(image, 6, 16);
  put<uint64_t>(image, 8, bytes);
  memcpy(&image[16], payload, bytes);
  return image;
}

CUmodule load(const std::vector<unsigned char>& image) {
  CUmodule m;
  CK(cuModuleLoadData(&m, image.data()));
  return m;
}

// A payload that names the kernels used here: cuModuleGetFunction finds a kernel only if its name
// is in the image.
CUmodule load_module() {
  static const char names[] =
      "naive_mul\0naive_affine\0naive_sum_partial\0naive_sum_final\0naive_cast_bf16";
  return load(fatbin_of(names, sizeof names));
}

// A minimal cubin as nvcc lays one out: an ELF64 header, a null section, `.shstrtab`, and the
// NOBITS `.nv.shared.naive_mul` whose size is the kernel's static shared memory. The string table
// also holds "naive_mul\0", which cuModuleGetFunction needs to find in the image.
constexpr size_t kShoff = 128;
std::vector<unsigned char> cubin(uint64_t shared) {
  static const char names[] = "\0.shstrtab\0.nv.shared.naive_mul";
  std::vector<unsigned char> e(kShoff + 3 * 64);
  memcpy(&e[0], "\x7f" "ELF\x02\x01\x01", 7);  // ELF64, little-endian, version 1
  put<uint16_t>(e, 16, 2);                       // ET_EXEC
  put<uint16_t>(e, 18, 190);                     // EM_CUDA
  put<uint32_t>(e, 20, 1);
  put<uint64_t>(e, 40, kShoff);
  put<uint16_t>(e, 52, 64);  // e_ehsize
  put<uint16_t>(e, 58, 64);  // e_shentsize
  put<uint16_t>(e, 60, 3);   // e_shnum
  put<uint16_t>(e, 62, 1);   // e_shstrndx
  memcpy(&e[64], names, sizeof names);
  auto section = [&](size_t i, uint32_t name, uint32_t type, uint64_t off, uint64_t size) {
    const size_t h = kShoff + 64 * i;
    put(e, h, name);
    put(e, h + 4, type);
    put(e, h + 24, off);
    put(e, h + 32, size);
  };
  section(1, 1, 3, 64, sizeof names);  // SHT_STRTAB
  section(2, 11, 8, 0, shared);        // SHT_NOBITS
  return e;
}

// A fatbin of one cubin entry (kind 2, a 64-byte entry header as nvcc writes) holding `elf`.
constexpr size_t kElf = 16 + 64;  // where the ELF starts in the image
std::vector<unsigned char> fatbin(const std::vector<unsigned char>& elf) {
  std::vector<unsigned char> entry(64);
  put<uint16_t>(entry, 0, 2);
  put<uint32_t>(entry, 4, 64);
  put<uint64_t>(entry, 8, elf.size());
  entry.insert(entry.end(), elf.begin(), elf.end());
  return fatbin_of(entry.data(), entry.size());
}

// fatbin(cubin(4096)) with the T at `at` in the image replaced by `v`, or its ELF cut to `bytes`.
template <class T>
std::vector<unsigned char> damage(size_t at, T v) {
  std::vector<unsigned char> image = fatbin(cubin(4096));
  put(image, at, v);
  return image;
}
std::vector<unsigned char> cut(size_t bytes) {
  std::vector<unsigned char> elf = cubin(4096);
  elf.resize(bytes);
  return fatbin(elf);
}

int static_shared() {
  CUfunction f;
  CK(cuModuleGetFunction(&f, module, "naive_mul"));
  int v;
  CK(cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f));
  return v;
}

void setup() {
  CK(cuInit(0));
  CK(cuDevicePrimaryCtxRetain(&primary, 0));
  CK(cuCtxSetCurrent(primary));
  module = load_module();
}

CUresult launch(const char* kernel, std::vector<void*> args, unsigned grid, unsigned block,
                CUstream s = nullptr, unsigned grid_y = 1, unsigned shared = 0) {
  CUfunction f;
  CK(cuModuleGetFunction(&f, module, kernel));
  return cuLaunchKernel(f, grid, grid_y, 1, block, 1, 1, shared, s, args.data(), nullptr);
}

// out = 2 x + 1 over `len` elements.
CUresult affine(CUdeviceptr x, CUdeviceptr out, int64_t len, CUstream s = nullptr) {
  float a = 2, b = 1;
  return launch("naive_affine", {&x, &out, &len, &a, &b}, unsigned((len + 127) / 128), 128, s);
}

CUdeviceptr alloc(size_t floats) {
  CUdeviceptr p;
  CK(cuMemAlloc(&p, floats * sizeof(float)));
  return p;
}

CUdeviceptr upload(const std::vector<float>& v) {
  CUdeviceptr p = alloc(v.size());
  CK(cuMemcpyHtoD(p, v.data(), v.size() * sizeof(float)));
  return p;
}

std::vector<float> download(CUdeviceptr p, size_t n) {
  std::vector<float> v(n);
  CK(cuMemcpyDtoH(v.data(), p, n * sizeof(float)));
  return v;
}

std::vector<float> iota(size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = float(i);
  return v;
}

// out = a * b over 1000 elements, checked when the launch succeeds.
CUresult mul(unsigned dynamic_shared = 0) {
  int64_t n = 1000;
  CUdeviceptr a = upload(iota(n)), b = upload(iota(n)), out = alloc(n);
  CUresult r = launch("naive_mul", {&a, &b, &out, &n}, 8, 128, nullptr, 1, dynamic_shared);
  if (r != CUDA_SUCCESS) return r;
  std::vector<float> v = download(out, n);
  for (int64_t i = 0; i < n; ++i) expect(v[i] == float(i) * float(i), "naive_mul result");
  return r;
}

CUstream new_stream() {
  CUstream s;
  CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
  return s;
}

// C = A · B, all 2 × 2 f32, column-major.
int gemm_2x2(CUdeviceptr a, CUdeviceptr b, CUdeviceptr c) {
  cublasContext* h;
  expect(cublasCreate_v2(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
  float one = 1, zero = 0;
  return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, (void*)a, CUDA_R_32F, 2,
                      (void*)b, CUDA_R_32F, 2, &zero, (void*)c, CUDA_R_32F, 2, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

// The product of a non-symmetric A and B, so that a transposed A shows.
std::vector<float> gemm_result() {
  CUdeviceptr c = alloc(4);
  int r = gemm_2x2(upload({1, 2, 3, 4}), upload({1, 0, 0, 2}), c);
  expect(r == CUBLAS_STATUS_SUCCESS, "cublasGemmEx failed");
  return download(c, 4);
}

// Captures `body` on a new non-blocking stream in `mode` and returns the stream and its graph,
// instantiated.
struct Captured {
  CUstream stream;
  CUgraphExec exec;
};
template <class F>
Captured capture(F body, CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL) {
  CUstream s = new_stream();
  CK(cuStreamBeginCapture(s, mode));
  CUstreamCaptureStatus status;
  CK(cuStreamIsCapturing(s, &status));
  expect(status == CU_STREAM_CAPTURE_STATUS_ACTIVE, "the stream does not say it captures");
  body(s);
  CUgraph g;
  CK(cuStreamEndCapture(s, &g));
  CUgraphExec e;
  CK(cuGraphInstantiate(&e, g, 0));
  CK(cuGraphDestroy(g));
  return {s, e};
}

// Lines `TYPE::NAME=VALUE`, a decimal VALUE, one of them `line`.
bool enum_table_ok(const char* table, const char* line) {
  if (!strstr(table, line)) return false;
  for (const char* p = table; *p;) {
    const char* nl = strchr(p, '\n');
    if (!nl) return false;
    const char *sep = strstr(p, "::"), *eq = strchr(p, '=');
    if (!sep || !eq || sep == p || eq < sep + 3 || eq > nl) return false;
    char* end;
    strtol(eq + 1, &end, 10);
    if (end == eq + 1 || end != nl) return false;
    p = nl + 1;
  }
  return true;
}

// ---- The cases


// ---- NCCL: two ranks on the two devices of one process, driven from this thread

constexpr int kNcclFloat32 = 7, kNcclSum = 0;
struct TwoRanks {
  ncclComm* comm[2];
  CUcontext ctx[2];
  CUdeviceptr buf[2];
};

// Each device's buffer holds `n` floats, rank r's all equal to r + 1.
TwoRanks two_ranks(size_t n) {
  setenv("VGPU_DEVICES", "2", 1);
  CK(cuInit(0));
  TwoRanks t;
  for (int r = 0; r < 2; ++r) {
    CK(cuDevicePrimaryCtxRetain(&t.ctx[r], r));
    CK(cuCtxSetCurrent(t.ctx[r]));
    t.buf[r] = upload(std::vector<float>(n, float(r + 1)));
  }
  expect(ncclCommInitAll(t.comm, 2, nullptr) == 0, "ncclCommInitAll");
  return t;
}

// All-reduces rank r's buffer on `streams[r]` (null: the null stream), `counts[r]` elements.
void all_reduce(TwoRanks& t, const size_t* counts, CUstream* streams = nullptr) {
  expect(ncclGroupStart() == 0, "ncclGroupStart");
  for (int r = 0; r < 2; ++r)
    expect(ncclAllReduce(reinterpret_cast<void*>(t.buf[r]), reinterpret_cast<void*>(t.buf[r]),
                         counts[r], kNcclFloat32, kNcclSum, t.comm[r],
                         streams ? streams[r] : nullptr) == 0,
           "ncclAllReduce");
  expect(ncclGroupEnd() == 0, "ncclGroupEnd");
}

struct Case {
  const char* name;
  const char* report;  // the `vgpu: <kind>:` the child must abort with; null: it must exit 0
  void (*body)();
  const char* mutate = nullptr;  // VGPU_MUTATE for the child
};

const Case kCases[] = {
    {"launch computes", nullptr,
     [] {
       setup();
       CK(mul());
     }},
    {"host pointer as kernel argument", "invalid pointer",
     [] {
       setup();
       static float host[256];
       affine(CUdeviceptr(host), alloc(256), 256);
     }},
    {"use after free (launch)", "use after free",
     [] {
       setup();
       CUdeviceptr x = upload(iota(256)), out = alloc(256);
       CK(cuMemFree(x));
       affine(x, out, 256);
     }},
    {"use after free (copy)", "use after free",
     [] {
       setup();
       CUdeviceptr x = upload(iota(256));
       CK(cuMemFree(x));
       download(x, 256);
     }},
    {"use, then free", nullptr,
     [] {
       setup();
       CUdeviceptr x = upload(iota(256)), out = alloc(256);
       CK(affine(x, out, 256));
       CK(cuMemFree(x));
       CK(cuMemFree(out));
     }},
    {"double free", "double free",
     [] {
       setup();
       CUdeviceptr x = alloc(256);
       CK(cuMemFree(x));
       cuMemFree(x);
     }},
    // 1024 floats fill a page exactly, so the element after the last lies in the guard page.
    {"kernel reads a page past the end", "out of bounds",
     [] {
       setup();
       affine(upload(iota(1024)), alloc(2048), 2048);
     }},
    {"kernel reads to the end", nullptr,
     [] {
       setup();
       CK(affine(upload(iota(1024)), alloc(2048), 1024));
     }},
    // 100 floats end 112 bytes short of the 256-byte boundary: one more lands in the slack.
    {"kernel writes one element past the end", "out of bounds",
     [] {
       setup();
       affine(upload(iota(128)), alloc(100), 101);
     }},
    {"kernel writes to the end", nullptr,
     [] {
       setup();
       CUdeviceptr out = alloc(100);
       CK(affine(upload(iota(128)), out, 100));
       std::vector<float> r = download(out, 100);
       for (int i = 0; i < 100; ++i) expect(r[i] == 2.f * float(i) + 1.f, "naive_affine result");
     }},
    {"copy one element past the end", "out of bounds",
     [] {
       setup();
       std::vector<float> h(101);
       cuMemcpyHtoD(alloc(100), h.data(), 101 * sizeof(float));
     }},
    {"copy to the end", nullptr,
     [] {
       setup();
       std::vector<float> h(100);
       CK(cuMemcpyHtoD(alloc(100), h.data(), 100 * sizeof(float)));
     }},
    {"memory of another context", "wrong context",
     [] {
       setup();
       CUcontext other;
       CK(cuCtxCreate_v4(&other, nullptr, 0, 0));
       CUdeviceptr x = upload(iota(256));
       CK(cuCtxSetCurrent(primary));
       affine(x, alloc(256), 256);
     }},
    {"memory of its own second context", nullptr,
     [] {
       setup();
       CUcontext other;
       CK(cuCtxCreate_v4(&other, nullptr, 0, 0));
       module = load_module();
       CK(affine(upload(iota(256)), alloc(256), 256));
     }},
    {"misaligned float pointer", "misaligned pointer",
     [] {
       setup();
       affine(upload(iota(256)) + 2, alloc(256), 16);
     }},
    {"aligned interior pointer", nullptr,
     [] {
       setup();
       CK(affine(upload(iota(256)) + 4, alloc(256), 16));
     }},
    {"new memory reads as NaN", nullptr,
     [] {
       setup();
       CUdeviceptr x = alloc(300), out = alloc(300);
       std::vector<unsigned char> bytes(300 * sizeof(float));
       CK(cuMemcpyDtoH(bytes.data(), x, bytes.size()));
       for (unsigned char c : bytes) expect(c == 0xFF, "a byte of a new allocation is not 0xFF");
       CK(affine(x, out, 300));
       for (float v : download(out, 300)) expect(v != v, "a result from new memory is not NaN");
     }},
    {"stream order: allocation on A, copy on B", "stream order",
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUdeviceptr p;
       CK(cuMemAllocAsync(&p, 1024, a));
       std::vector<char> h(1024);
       cuMemcpyHtoDAsync(p, h.data(), h.size(), b);
     }},
    {"stream order: allocation on A, event, copy on B", nullptr,
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUevent e;
       CK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
       CUdeviceptr p;
       CK(cuMemAllocAsync(&p, 1024, a));
       CK(cuEventRecord(e, a));
       CK(cuStreamWaitEvent(b, e, 0));
       std::vector<char> h(1024);
       CK(cuMemcpyHtoDAsync(p, h.data(), h.size(), b));
     }},
    {"stream order: allocation on A, host sync, copy on B", nullptr,
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUdeviceptr p;
       CK(cuMemAllocAsync(&p, 1024, a));
       CK(cuStreamSynchronize(a));
       std::vector<char> h(1024);
       CK(cuMemcpyHtoDAsync(p, h.data(), h.size(), b));
     }},
    {"stream order: write on A, kernel reads on B", "stream order",
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUdeviceptr x = alloc(256), out = alloc(256);
       std::vector<float> h = iota(256);
       CK(cuMemcpyHtoDAsync(x, h.data(), 256 * sizeof(float), a));
       affine(x, out, 256, b);
     }},
    {"stream order: write on A, event, kernel reads on B", nullptr,
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUevent e;
       CK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
       CUdeviceptr x = alloc(256), out = alloc(256);
       std::vector<float> h = iota(256);
       CK(cuMemcpyHtoDAsync(x, h.data(), 256 * sizeof(float), a));
       CK(cuEventRecord(e, a));
       CK(cuStreamWaitEvent(b, e, 0));
       CK(affine(x, out, 256, b));
     }},
    {"stream order: write on A, free on B", "stream order",
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUdeviceptr x = alloc(256);
       std::vector<float> h = iota(256);
       CK(cuMemcpyHtoDAsync(x, h.data(), 256 * sizeof(float), a));
       cuMemFreeAsync(x, b);
     }},
    {"stream order: write on A, host sync, free on B", nullptr,
     [] {
       setup();
       CUstream a = new_stream(), b = new_stream();
       CUdeviceptr x = alloc(256);
       std::vector<float> h = iota(256);
       CK(cuMemcpyHtoDAsync(x, h.data(), 256 * sizeof(float), a));
       CK(cuStreamSynchronize(a));
       CK(cuMemFreeAsync(x, b));
     }},
    {"launch limits", nullptr,
     [] {
       setup();
       CUdeviceptr x = upload(iota(1024)), out = alloc(1024);
       int64_t n = 1024;
       float a = 2, b = 1;
       std::vector<void*> args{&x, &out, &n, &a, &b};
       expect(launch("naive_affine", args, 1, 1025) == CUDA_ERROR_INVALID_VALUE, "block of 1025");
       expect(launch("naive_affine", args, 1, 1, nullptr, 65536) == CUDA_ERROR_INVALID_VALUE,
              "grid y of 65536");
       expect(launch("naive_affine", args, 1, 1, nullptr, 1, 48 * 1024 + 1) ==
                  CUDA_ERROR_INVALID_VALUE,
              "48 KiB + 1 of dynamic shared memory");
       CK(launch("naive_affine", args, 1, 1024));
       CK(launch("naive_affine", args, 1, 1, nullptr, 65535, 48 * 1024));
       CUfunction f;
       expect(cuModuleGetFunction(&f, module, "naive_square") == CUDA_ERROR_NOT_FOUND,
              "a kernel not in the image is found");
     }},
    // Static shared memory, read from the cubin, counts against the 48 KiB with the dynamic.
    {"static shared memory from the cubin", nullptr,
     [] {
       setup();
       module = load(fatbin(cubin(4096)));
       expect(static_shared() == 4096, "CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES is not 4096");
       CK(mul(1024));
     }},
    {"static shared memory over 48 KiB", nullptr,
     [] {
       setup();
       module = load(fatbin(cubin(48 * 1024 + 1)));
       expect(mul() == CUDA_ERROR_INVALID_VALUE, "48 KiB + 1 of static shared memory");
     }},
    {"static and dynamic shared memory together", nullptr,
     [] {
       setup();
       module = load(fatbin(cubin(44 * 1024)));
       expect(mul(4097) == CUDA_ERROR_INVALID_VALUE, "44 KiB static + 4097 dynamic");
       CK(mul(4096));
     }},
    // A damaged cubin still loads (its kernels are found by name), declaring no shared memory.
    {"damaged cubins", nullptr,
     [] {
       constexpr size_t strtab = kElf + kShoff + 64, shared = strtab + 64;  // section headers
       static const struct {
         const char* what;
         std::vector<unsigned char> (*image)();
       } damaged[] = {
           {"cut after the string table", [] { return cut(96); }},
           {"cut inside a section header", [] { return cut(kShoff + 3 * 64 - 32); }},
           {"not ELF64", [] { return damage<uint8_t>(kElf + 4, 1); }},
           {"section headers past the end", [] { return damage<uint64_t>(kElf + 40, 1ull << 40); }},
           {"section header offset that wraps", [] { return damage<uint64_t>(kElf + 40, -64ull); }},
           {"section header size 0", [] { return damage<uint16_t>(kElf + 58, 0); }},
           {"string table index out of range", [] { return damage<uint16_t>(kElf + 60, 1); }},
           {"string table past the payload", [] { return damage<uint64_t>(strtab + 24, 300); }},
           {"string table offset + size that wraps",
            [] {
              std::vector<unsigned char> image = damage<uint64_t>(strtab + 24, 1ull << 63);
              put<uint64_t>(image, strtab + 32, (1ull << 63) + 32);
              return image;
            }},
           {"string table ending inside a name", [] { return damage<uint64_t>(strtab + 32, 20); }},
           {"section name past the string table", [] { return damage<uint32_t>(shared, 1000); }},
           {"entry header under 16 bytes", [] { return damage<uint32_t>(20, 8); }},
           {"entry payload past the image", [] { return damage<uint64_t>(24, 1ull << 40); }},
       };
       setup();
       for (const auto& d : damaged) {
         fprintf(stderr, "selftest: %s\n", d.what);  // so that a crash names its cubin
         module = load(d.image());
         if (static_shared() != 0) die(d.what);
       }
     }},
    // Two-stage sum over several blocks: block_sum's barriers must hold every thread of a block.
    {"barriers across blocks", nullptr,
     [] {
       setup();
       int64_t n = 10000, blocks = 8;
       std::vector<float> h(n);
       for (int64_t i = 0; i < n; ++i) h[i] = float(i % 5);
       CUdeviceptr x = upload(h), partials = alloc(blocks), out = alloc(1);
       CK(launch("naive_sum_partial", {&x, &partials, &n}, unsigned(blocks), 256));
       CK(launch("naive_sum_final", {&partials, &out, &blocks}, 1, 64));
       expect(download(out, 1)[0] == 20000.f, "sum of 10000 elements (i % 5) is not 20000");
     }},
    {"gemm", nullptr,
     [] {
       setup();
       expect(gemm_result() == std::vector<float>{1, 2, 6, 8}, "C = A B");
     }},
    {"gemm operand past the end", "out of bounds",
     [] {
       setup();
       gemm_2x2(alloc(3), alloc(4), alloc(4));  // A holds 3 of its 4 elements
     }},
    {"enum tables", nullptr,
     [] {
       expect(enum_table_ok(vgpu_cublas_enum_table(), "cublasOperation_t::CUBLAS_OP_N=0\n"),
              "cuBLAS enum table");
       expect(enum_table_ok(vgpu_cudnn_enum_table(), "cudnnStatus_t::CUDNN_STATUS_SUCCESS=0\n"),
              "cuDNN enum table");
     }},
    // The mutations: each must change what a call computes, and say so once.
    {"mutation swap:naive_affine", nullptr,
     [] {
       setup();
       CUdeviceptr x = upload(iota(256)), out = upload(std::vector<float>(256, 0.f));
       CK(affine(x, out, 256));
       CK(affine(x, out, 256));  // a second launch: still one line
       for (float v : download(out, 256)) expect(v == 0.f, "the output was written");
       for (float v : download(x, 256)) expect(v == 1.f, "the input was not set to 2 * 0 + 1");
     },
     "swap:naive_affine"},
    {"mutation transpose", nullptr,
     [] {
       setup();
       expect(gemm_result() == std::vector<float>{1, 3, 4, 8}, "C = A^T B");
     },
     "transpose"},
    {"captured work runs at each graph launch, not at capture", nullptr,
     [] {
       setup();
       CUdeviceptr x = upload(iota(256)), y = alloc(256), out = alloc(256);
       float* pinned;
       CK(cuMemAllocHost((void**)&pinned, 256 * sizeof(float)));
       Captured c = capture([&](CUstream s) {
         CUevent e;
         CK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
         CK(cuMemcpyHtoDAsync(x, pinned, 256 * sizeof(float), s));  // pinned: capturable
         CK(cuEventRecord(e, s));
         CK(cuStreamWaitEvent(s, e, 0));  // a point of this same capture
         CK(cuMemcpyDtoDAsync(y, x, 256 * sizeof(float), s));
         CK(affine(y, out, 256, s));
       });
       for (float v : download(out, 256)) expect(v != v, "the captured kernel ran at capture");
       for (int round = 0; round < 2; ++round) {
         for (int i = 0; i < 256; ++i) pinned[i] = float(i + 10 * round);
         CK(cuGraphLaunch(c.exec, c.stream));
         CK(cuStreamSynchronize(c.stream));
         std::vector<float> r = download(out, 256);
         for (int i = 0; i < 256; ++i)
           expect(r[i] == 2.f * float(i + 10 * round) + 1.f, "graph launch result");
       }
       CK(cuGraphExecDestroy(c.exec));
     }},
    {"stream synchronize during capture", "stream capture",
     [] {
       setup();
       capture([](CUstream s) { cuStreamSynchronize(s); });
     }},
    {"allocation during a global capture", "stream capture",
     [] {
       setup();
       capture([](CUstream) { alloc(16); });
     }},
    {"allocation during a relaxed capture", nullptr,
     [] {
       setup();
       capture([](CUstream) { alloc(16); }, CU_STREAM_CAPTURE_MODE_RELAXED);
     }},
    {"capture waits for an event recorded outside it", "stream capture",
     [] {
       setup();
       CUstream other = new_stream();
       CUevent e;
       CK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
       CK(cuEventRecord(e, other));
       capture([&](CUstream s) { cuStreamWaitEvent(s, e, 0); });
     }},
    {"pageable copy during capture", "stream capture",
     [] {
       setup();
       CUdeviceptr x = alloc(4);
       static float host[4];
       capture([&](CUstream s) { cuMemcpyHtoDAsync(x, host, sizeof host, s); });
     }},
    {"nccl: all-reduce across two devices", nullptr,
     [] {
       TwoRanks t = two_ranks(5);
       size_t counts[2] = {5, 5};
       all_reduce(t, counts);
       for (int r = 0; r < 2; ++r) {
         CK(cuCtxSetCurrent(t.ctx[r]));
         for (float v : download(t.buf[r], 5)) expect(v == 3.0f, "all-reduced value");
       }
     }},
    {"nccl: ranks disagree on the count", "nccl",
     [] {
       TwoRanks t = two_ranks(5);
       size_t counts[2] = {5, 4};
       all_reduce(t, counts);
     }},
    {"nccl: result read on another stream without an event", "stream order",
     [] {
       TwoRanks t = two_ranks(4);
       CUstream s[2];
       for (int r = 1; r >= 0; --r) {
         CK(cuCtxSetCurrent(t.ctx[r]));
         s[r] = new_stream();
       }
       size_t counts[2] = {4, 4};
       all_reduce(t, counts, s);
       CUstream other = new_stream();
       std::vector<float> h(4);
       cuMemcpyDtoHAsync(h.data(), t.buf[0], 16, other);
     }},
    {"nccl: result read on another stream after an event", nullptr,
     [] {
       TwoRanks t = two_ranks(4);
       CUstream s[2];
       for (int r = 1; r >= 0; --r) {
         CK(cuCtxSetCurrent(t.ctx[r]));
         s[r] = new_stream();
       }
       size_t counts[2] = {4, 4};
       all_reduce(t, counts, s);
       CUevent e;
       CK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
       CK(cuEventRecord(e, s[0]));
       CUstream other = new_stream();
       CK(cuStreamWaitEvent(other, e, 0));
       std::vector<float> h(4);
       CK(cuMemcpyDtoHAsync(h.data(), t.buf[0], 16, other));
       CK(cuStreamSynchronize(other));
       expect(h[0] == 3.0f, "all-reduced value");
     }},
    {"nccl: one thread drives both ranks without a group", "nccl",
     [] {
       setenv("VGPU_NCCL_TIMEOUT_S", "1", 1);
       TwoRanks t = two_ranks(2);
       ncclAllReduce(reinterpret_cast<void*>(t.buf[0]), reinterpret_cast<void*>(t.buf[0]), 2,
                     kNcclFloat32, kNcclSum, t.comm[0], nullptr);
     }},
    {"mutation of an unknown kernel", "mutation", [] { setup(); }, "swap:naive_nope"},
    {"mutation of a kernel with no pair", "mutation", [] { setup(); }, "swap:naive_cast_bf16"},
    {"mutation of an unknown kind", "mutation", [] { setup(); }, "transposed"},
};

// Runs a case in a child; returns an empty string if it behaved, else why not.
std::string run(const Case& c) {
  int fd[2];
  if (pipe(fd) != 0) return "pipe failed";
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    close(fd[0]);
    dup2(fd[1], 2);
    close(fd[1]);
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);  // every abort here is expected; no core files
    if (c.mutate) setenv("VGPU_MUTATE", c.mutate, 1); else unsetenv("VGPU_MUTATE");
    alarm(120);
    c.body();
    fflush(stderr);
    _exit(0);
  }
  close(fd[1]);
  std::string err;
  char buf[4096];
  for (ssize_t n; (n = read(fd[0], buf, sizeof buf)) > 0;) err.append(buf, size_t(n));
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);

  // The child's last line of output, and how it ended, for a report.
  size_t end = err.find_last_not_of('\n');
  std::string last = end == std::string::npos ? "no output" : err.substr(0, end + 1);
  last = last.substr(last.find_last_of('\n') + 1);  // npos + 1 == 0
  std::string ended = WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
                                        : "signal " + std::to_string(WTERMSIG(status));
  if (c.report) {
    std::string want = std::string("vgpu: ") + c.report + ":";
    if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGABRT || err.find(want) == std::string::npos)
      return "expected an abort with `" + want + "`, got " + ended + " (" + last + ")";
    return "";
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return ended + " (" + last + ")";
  // A legal run is silent, but for the one line (however many calls it changed) that says a
  // mutation is active.
  size_t from = 0;
  if (c.mutate) {
    from = err.find("vgpu: mutation active:");
    if (from == std::string::npos) return "no `vgpu: mutation active:` line";
    ++from;
  }
  if (err.find("vgpu: ", from) != std::string::npos) return "unexpected report (" + last + ")";
  return "";
}

}  // namespace

int main() {
  int passed = 0, failed = 0;
  for (const Case& c : kCases) {
    std::string why = run(c);
    if (why.empty()) {
      ++passed;
      printf("ok %s\n", c.name);
    } else {
      ++failed;
      printf("FAIL %s: %s\n", c.name, why.c_str());
    }
  }
  printf("selftest: %d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
