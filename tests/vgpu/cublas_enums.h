// The cuBLAS enum values the virtual device uses, as X(type, name, value) with the type named as in
// cudarc's bindings (CUDA 13.0). cublas.cpp exports them as text (vgpu_cublas_enum_table) so a test
// can compare them with cudarc, as no cuBLAS header is at hand to include.
#pragma once

#define VGPU_CUBLAS_ENUMS(X)                                          \
  X(cublasStatus_t, CUBLAS_STATUS_SUCCESS, 0)                         \
  X(cublasStatus_t, CUBLAS_STATUS_NOT_INITIALIZED, 1)                 \
  X(cublasStatus_t, CUBLAS_STATUS_ALLOC_FAILED, 3)                    \
  X(cublasStatus_t, CUBLAS_STATUS_INVALID_VALUE, 7)                   \
  X(cublasStatus_t, CUBLAS_STATUS_ARCH_MISMATCH, 8)                   \
  X(cublasStatus_t, CUBLAS_STATUS_MAPPING_ERROR, 11)                  \
  X(cublasStatus_t, CUBLAS_STATUS_EXECUTION_FAILED, 13)               \
  X(cublasStatus_t, CUBLAS_STATUS_INTERNAL_ERROR, 14)                 \
  X(cublasStatus_t, CUBLAS_STATUS_NOT_SUPPORTED, 15)                  \
  X(cublasStatus_t, CUBLAS_STATUS_LICENSE_ERROR, 16)                  \
  X(cublasOperation_t, CUBLAS_OP_N, 0)                                \
  X(cublasOperation_t, CUBLAS_OP_T, 1)                                \
  X(cublasOperation_t, CUBLAS_OP_C, 2)                                \
  X(cudaDataType_t, CUDA_R_32F, 0)                                    \
  X(cudaDataType_t, CUDA_R_16F, 2)                                    \
  X(cudaDataType_t, CUDA_R_16BF, 14)                                  \
  X(cublasComputeType_t, CUBLAS_COMPUTE_32F, 68)                      \
  X(cublasComputeType_t, CUBLAS_COMPUTE_32F_FAST_TF32, 77)            \
  X(cublasGemmAlgo_t, CUBLAS_GEMM_DEFAULT, -1)                        \
  X(cublasGemmAlgo_t, CUBLAS_GEMM_DEFAULT_TENSOR_OP, 99)              \
  X(cublasPointerMode_t, CUBLAS_POINTER_MODE_HOST, 0)                 \
  X(cublasPointerMode_t, CUBLAS_POINTER_MODE_DEVICE, 1)               \
  X(cublasMath_t, CUBLAS_DEFAULT_MATH, 0)                             \
  X(cublasMath_t, CUBLAS_TENSOR_OP_MATH, 1)                           \
  X(cublasMath_t, CUBLAS_PEDANTIC_MATH, 2)                            \
  X(cublasMath_t, CUBLAS_TF32_TENSOR_OP_MATH, 3)                      \
  X(cublasMath_t, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION, 16)
