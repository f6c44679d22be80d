// CUDA device code as host C++ for the virtual device: the threads of a block are fibers on one
// worker thread (cheap to switch, so `__syncthreads` is a yield to the block's scheduler), blocks
// are spread over the workers, and `__shared__` storage is per worker, so each block sees its own.
#pragma once
#include "cuda_scalars.h"

#define __shared__ static thread_local

namespace vgpu_dev {
extern thread_local constinit Dim3 thread_idx, block_idx, block_dim, grid_dim;
}
#define threadIdx (::vgpu_dev::thread_idx)
#define blockIdx (::vgpu_dev::block_idx)
#define blockDim (::vgpu_dev::block_dim)
#define gridDim (::vgpu_dev::grid_dim)

// Out of line on purpose: the compiler must assume a barrier changes shared memory.
void __syncthreads();
