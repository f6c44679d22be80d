// The cuBLAS part of the virtual device: handles and cublasGemmEx for the types the project uses,
// computed on the host when enqueued. No cuBLAS header is at hand, so the prototypes are declared
// here from the values in cublas_enums.h; enums pass as int, as in the C ABI.
#include <cuda.h>
#include <stdlib.h>
#include <string.h>

#include <set>

#include "cublas_enums.h"
#include "cuda_scalars.h"  // the bf16 conversions the kernels use
#include "vgpu.h"

typedef int cublasStatus_t;
typedef int cublasOperation_t;
typedef int cudaDataType_t;
typedef int cublasComputeType_t;
typedef int cublasGemmAlgo_t;
typedef int cublasPointerMode_t;
typedef int cublasMath_t;

#define X(type, name, value) constexpr type name = value;
VGPU_CUBLAS_ENUMS(X)
#undef X

struct cublasContext {
  vgpu::Context* ctx = nullptr;  // current at create: the GEMMs must run in it
  CUstream stream = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
};
typedef cublasContext* cublasHandle_t;

namespace {

// Leaked: handles may be destroyed by exit-time code after static destructors ran.
std::set<cublasHandle_t>& handles() {
  static auto* s = new std::set<cublasHandle_t>;
  return *s;
}

// Null is cuBLAS's own NOT_INITIALIZED; any other unknown handle is a use after destroy.
bool live(cublasHandle_t h) {
  if (!h) return false;
  if (!handles().count(h)) vgpu::fail("cublas", "handle %p is not a live cuBLAS handle", (void*)h);
  return true;
}

// ---- Element conversions ----

enum class Elem { F32, TF32, BF16 };

inline uint32_t bits(float f) { return __float_as_uint(f); }
inline float from_bits(uint32_t u) { return __uint_as_float(u); }
inline float bf16_to_f32(uint16_t h) { return __bfloat162float({h}); }
inline uint16_t f32_to_bf16(float f) { return __float2bfloat16_rn(f).bits; }
// TF32 keeps 10 mantissa bits, rounded to nearest (ties away), as the tensor cores' inputs.
inline float to_tf32(float f) {
  uint32_t u = bits(f);
  return (u & 0x7f800000u) == 0x7f800000u ? f : from_bits((u + 0x1000u) & 0xffffe000u);
}

template <Elem E>
inline float load(const void* x, size_t i) {
  if (E == Elem::BF16) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  float v = static_cast<const float*>(x)[i];
  return E == Elem::TF32 ? to_tf32(v) : v;
}

// Rows [r0, r1) of an operand into a panel of kp floats per row, zero-padded past `rows` and `k`:
// element (r, p) is x[r * rs + p * ps]. One of rs, ps is 1, so the reads run along it.
template <Elem E>
void pack(float* dst, const void* x, size_t r0, size_t r1, size_t rows, size_t k, size_t kp,
          size_t rs, size_t ps) {
  size_t re = r1 < rows ? r1 : rows;
  for (size_t r = r0; r < r1; ++r) {
    size_t from = r < re ? k : 0;
    memset(dst + r * kp + from, 0, (kp - from) * sizeof(float));
  }
  if (ps == 1) {
    for (size_t r = r0; r < re; ++r)
      for (size_t p = 0; p < k; ++p) dst[r * kp + p] = load<E>(x, r * rs + p);
  } else {  // a transpose, by 16 × 16 tiles: reads run along r, writes along p
    for (size_t p0 = 0; p0 < k; p0 += 16)
      for (size_t r = r0; r < re; ++r)
        for (size_t p = p0; p < p0 + 16 && p < k; ++p) dst[r * kp + p] = load<E>(x, r + p * ps);
  }
}

void pack_any(Elem e, float* dst, const void* x, size_t r0, size_t r1, size_t rows, size_t k,
              size_t kp, size_t rs, size_t ps) {
  switch (e) {
    case Elem::F32: return pack<Elem::F32>(dst, x, r0, r1, rows, k, kp, rs, ps);
    case Elem::TF32: return pack<Elem::TF32>(dst, x, r0, r1, rows, k, kp, rs, ps);
    case Elem::BF16: return pack<Elem::BF16>(dst, x, r0, r1, rows, k, kp, rs, ps);
  }
}

// ---- The kernel: dot products of packed rows of op(A) and columns of op(B) ----

// Eight lanes, each its own f32 partial sum (as a GPU's split accumulation); GCC's vector
// extension keeps the code SIMD at any optimization level, without reassociating anything.
constexpr size_t VW = 8;
typedef float vf __attribute__((vector_size(VW * sizeof(float)), may_alias));
#define INLINE __attribute__((always_inline)) inline
// Vectors pass by value only between always-inlined functions: no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

// [x0+x1, x2+x3, x4+x5, x6+x7, y0+y1, ..., y6+y7]: one level of pairwise lane sums.
INLINE vf pairs(const vf& x, const vf& y) {
#ifdef __clang__
  return __builtin_shufflevector(x, y, 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(x, y, 1, 3, 5, 7, 9, 11, 13, 15);
#else
  typedef int vi __attribute__((vector_size(VW * sizeof(int))));
  return __builtin_shuffle(x, y, vi{0, 2, 4, 6, 8, 10, 12, 14}) +
         __builtin_shuffle(x, y, vi{1, 3, 5, 7, 9, 11, 13, 15});
#endif
}

// Lane c: the lanes of s[c] summed pairwise, ((0+1)+(2+3))+((4+5)+(6+7)); N = 4 or 8 (then
// lanes N.. repeat). Three levels of shuffles reduce all N at once, rather than each alone.
template <int N>
INLINE vf lane_sums(const vf* s) {
  if (N == 4) {
    vf q = pairs(pairs(s[0], s[1]), pairs(s[2], s[3]));
    return pairs(q, q);
  }
  return pairs(pairs(pairs(s[0], s[1]), pairs(s[2], s[3])),
               pairs(pairs(s[4], s[5]), pairs(s[6], s[7])));
}

struct Out {
  void* c;
  size_t ldc, m, n;
  float alpha, beta;
};

template <bool BF16, bool BETA>
INLINE void store(const Out& o, size_t i, size_t j, float s) {
  size_t at = i + j * o.ldc;
  float v = o.alpha * s;
  if (BF16) {
    uint16_t* c = static_cast<uint16_t*>(o.c);
    if (BETA) v += o.beta * bf16_to_f32(c[at]);
    c[at] = f32_to_bf16(v);
  } else {
    float* c = static_cast<float*>(o.c);
    if (BETA) v += o.beta * c[at];
    c[at] = v;
  }
}

// One task's share of C: rows [i0, i1) × columns [j0, j1), over the panels' k range [k0, k1).
// Sums spanning several k ranges rest in `part` between them, lanes unreduced, so the result does
// not depend on the blocking.
struct Job {
  const float *ap, *bp;
  size_t kp, k0, k1, i0, i1, j0, j1;
  vf* part;
  bool first, last;
};

// MR × NR dot products at a time: each loaded vector of A feeds NR sums and each of B feeds MR.
// The B micro-panel stays in L1 along the rows, the A block in L2 along the columns.
template <int MR, int NR, bool BF16, bool BETA>
INLINE void tiles(const Job& t, const Out& o) {
  vf* part = t.part;
  for (size_t j = t.j0; j < t.j1; j += NR)
    for (size_t i = t.i0; i < t.i1; i += MR, part += MR * NR) {
      const float* a = t.ap + i * t.kp;
      const float* b = t.bp + j * t.kp;
      vf acc[NR * MR];  // column-major in the tile, as C; constant indices keep it in registers
#pragma GCC unroll 16
      for (int q = 0; q < MR * NR; ++q) acc[q] = t.first ? vf{} : part[q];
      for (size_t p = t.k0; p < t.k1; p += VW) {
        vf bv[NR];
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c) bv[c] = *reinterpret_cast<const vf*>(b + c * t.kp + p);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          vf av = *reinterpret_cast<const vf*>(a + r * t.kp + p);
#pragma GCC unroll 8
          for (int c = 0; c < NR; ++c) acc[c * MR + r] += av * bv[c];
        }
      }
      if (!t.last) {
#pragma GCC unroll 16
        for (int q = 0; q < MR * NR; ++q) part[q] = acc[q];
        continue;
      }
      vf sums = lane_sums<MR * NR>(acc);
      if (i + MR <= o.m && j + NR <= o.n) {
#pragma GCC unroll 8
        for (int c = 0; c < NR; ++c)
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) store<BF16, BETA>(o, i + r, j + c, sums[c * MR + r]);
      } else {
        for (int c = 0; c < NR; ++c)
          for (int r = 0; r < MR; ++r)
            if (i + r < o.m && j + c < o.n) store<BF16, BETA>(o, i + r, j + c, sums[c * MR + r]);
      }
    }
}

typedef void (*TilesFn)(const Job&, const Out&);
struct Kernel {
  int mr, nr;
  TilesFn run[2][2];  // [C is bf16][beta != 0]
};

// Baseline x86-64 has 16 SSE registers, each half a vector: 2 × 2 sums and their operands fit.
template <bool BF16, bool BETA>
void tiles_base(const Job& t, const Out& o) {
  tiles<2, 2, BF16, BETA>(t, o);
}

#if defined(__x86_64__) && defined(__GNUC__)
// With AVX2 a register holds a whole vector: 4 × 2 sums plus 3 operands.
template <bool BF16, bool BETA>
__attribute__((target("avx2,fma"))) void tiles_avx2(const Job& t, const Out& o) {
  tiles<4, 2, BF16, BETA>(t, o);
}
#endif

#define KERNEL(mr, nr, f) \
  { mr, nr, { {f<false, false>, f<false, true>}, {f<true, false>, f<true, true>} } }

Kernel pick_kernel() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return KERNEL(4, 2, tiles_avx2);
#endif
  return KERNEL(2, 2, tiles_base);
}

// Grow-only scratch: the GEMM runs under the device lock, so one pair of panels serves every call,
// and each worker keeps its own partial sums; no page faults after the first large GEMM.
struct Scratch {
  float* p = nullptr;
  size_t cap = 0;
  float* get(size_t floats) {
    if (floats > cap) {
      free(p);
      p = nullptr;
      if (posix_memalign(reinterpret_cast<void**>(&p), 64, floats * sizeof(float)))
        vgpu::fail("cublas", "out of host memory for %zu floats of GEMM scratch", floats);
      cap = floats;
    }
    return p;
  }
  ~Scratch() { free(p); }
};

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }
size_t min(size_t a, size_t b) { return a < b ? a : b; }

// C = alpha · op(A) · op(B) + beta · C, all validated; k > 0.
void gemm(Elem ea, const void* a, size_t lda, bool ta, const void* b, size_t ldb, bool tb,
          const Out& o, bool bf16, size_t k) {
  static const Kernel kern = pick_kernel();
  const size_t m = o.m, n = o.n, kp = round_up(k, VW);
  const size_t mp = round_up(m, kern.mr), np = round_up(n, kern.nr);
  static Scratch &sa = *new Scratch, &sb = *new Scratch;  // leaked: usable during exit
  float *ap = sa.get(mp * kp), *bp = sb.get(np * kp);

  // op(A) row i: A[i + p·lda] (N) or A[p + i·lda] (T); op(B) column j: B[p + j·ldb] (N) or
  // B[j + p·ldb] (T). Packed once, in chunks of rows, in parallel.
  constexpr size_t kChunk = 64;
  const size_t ca = (mp + kChunk - 1) / kChunk, cb = (np + kChunk - 1) / kChunk;
  vgpu::parallel(ca + cb, [&](size_t t) {
    if (t < ca) {
      size_t r0 = t * kChunk;
      pack_any(ea, ap, a, r0, min(r0 + kChunk, mp), m, k, kp, ta ? lda : 1, ta ? 1 : lda);
    } else {
      size_t r0 = (t - ca) * kChunk;
      pack_any(ea, bp, b, r0, min(r0 + kChunk, np), n, k, kp, tb ? 1 : ldb, tb ? ldb : 1);
    }
  });

  // Long dot products go in k blocks, so that a micro-panel stays in L1 and a block in L2.
  const size_t kc = kp <= 1024 ? kp : 512;
  auto block = [&](size_t unit, size_t lo) {
    size_t b = 32768 / kc;
    b = b < lo ? lo : b > 256 ? 256 : b;
    return b / unit * unit;
  };
  const size_t mb = block(kern.mr, kern.mr), nb = block(kern.nr, 4 * kern.nr);
  const size_t bi = (mp + mb - 1) / mb, bj = (np + nb - 1) / nb;
  const TilesFn run = kern.run[bf16][o.beta != 0.0f];
  vgpu::parallel(bi * bj, [&](size_t t) {
    size_t i0 = (t % bi) * mb, j0 = (t / bi) * nb;
    static thread_local Scratch sp;
    vf* part = kc < kp ? reinterpret_cast<vf*>(sp.get(mb * nb * VW)) : nullptr;
    for (size_t k0 = 0; k0 < kp; k0 += kc) {
      Job job{ap, bp, kp, k0, min(k0 + kc, kp), i0, min(i0 + mb, mp), j0, min(j0 + nb, np),
              part, k0 == 0, k0 + kc >= kp};
      run(job, o);
    }
  });
}

const char* status_text(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
    default: return "unknown error";
  }
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT const char* vgpu_cublas_enum_table() {
#define X(type, name, value) #type "::" #name "=" #value "\n"
  return VGPU_CUBLAS_ENUMS(X);
#undef X
}

EXPORT const char* cublasGetStatusName(cublasStatus_t s) {
  static const struct {
    const char *type, *name;
    int value;
  } table[] = {
#define X(type, name, value) {#type, #name, value},
      VGPU_CUBLAS_ENUMS(X)
#undef X
  };
  for (const auto& e : table)
    if (!strcmp(e.type, "cublasStatus_t") && e.value == s) return e.name;
  return "CUBLAS_STATUS_UNKNOWN";
}

EXPORT const char* cublasGetStatusString(cublasStatus_t s) { return status_text(s); }

EXPORT cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  vgpu::audit_event("cublasCreate");
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
  vgpu::Context* ctx = vgpu::current();
  if (!ctx) return CUBLAS_STATUS_NOT_INITIALIZED;
  cublasHandle_t h = new cublasContext;
  h->ctx = ctx;
  handles().insert(h);
  *handle = h;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  vgpu::audit_event("cublasDestroy");
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handles().erase(handle);
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

// The stream is checked where it is used, by vgpu::stream, as a real handle would fail there too.
EXPORT cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, CUstream stream) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, CUstream* stream) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->math_mode;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE)
    return CUBLAS_STATUS_INVALID_VALUE;
  handle->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = handle->pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}

EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                                   cublasOperation_t transb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType_t Atype, int lda,
                                   const void* B, cudaDataType_t Btype, int ldb, const void* beta,
                                   void* C, cudaDataType_t Ctype, int ldc,
                                   cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!live(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  // VGPU_MUTATE=transpose: a wrong GEMM (or, where the flipped shapes break the leading-dimension
  // rules below, a failing one) that the tests must notice.
  if (vgpu::mutation().transpose) {
    transa = transa == CUBLAS_OP_N ? CUBLAS_OP_T : CUBLAS_OP_N;
    vgpu::mutation_applied("transa of every cublasGemmEx flipped between N and T");
  }

  // cuBLAS's argument rules; OP_C is OP_T for real types.
  auto op_ok = [](int t) { return t == CUBLAS_OP_N || t == CUBLAS_OP_T || t == CUBLAS_OP_C; };
  if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0 || !alpha || !beta)
    return CUBLAS_STATUS_INVALID_VALUE;
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  auto at_least = [](int ld, int x) { return ld >= (x > 1 ? x : 1); };
  if (!at_least(lda, ta ? k : m) || !at_least(ldb, tb ? n : k) || !at_least(ldc, m))
    return CUBLAS_STATUS_INVALID_VALUE;

  // The types the project uses; anything else is a real cuBLAS feature not emulated here.
  bool tf32 = computeType == CUBLAS_COMPUTE_32F_FAST_TF32 ||
              (computeType == CUBLAS_COMPUTE_32F &&
               (handle->math_mode & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH);
  Elem ea;
  if (Atype == CUDA_R_32F && Btype == CUDA_R_32F && Ctype == CUDA_R_32F &&
      (computeType == CUBLAS_COMPUTE_32F || computeType == CUBLAS_COMPUTE_32F_FAST_TF32))
    ea = tf32 ? Elem::TF32 : Elem::F32;
  else if (Atype == CUDA_R_16BF && Btype == CUDA_R_16BF &&
           (Ctype == CUDA_R_32F || Ctype == CUDA_R_16BF) && computeType == CUBLAS_COMPUTE_32F)
    ea = Elem::BF16;
  else
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if ((algo != CUBLAS_GEMM_DEFAULT && algo != CUBLAS_GEMM_DEFAULT_TENSOR_OP) ||
      handle->pointer_mode != CUBLAS_POINTER_MODE_HOST)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;

  vgpu::Context* ctx = vgpu::current();
  if (ctx != handle->ctx) return CUBLAS_STATUS_EXECUTION_FAILED;  // a launch in the wrong context
  vgpu::Stream* s = vgpu::stream(handle->stream, ctx);
  // Host-mode scalars are read at the call, so a captured GEMM keeps their values.
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  auto run = [=](vgpu::Stream* s) -> int {
    vgpu::begin_op(s);

    const size_t es = ea == Elem::BF16 ? 2 : 4, ec = Ctype == CUDA_R_16BF ? 2 : 4;
    // The stored matrices' extents: `rows` × `cols` with leading dimension `ld`.
    auto span = [](size_t rows, size_t cols, size_t ld, size_t elem) {
      return rows && cols ? (ld * (cols - 1) + rows) * elem : 0;
    };
    size_t sa = span(ta ? k : m, ta ? m : k, lda, es), sb = span(tb ? n : k, tb ? k : n, ldb, es);
    if (sa) vgpu::access(s, A, sa, vgpu::Access::Read, "cublasGemmEx A");
    if (sb) vgpu::access(s, B, sb, vgpu::Access::Read, "cublasGemmEx B");
    size_t sc = span(m, n, ldc, ec);
    if (be != 0.0f) vgpu::access(s, C, sc, vgpu::Access::Read, "cublasGemmEx C");
    vgpu::access(s, C, sc, vgpu::Access::Write, "cublasGemmEx C");

    const bool cbf16 = Ctype == CUDA_R_16BF;
    Out o{C, size_t(ldc), size_t(m), size_t(n), al, be};
    if (k == 0) {  // C = beta · C; alpha is not used
      o.alpha = 0.0f;
      auto scale = cbf16 ? (be != 0.0f ? store<true, true> : store<true, false>)
                         : (be != 0.0f ? store<false, true> : store<false, false>);
      for (size_t j = 0; j < o.n; ++j)
        for (size_t i = 0; i < o.m; ++i) scale(o, i, j, 0.0f);
    } else {
      gemm(ea, A, size_t(lda), ta, B, size_t(ldb), tb, o, cbf16, size_t(k));
    }
    return 0;
  };
  if (vgpu::skip_compute()) return CUBLAS_STATUS_SUCCESS;
  if (!vgpu::captured(s, run)) run(s);
  return CUBLAS_STATUS_SUCCESS;
}
