// The virtual cuDNN: the convolution subset the project calls, run on the host when enqueued. NHWC
// tensors, KRSC filters, f32 or bf16 elements with f32 accumulation, cross-correlation only.
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cuda_scalars.h"  // the bf16 conversions the kernels use
#include "cudnn_enums.h"
#include "vgpu.h"

#define API extern "C" __attribute__((visibility("default")))

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct cudnnContext {
  vgpu::Context* ctx;  // where it was created: its stream and operands live there
  void* stream = nullptr;
};
struct cudnnTensorStruct {
  bool set = false;
  cudnnTensorFormat_t format{};
  cudnnDataType_t type{};
  int n = 0, c = 0, h = 0, w = 0;
};
struct cudnnFilterStruct {
  bool set = false;
  cudnnTensorFormat_t format{};
  cudnnDataType_t type{};
  int k = 0, c = 0, r = 0, s = 0;
};
struct cudnnConvolutionStruct {
  bool set = false;
  int pad[2] = {}, stride[2] = {}, dil[2] = {};
  cudnnConvolutionMode_t mode{};
  cudnnDataType_t compute{};
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
};
typedef cudnnContext* cudnnHandle_t;
typedef cudnnTensorStruct* cudnnTensorDescriptor_t;
typedef cudnnFilterStruct* cudnnFilterDescriptor_t;
typedef cudnnConvolutionStruct* cudnnConvolutionDescriptor_t;

template <class A>
struct AlgoPerf {
  A algo;
  cudnnStatus_t status;
  float time;
  size_t memory;
  cudnnDeterminism_t determinism;
  cudnnMathType_t mathType;
  int reserved[3];
};
typedef AlgoPerf<cudnnConvolutionFwdAlgo_t> cudnnConvolutionFwdAlgoPerf_t;
typedef AlgoPerf<cudnnConvolutionBwdDataAlgo_t> cudnnConvolutionBwdDataAlgoPerf_t;
typedef AlgoPerf<cudnnConvolutionBwdFilterAlgo_t> cudnnConvolutionBwdFilterAlgoPerf_t;
static_assert(sizeof(cudnnConvolutionFwdAlgoPerf_t) == 48 &&
                  offsetof(cudnnConvolutionFwdAlgoPerf_t, memory) == 16 &&
                  offsetof(cudnnConvolutionFwdAlgoPerf_t, mathType) == 28,
              "cuDNN's perf struct layout");

namespace {

constexpr cudnnStatus_t OK = CUDNN_STATUS_SUCCESS, BAD = CUDNN_STATUS_BAD_PARAM,
                        UNSUPPORTED = CUDNN_STATUS_NOT_SUPPORTED;

struct Entry {
  const char* type;
  const char* name;
  int value;
};
#define VGPU_ENTRY(t, name, value) {#t, #name, value},
const Entry kEnums[] = {VGPU_CUDNN_ENUMS(VGPU_ENTRY)};
#undef VGPU_ENTRY

// Live objects by kind, so a stale or mistyped pointer is caught instead of dereferenced.
enum Kind { kHandle = 1, kTensor, kFilter, kConv };
std::unordered_map<const void*, Kind>& live() {
  // Never freed: calls may still come while the process exits.
  static auto* m = new std::unordered_map<const void*, Kind>;
  return *m;
}
bool is(const void* p, Kind k) {
  auto it = live().find(p);
  return p && it != live().end() && it->second == k;
}

template <class T>
cudnnStatus_t create(T** out, Kind k) {
  if (!out) return BAD;
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  T* p = new T();
  live()[p] = k;
  *out = p;
  return OK;
}

// Callers ignore destroy statuses, so destroying what is not live is reported, not returned.
template <class T>
cudnnStatus_t destroy(T* p, Kind k, const char* call) {
  if (!p) return OK;
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(p, k))
    vgpu::fail("cudnn", "%s(%p): not a live object of its kind (destroyed twice?)", call, (void*)p);
  live().erase(p);
  delete p;
  return OK;
}

// The handle's context must be current: its stream and every operand belong to it.
cudnnStatus_t enter(cudnnHandle_t h, const char* call) {
  if (!is(h, kHandle)) return BAD;
  vgpu::Context* ctx = vgpu::current();
  if (!ctx || ctx->destroyed) return CUDNN_STATUS_NOT_INITIALIZED;
  if (ctx != h->ctx) {
    fprintf(stderr, "vgpu: cudnn: %s: the handle was made in a context that is not current\n",
            call);
    return CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH;
  }
  return OK;
}

struct Geom {
  size_t n, c, h, w, k, r, s, ho, wo;
  long ph, pw, sh, sw, dh, dw;
  bool bf16;
  cudnnMathType_t math;
  size_t elem() const { return bf16 ? 2 : 4; }
  size_t xn() const { return n * h * w * c; }
  size_t yn() const { return n * ho * wo * k; }
  size_t wn() const { return k * r * s * c; }
};

cudnnStatus_t geometry(const cudnnTensorStruct* x, const cudnnFilterStruct* w,
                       const cudnnConvolutionStruct* cv, const cudnnTensorStruct* y, Geom& g) {
  if (!is(x, kTensor) || !is(y, kTensor) || !is(w, kFilter) || !is(cv, kConv)) return BAD;
  if (!x->set || !y->set || !w->set || !cv->set) return BAD;
  if (x->format != y->format || x->format != w->format || x->type != y->type || x->type != w->type)
    return BAD;
  if (x->format != CUDNN_TENSOR_NHWC) return UNSUPPORTED;
  if (x->type != CUDNN_DATA_FLOAT && x->type != CUDNN_DATA_BFLOAT16) return UNSUPPORTED;
  if (cv->mode != CUDNN_CROSS_CORRELATION || cv->compute != CUDNN_DATA_FLOAT) return UNSUPPORTED;
  if (x->c != w->c || y->n != x->n || y->c != w->k) return BAD;
  long eh = x->h + 2L * cv->pad[0] - long(cv->dil[0]) * (w->r - 1) - 1;
  long ew = x->w + 2L * cv->pad[1] - long(cv->dil[1]) * (w->s - 1) - 1;
  if (eh < 0 || ew < 0 || y->h != eh / cv->stride[0] + 1 || y->w != ew / cv->stride[1] + 1)
    return BAD;
  g = Geom{size_t(x->n), size_t(x->c), size_t(x->h), size_t(x->w), size_t(w->k), size_t(w->r),
           size_t(w->s), size_t(y->h), size_t(y->w), cv->pad[0], cv->pad[1], cv->stride[0],
           cv->stride[1], cv->dil[0], cv->dil[1], x->type == CUDNN_DATA_BFLOAT16, cv->math};
  return OK;
}

// Workspace needs, proportional to the tensors so that sizes differ between algorithms and shapes.
enum Mem { kNone, kHuge, kIm2col, kIndex, kImageF32, kFilterF32, kFilterBatch };
size_t bytes(Mem m, const Geom& g) {
  switch (m) {
    case kNone: return 0;
    case kHuge: return size_t(1) << 40;  // fits no workspace cap
    case kIm2col: return 4 * g.n * g.ho * g.wo * g.r * g.s * g.c;
    case kIndex: return 4 * g.r * g.s * g.ho * g.wo;
    case kImageF32: return 4 * g.xn();
    case kFilterF32: return 4 * g.wn();
    case kFilterBatch: return 4 * g.wn() * std::min<size_t>(g.n, 8);
  }
  return 0;
}

struct Algo {
  int id;
  bool supported, deterministic;
  Mem mem;
};
// The ranking every query reports. It leads with what a caller must skip (an unsupported entry, a
// non-deterministic one, one whose workspace fits nowhere), so the caller's choice is exercised.
const Algo kFwdAlgos[] = {{CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, false, true, kNone},
                          {CUDNN_CONVOLUTION_FWD_ALGO_GEMM, true, false, kIm2col},
                          {CUDNN_CONVOLUTION_FWD_ALGO_FFT, true, true, kHuge},
                          {CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, true, true, kIndex},
                          {CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, true, true, kNone}};
const Algo kDataAlgos[] = {{CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD, false, true, kNone},
                           {CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, true, false, kImageF32},
                           {CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT, true, true, kHuge},
                           {CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, true, true, kFilterF32},
                           {CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING, true, true, kNone}};
const Algo kFilterAlgos[] = {{CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD, false, true, kNone},
                             {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, true, false, kFilterBatch},
                             {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT, true, true, kHuge},
                             {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, true, true, kFilterF32},
                             {CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING, true, true, kNone}};

template <class A, size_t N>
cudnnStatus_t rank(cudnnStatus_t st, const Geom& g, const Algo (&t)[N], int requested,
                   int* returned, AlgoPerf<A>* perf) {
  if (st != OK) return st;
  if (requested <= 0 || !returned || !perf) return BAD;
  int n = std::min<int>(requested, int(N));
  for (int i = 0; i < n; i++) {
    AlgoPerf<A> p{};
    p.algo = A(t[i].id);
    p.status = t[i].supported ? OK : UNSUPPORTED;
    p.time = t[i].supported ? 0.25f * float(i + 1) : -1.0f;
    p.memory = t[i].supported ? bytes(t[i].mem, g) : 0;
    p.determinism = t[i].deterministic ? CUDNN_DETERMINISTIC : CUDNN_NON_DETERMINISTIC;
    p.mathType = g.math;
    perf[i] = p;
  }
  *returned = n;
  return OK;
}

// The workspace algorithm `id` of `count` needs.
template <size_t N>
cudnnStatus_t need(const Algo (&t)[N], int count, int id, const Geom& g, size_t* size) {
  if (id < 0 || id >= count || !size) return BAD;
  for (const Algo& a : t)
    if (a.id == id && a.supported) {
      *size = bytes(a.mem, g);
      return OK;
    }
  return UNSUPPORTED;
}

bool overlap(const void* a, size_t na, const void* b, size_t nb) {
  uintptr_t x = uintptr_t(a), y = uintptr_t(b);
  return na && nb && x < y + nb && y < x + na;
}

// Checks a compute call, then begins its operation on the handle's stream and declares every
// access: inputs a and b read, `out` written (and read when beta != 0), the workspace written and
// scribbled. what: the four operands' names for reports.
template <size_t N>
cudnnStatus_t begin(cudnnHandle_t h, const Geom& g, const Algo (&t)[N], int count, int id,
                    void* ws, size_t ws_size, const void* alpha, const void* beta, const void* a,
                    size_t na, const void* b, size_t nb, void* out, size_t nout,
                    const char* const what[4]) {
  size_t nws = 0;
  cudnnStatus_t st = need(t, count, id, g, &nws);
  if (st != OK) return st;
  if (!alpha || !beta || !a || !b || !out) return BAD;
  if (nws && (!ws || ws_size < nws)) return BAD;
  if (overlap(out, nout, a, na) || overlap(out, nout, b, nb) || overlap(ws, nws, a, na) ||
      overlap(ws, nws, b, nb) || overlap(ws, nws, out, nout))
    return BAD;
  vgpu::Stream* s = vgpu::stream(h->stream, h->ctx);
  vgpu::no_capture(s, "a cuDNN call (not modelled under capture by the virtual device)");
  vgpu::begin_op(s);
  vgpu::access(s, a, na, vgpu::Access::Read, what[0]);
  vgpu::access(s, b, nb, vgpu::Access::Read, what[1]);
  if (*static_cast<const float*>(beta) != 0)
    vgpu::access(s, out, nout, vgpu::Access::Read, what[2]);
  vgpu::access(s, out, nout, vgpu::Access::Write, what[2]);
  if (nws) {
    vgpu::access(s, ws, nws, vgpu::Access::Write, what[3]);
    vgpu::scribble(ws, nws);
  }
  return OK;
}

inline float ld(float v) { return v; }
inline float ld(uint16_t v) { return __bfloat162float({v}); }
inline void st(float& d, float v) { d = v; }
inline void st(uint16_t& d, float v) { d = __float2bfloat16_rn(v).bits; }
// d = alpha·v + beta·d; beta == 0 never reads d (it may hold NaN).
template <class T>
inline void put(T& d, float v, float alpha, float beta) {
  float r = alpha * v;
  if (beta != 0) r += beta * ld(d);
  st(d, r);
}

// The operand as f32: bf16 is widened once so the inner loops see only floats.
inline const float* f32(const float* p, size_t, std::vector<float>&) { return p; }
inline const float* f32(const uint16_t* p, size_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (size_t i = 0; i < n; i++) buf[i] = ld(p[i]);
  return buf.data();
}

// acc[0, n) += a·v[0, n). Blocks of 8 vectorize even at -O2, whose cost model leaves loops of
// unknown trip count scalar.
inline void axpy(float* __restrict acc, const float* __restrict v, float a, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (size_t j = 0; j < 8; j++) acc[i + j] += a * v[i + j];
  for (; i < n; i++) acc[i] += a * v[i];
}

// Input coordinate of output coordinate o at tap r, or -1 when it falls in the padding.
inline long tap(size_t o, size_t r, long stride, long pad, long dil, size_t extent) {
  long i = long(o) * stride - pad + long(r) * dil;
  return i >= 0 && i < long(extent) ? i : -1;
}

// One task per output row (image, ho): the filter, reordered to [r][s][c][k], is swept along
// contiguous output channels.
template <class T>
void forward(const Geom& g, const T* x, const T* w, T* y, float alpha, float beta) {
  std::vector<float> wt(g.wn()), xb;
  for (size_t k = 0; k < g.k; k++)
    for (size_t i = 0; i < g.r * g.s * g.c; i++) wt[i * g.k + k] = ld(w[k * g.r * g.s * g.c + i]);
  const float* xf = f32(x, g.xn(), xb);
  vgpu::parallel(g.n * g.ho, [&](size_t task) {
    size_t n = task / g.ho, ho = task % g.ho;
    std::vector<float> acc(g.k);
    for (size_t wo = 0; wo < g.wo; wo++) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t r = 0; r < g.r; r++) {
        long hi = tap(ho, r, g.sh, g.ph, g.dh, g.h);
        if (hi < 0) continue;
        for (size_t s = 0; s < g.s; s++) {
          long wi = tap(wo, s, g.sw, g.pw, g.dw, g.w);
          if (wi < 0) continue;
          const float* xp = xf + ((n * g.h + hi) * g.w + wi) * g.c;
          const float* wp = wt.data() + (r * g.s + s) * g.c * g.k;
          for (size_t c = 0; c < g.c; c++) axpy(acc.data(), wp + c * g.k, xp[c], g.k);
        }
      }
      T* yp = y + ((n * g.ho + ho) * g.wo + wo) * g.k;
      for (size_t k = 0; k < g.k; k++) put(yp[k], acc[k], alpha, beta);
    }
  });
}

// One task per input row (image, h), gathering from the outputs each input pixel fed, so no two
// tasks write the same element; KRSC filter rows are contiguous along input channels.
template <class T>
void backward_data(const Geom& g, const T* w, const T* dy, T* dx, float alpha, float beta) {
  std::vector<float> wb, db;
  const float* wf = f32(w, g.wn(), wb);
  const float* df = f32(dy, g.yn(), db);
  vgpu::parallel(g.n * g.h, [&](size_t task) {
    size_t n = task / g.h, h = task % g.h;
    std::vector<float> acc(g.c);
    for (size_t wi = 0; wi < g.w; wi++) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (size_t r = 0; r < g.r; r++) {
        long th = long(h) + g.ph - long(r) * g.dh;
        if (th < 0 || th % g.sh || size_t(th / g.sh) >= g.ho) continue;
        for (size_t s = 0; s < g.s; s++) {
          long tw = long(wi) + g.pw - long(s) * g.dw;
          if (tw < 0 || tw % g.sw || size_t(tw / g.sw) >= g.wo) continue;
          const float* dp = df + ((n * g.ho + th / g.sh) * g.wo + tw / g.sw) * g.k;
          for (size_t k = 0; k < g.k; k++)
            axpy(acc.data(), wf + ((k * g.r + r) * g.s + s) * g.c, dp[k], g.c);
        }
      }
      T* xp = dx + ((n * g.h + h) * g.w + wi) * g.c;
      for (size_t c = 0; c < g.c; c++) put(xp[c], acc[c], alpha, beta);
    }
  });
}

// One task per output channel k, which owns dw[k]; dy is transposed to [k][n·ho·wo] first.
template <class T>
void backward_filter(const Geom& g, const T* x, const T* dy, T* dw, float alpha, float beta) {
  std::vector<float> xb, dt(g.yn());
  const float* xf = f32(x, g.xn(), xb);
  size_t pixels = g.n * g.ho * g.wo;
  for (size_t p = 0; p < pixels; p++)
    for (size_t k = 0; k < g.k; k++) dt[k * pixels + p] = ld(dy[p * g.k + k]);
  vgpu::parallel(g.k, [&](size_t k) {
    std::vector<float> acc(g.r * g.s * g.c, 0.0f);
    const float* dk = dt.data() + k * pixels;
    for (size_t n = 0; n < g.n; n++)
      for (size_t ho = 0; ho < g.ho; ho++)
        for (size_t wo = 0; wo < g.wo; wo++) {
          float d = dk[(n * g.ho + ho) * g.wo + wo];
          for (size_t r = 0; r < g.r; r++) {
            long hi = tap(ho, r, g.sh, g.ph, g.dh, g.h);
            if (hi < 0) continue;
            for (size_t s = 0; s < g.s; s++) {
              long wi = tap(wo, s, g.sw, g.pw, g.dw, g.w);
              if (wi < 0) continue;
              const float* xp = xf + ((n * g.h + hi) * g.w + wi) * g.c;
              axpy(acc.data() + (r * g.s + s) * g.c, xp, d, g.c);
            }
          }
        }
    T* wp = dw + k * acc.size();
    for (size_t i = 0; i < acc.size(); i++) put(wp[i], acc[i], alpha, beta);
  });
}

float scalar(const void* p) { return *static_cast<const float*>(p); }

// Calls f with a value of the element type: float, or the bf16 bits.
template <class F>
void typed(const Geom& g, F f) {
  if (g.bf16)
    f(uint16_t{});
  else
    f(float{});
}

}  // namespace

typedef cudnnTensorDescriptor_t TensorD;
typedef cudnnFilterDescriptor_t FilterD;
typedef cudnnConvolutionDescriptor_t ConvD;

API const char* vgpu_cudnn_enum_table() {
#define VGPU_LINE(t, name, value) #t "::" #name "=" #value "\n"
  return VGPU_CUDNN_ENUMS(VGPU_LINE);
#undef VGPU_LINE
}

API size_t cudnnGetVersion() { return 92100; }  // 9.21.0, the API the bindings describe

API const char* cudnnGetErrorString(cudnnStatus_t status) {
  for (const Entry& e : kEnums)
    if (!strcmp(e.type, "cudnnStatus_t") && e.value == status) return e.name;
  return "CUDNN_UNKNOWN_STATUS";
}

API cudnnStatus_t cudnnCreate(cudnnHandle_t* handle) {
  if (!handle) return BAD;
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  vgpu::Context* ctx = vgpu::current();
  if (!ctx || ctx->destroyed) return CUDNN_STATUS_NOT_INITIALIZED;
  cudnnStatus_t st = create(handle, kHandle);
  if (st == OK) (*handle)->ctx = ctx;
  return st;
}

API cudnnStatus_t cudnnDestroy(cudnnHandle_t handle) {
  return handle ? destroy(handle, kHandle, "cudnnDestroy") : BAD;
}

API cudnnStatus_t cudnnSetStream(cudnnHandle_t handle, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(handle, kHandle)) return BAD;
  vgpu::stream(stream, handle->ctx);  // a stream of another context is reported here, not later
  handle->stream = stream;
  return OK;
}

API cudnnStatus_t cudnnCreateTensorDescriptor(TensorD* d) { return create(d, kTensor); }
API cudnnStatus_t cudnnCreateFilterDescriptor(FilterD* d) { return create(d, kFilter); }
API cudnnStatus_t cudnnCreateConvolutionDescriptor(ConvD* d) { return create(d, kConv); }
API cudnnStatus_t cudnnDestroyTensorDescriptor(TensorD d) {
  return destroy(d, kTensor, "cudnnDestroyTensorDescriptor");
}
API cudnnStatus_t cudnnDestroyFilterDescriptor(FilterD d) {
  return destroy(d, kFilter, "cudnnDestroyFilterDescriptor");
}
API cudnnStatus_t cudnnDestroyConvolutionDescriptor(ConvD d) {
  return destroy(d, kConv, "cudnnDestroyConvolutionDescriptor");
}

static cudnnStatus_t dims(cudnnTensorFormat_t f, cudnnDataType_t t, int a, int b, int c, int d) {
  if (f < CUDNN_TENSOR_NCHW || f > CUDNN_TENSOR_NCHW_VECT_C) return BAD;
  if (t < CUDNN_DATA_FLOAT || t > CUDNN_DATA_COMPLEX_FP64) return BAD;
  if (a <= 0 || b <= 0 || c <= 0 || d <= 0) return BAD;
  return int64_t(a) * b * c * d > INT32_MAX ? UNSUPPORTED : OK;  // cuDNN's 32-bit element limit
}

API cudnnStatus_t cudnnSetTensor4dDescriptor(TensorD d, cudnnTensorFormat_t format,
                                             cudnnDataType_t type, int n, int c, int h, int w) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(d, kTensor)) return BAD;
  cudnnStatus_t st = dims(format, type, n, c, h, w);
  if (st == OK) *d = cudnnTensorStruct{true, format, type, n, c, h, w};
  return st;
}

API cudnnStatus_t cudnnSetFilter4dDescriptor(FilterD d, cudnnDataType_t type,
                                             cudnnTensorFormat_t format, int k, int c, int h,
                                             int w) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(d, kFilter)) return BAD;
  cudnnStatus_t st = dims(format, type, k, c, h, w);
  if (st == OK) *d = cudnnFilterStruct{true, format, type, k, c, h, w};
  return st;
}

API cudnnStatus_t cudnnSetConvolution2dDescriptor(ConvD d, int pad_h, int pad_w, int u, int v,
                                                  int dil_h, int dil_w, cudnnConvolutionMode_t mode,
                                                  cudnnDataType_t compute) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(d, kConv) || pad_h < 0 || pad_w < 0 || u <= 0 || v <= 0 || dil_h <= 0 || dil_w <= 0 ||
      (mode != CUDNN_CONVOLUTION && mode != CUDNN_CROSS_CORRELATION) ||
      compute < CUDNN_DATA_FLOAT || compute > CUDNN_DATA_COMPLEX_FP64)
    return BAD;
  cudnnMathType_t math = d->math;  // set separately, and kept
  *d = cudnnConvolutionStruct{true, {pad_h, pad_w}, {u, v}, {dil_h, dil_w}, mode, compute, math};
  return OK;
}

API cudnnStatus_t cudnnSetConvolutionMathType(ConvD d, cudnnMathType_t math) {
  std::lock_guard<std::recursive_mutex> g(vgpu::lock());
  if (!is(d, kConv) || math < CUDNN_DEFAULT_MATH || math > CUDNN_FMA_MATH) return BAD;
  d->math = math;
  return OK;
}

// Find would time the algorithms on the device; here it reports the heuristics' ranking and runs
// nothing, so it orders nothing either. It still wants the handle's context current, as a real
// run would (`find` names the call then); Get only a live handle.
template <class A, size_t N>
cudnnStatus_t ranked(cudnnHandle_t h, const char* find, TensorD x, FilterD w, ConvD cv, TensorD y,
                     const Algo (&algos)[N], int requested, int* returned, AlgoPerf<A>* perf) {
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = find ? enter(h, find) : is(h, kHandle) ? OK : BAD;
  if (st == OK) st = geometry(x, w, cv, y, g);
  return rank(st, g, algos, requested, returned, perf);
}
API cudnnStatus_t cudnnFindConvolutionForwardAlgorithm(cudnnHandle_t h, TensorD x, FilterD w,
                                                       ConvD cv, TensorD y, int requested,
                                                       int* returned,
                                                       cudnnConvolutionFwdAlgoPerf_t* perf) {
  return ranked(h, "cudnnFindConvolutionForwardAlgorithm", x, w, cv, y, kFwdAlgos, requested,
                returned, perf);
}
API cudnnStatus_t cudnnGetConvolutionForwardAlgorithm_v7(cudnnHandle_t h, TensorD x, FilterD w,
                                                         ConvD cv, TensorD y, int requested,
                                                         int* returned,
                                                         cudnnConvolutionFwdAlgoPerf_t* perf) {
  return ranked(h, nullptr, x, w, cv, y, kFwdAlgos, requested, returned, perf);
}
API cudnnStatus_t cudnnFindConvolutionBackwardDataAlgorithm(
    cudnnHandle_t h, FilterD w, TensorD dy, ConvD cv, TensorD dx, int requested, int* returned,
    cudnnConvolutionBwdDataAlgoPerf_t* perf) {
  return ranked(h, "cudnnFindConvolutionBackwardDataAlgorithm", dx, w, cv, dy, kDataAlgos,
                requested, returned, perf);
}
API cudnnStatus_t cudnnGetConvolutionBackwardDataAlgorithm_v7(
    cudnnHandle_t h, FilterD w, TensorD dy, ConvD cv, TensorD dx, int requested, int* returned,
    cudnnConvolutionBwdDataAlgoPerf_t* perf) {
  return ranked(h, nullptr, dx, w, cv, dy, kDataAlgos, requested, returned, perf);
}
API cudnnStatus_t cudnnFindConvolutionBackwardFilterAlgorithm(
    cudnnHandle_t h, TensorD x, TensorD dy, ConvD cv, FilterD dw, int requested, int* returned,
    cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
  return ranked(h, "cudnnFindConvolutionBackwardFilterAlgorithm", x, dw, cv, dy, kFilterAlgos,
                requested, returned, perf);
}
API cudnnStatus_t cudnnGetConvolutionBackwardFilterAlgorithm_v7(
    cudnnHandle_t h, TensorD x, TensorD dy, ConvD cv, FilterD dw, int requested, int* returned,
    cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
  return ranked(h, nullptr, x, dw, cv, dy, kFilterAlgos, requested, returned, perf);
}

API cudnnStatus_t cudnnGetConvolutionForwardWorkspaceSize(cudnnHandle_t h, TensorD x, FilterD w,
                                                          ConvD cv, TensorD y,
                                                          cudnnConvolutionFwdAlgo_t algo,
                                                          size_t* size) {
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = is(h, kHandle) ? geometry(x, w, cv, y, g) : BAD;
  return st == OK ? need(kFwdAlgos, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, algo, g, size) : st;
}
API cudnnStatus_t cudnnGetConvolutionBackwardDataWorkspaceSize(cudnnHandle_t h, FilterD w,
                                                               TensorD dy, ConvD cv, TensorD dx,
                                                               cudnnConvolutionBwdDataAlgo_t algo,
                                                               size_t* size) {
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = is(h, kHandle) ? geometry(dx, w, cv, dy, g) : BAD;
  return st == OK ? need(kDataAlgos, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, algo, g, size) : st;
}
API cudnnStatus_t cudnnGetConvolutionBackwardFilterWorkspaceSize(
    cudnnHandle_t h, TensorD x, TensorD dy, ConvD cv, FilterD dw,
    cudnnConvolutionBwdFilterAlgo_t algo, size_t* size) {
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = is(h, kHandle) ? geometry(x, dw, cv, dy, g) : BAD;
  return st == OK ? need(kFilterAlgos, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, algo, g, size)
                  : st;
}

API cudnnStatus_t cudnnConvolutionForward(cudnnHandle_t h, const void* alpha, TensorD xd,
                                          const void* x, FilterD wd, const void* w, ConvD cv,
                                          cudnnConvolutionFwdAlgo_t algo, void* ws,
                                          size_t ws_size, const void* beta, TensorD yd, void* y) {
  static const char* const what[4] = {"cudnnConvolutionForward x", "cudnnConvolutionForward w",
                                      "cudnnConvolutionForward y",
                                      "cudnnConvolutionForward workspace"};
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = enter(h, "cudnnConvolutionForward");
  if (st == OK) st = geometry(xd, wd, cv, yd, g);
  if (st == OK)
    st = begin(h, g, kFwdAlgos, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, algo, ws, ws_size, alpha, beta,
               x, g.xn() * g.elem(), w, g.wn() * g.elem(), y, g.yn() * g.elem(), what);
  if (st != OK) return st;
  typed(g, [&](auto e) {
    using T = decltype(e);
    forward(g, static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y),
            scalar(alpha), scalar(beta));
  });
  return OK;
}

API cudnnStatus_t cudnnConvolutionBackwardData(cudnnHandle_t h, const void* alpha, FilterD wd,
                                               const void* w, TensorD dyd, const void* dy,
                                               ConvD cv, cudnnConvolutionBwdDataAlgo_t algo,
                                               void* ws, size_t ws_size, const void* beta,
                                               TensorD dxd, void* dx) {
  static const char* const what[4] = {
      "cudnnConvolutionBackwardData w", "cudnnConvolutionBackwardData dy",
      "cudnnConvolutionBackwardData dx", "cudnnConvolutionBackwardData workspace"};
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = enter(h, "cudnnConvolutionBackwardData");
  if (st == OK) st = geometry(dxd, wd, cv, dyd, g);
  if (st == OK)
    st = begin(h, g, kDataAlgos, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, algo, ws, ws_size, alpha,
               beta, w, g.wn() * g.elem(), dy, g.yn() * g.elem(), dx, g.xn() * g.elem(), what);
  if (st != OK) return st;
  typed(g, [&](auto e) {
    using T = decltype(e);
    backward_data(g, static_cast<const T*>(w), static_cast<const T*>(dy), static_cast<T*>(dx),
                  scalar(alpha), scalar(beta));
  });
  return OK;
}

API cudnnStatus_t cudnnConvolutionBackwardFilter(cudnnHandle_t h, const void* alpha, TensorD xd,
                                                 const void* x, TensorD dyd, const void* dy,
                                                 ConvD cv, cudnnConvolutionBwdFilterAlgo_t algo,
                                                 void* ws, size_t ws_size, const void* beta,
                                                 FilterD dwd, void* dw) {
  static const char* const what[4] = {
      "cudnnConvolutionBackwardFilter x", "cudnnConvolutionBackwardFilter dy",
      "cudnnConvolutionBackwardFilter dw", "cudnnConvolutionBackwardFilter workspace"};
  std::lock_guard<std::recursive_mutex> l(vgpu::lock());
  Geom g{};
  cudnnStatus_t st = enter(h, "cudnnConvolutionBackwardFilter");
  if (st == OK) st = geometry(xd, dwd, cv, dyd, g);
  if (st == OK)
    st = begin(h, g, kFilterAlgos, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, algo, ws, ws_size,
               alpha, beta, x, g.xn() * g.elem(), dy, g.yn() * g.elem(), dw, g.wn() * g.elem(),
               what);
  if (st != OK) return st;
  typed(g, [&](auto e) {
    using T = decltype(e);
    backward_filter(g, static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw),
                    scalar(alpha), scalar(beta));
  });
  return OK;
}
