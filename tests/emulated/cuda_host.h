// Just enough of CUDA to run the project's kernels on the CPU: every thread of a block is an OS
// thread, `__syncthreads` is a barrier, `__shared__` storage is static (blocks run one after
// another), and bf16/f16 are bit-exact software conversions. Slow, and only for small tests; it
// checks the kernels' index arithmetic and maths where no GPU is at hand.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline thread_local std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

using std::max;
using std::min;

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                              // nearest, even
  return {uint16_t(u >> 16)};
}

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }

inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Runs `body` as a kernel over `grid` × `block`: blocks one after another, the threads of a block
// at once.
template <class F>
void emu_launch(Dim3 grid, Dim3 block, F body) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              threads.emplace_back([&, tx, ty, tz] {
                threadIdx = {tx, ty, tz};
                blockIdx = {bx, by, bz};
                emu_barrier = &bar;
                body();
              });
        for (auto& t : threads) t.join();
      }
}
