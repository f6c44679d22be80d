// Just enough of CUDA to run the project's kernels on the CPU: every thread of a block is an OS
// thread, `__syncthreads` is a barrier, `__shared__` storage is static (blocks run one after
// another), and bf16/f16 are bit-exact software conversions. Slow, and only for small tests; it
// checks the kernels' index arithmetic and maths where no GPU is at hand.
#pragma once
#include <barrier>
#include <thread>
#include <vector>

#include "cuda_scalars.h"

#define __shared__ static

inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline thread_local std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

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
