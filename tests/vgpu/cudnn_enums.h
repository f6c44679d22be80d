// The cuDNN 9 enum values the virtual cuDNN (cudnn.cpp) uses, as one X(TYPE, NAME, VALUE) list: the
// implementation is built from it, and vgpu_cudnn_enum_table() hands the same list to a test that
// compares it with the bindings the project is built against. Values are plain decimal literals.
#pragma once

#define VGPU_CUDNN_ENUM_TYPES(T) \
  T(cudnnStatus_t)               \
  T(cudnnDataType_t)             \
  T(cudnnTensorFormat_t)         \
  T(cudnnConvolutionMode_t)      \
  T(cudnnMathType_t)             \
  T(cudnnDeterminism_t)          \
  T(cudnnConvolutionFwdAlgo_t)   \
  T(cudnnConvolutionBwdDataAlgo_t) \
  T(cudnnConvolutionBwdFilterAlgo_t)

#define VGPU_CUDNN_ENUMS(X)                                                        \
  X(cudnnStatus_t, CUDNN_STATUS_SUCCESS, 0)                                        \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_INITIALIZED, 1001)                             \
  X(cudnnStatus_t, CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH, 1002)                 \
  X(cudnnStatus_t, CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH, 1003)              \
  X(cudnnStatus_t, CUDNN_STATUS_DEPRECATED, 1004)                                  \
  X(cudnnStatus_t, CUDNN_STATUS_LICENSE_ERROR, 1005)                               \
  X(cudnnStatus_t, CUDNN_STATUS_RUNTIME_IN_PROGRESS, 1006)                         \
  X(cudnnStatus_t, CUDNN_STATUS_RUNTIME_FP_OVERFLOW, 1007)                         \
  X(cudnnStatus_t, CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED, 1008)                   \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM, 2000)                                   \
  X(cudnnStatus_t, CUDNN_STATUS_INVALID_VALUE, 2001)                               \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_NULL_POINTER, 2002)                      \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER, 2003)                \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED, 2004)                     \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND, 2005)                      \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT, 2006)                 \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH, 2007)                   \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH, 2008)                    \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_DUPLICATED_ENTRIES, 2009)                \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_ATTRIBUTE_TYPE, 2010)                    \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_CUDA_GRAPH_MISMATCH, 2011)               \
  X(cudnnStatus_t, CUDNN_STATUS_BAD_PARAM_DESCRIPTOR_TYPE, 2012)                   \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED, 3000)                               \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN, 3001)                 \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_SHAPE, 3002)                         \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE, 3003)                     \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_LAYOUT, 3004)                        \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER, 3005)      \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART, 3006)           \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH, 3007)                 \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING, 3008)  \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE, 3009)        \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT, 3010)    \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_PADDING, 3011)                       \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_BAD_LAUNCH_PARAM, 3012)              \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API, 3013)         \
  X(cudnnStatus_t, CUDNN_STATUS_NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE, 3014)         \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR, 4000)                              \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED, 4001)           \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_UNEXPECTED_VALUE, 4002)             \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED, 4003)       \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED, 4004)     \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_BAD_LAUNCH_PARAM, 4005)             \
  X(cudnnStatus_t, CUDNN_STATUS_INTERNAL_ERROR_TEXTURE_CREATION_FAILED, 4006)      \
  X(cudnnStatus_t, CUDNN_STATUS_EXECUTION_FAILED, 5000)                            \
  X(cudnnStatus_t, CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER, 5001)                \
  X(cudnnStatus_t, CUDNN_STATUS_EXECUTION_FAILED_CUBLAS, 5002)                     \
  X(cudnnStatus_t, CUDNN_STATUS_EXECUTION_FAILED_CUDART, 5003)                     \
  X(cudnnStatus_t, CUDNN_STATUS_EXECUTION_FAILED_CURAND, 5004)                     \
  X(cudnnDataType_t, CUDNN_DATA_FLOAT, 0)                                          \
  X(cudnnDataType_t, CUDNN_DATA_DOUBLE, 1)                                         \
  X(cudnnDataType_t, CUDNN_DATA_HALF, 2)                                           \
  X(cudnnDataType_t, CUDNN_DATA_INT8, 3)                                           \
  X(cudnnDataType_t, CUDNN_DATA_INT32, 4)                                          \
  X(cudnnDataType_t, CUDNN_DATA_INT8x4, 5)                                         \
  X(cudnnDataType_t, CUDNN_DATA_UINT8, 6)                                          \
  X(cudnnDataType_t, CUDNN_DATA_UINT8x4, 7)                                        \
  X(cudnnDataType_t, CUDNN_DATA_INT8x32, 8)                                        \
  X(cudnnDataType_t, CUDNN_DATA_BFLOAT16, 9)                                       \
  X(cudnnDataType_t, CUDNN_DATA_INT64, 10)                                         \
  X(cudnnDataType_t, CUDNN_DATA_BOOLEAN, 11)                                       \
  X(cudnnDataType_t, CUDNN_DATA_FP8_E4M3, 12)                                      \
  X(cudnnDataType_t, CUDNN_DATA_FP8_E5M2, 13)                                      \
  X(cudnnDataType_t, CUDNN_DATA_FAST_FLOAT_FOR_FP8, 14)                            \
  X(cudnnDataType_t, CUDNN_DATA_FP8_E8M0, 15)                                      \
  X(cudnnDataType_t, CUDNN_DATA_FP4_E2M1, 16)                                      \
  X(cudnnDataType_t, CUDNN_DATA_INT4, 17)                                          \
  X(cudnnDataType_t, CUDNN_DATA_UINT4, 18)                                         \
  X(cudnnDataType_t, CUDNN_DATA_UINT32, 19)                                        \
  X(cudnnDataType_t, CUDNN_DATA_COMPLEX_FP32, 20)                                  \
  X(cudnnDataType_t, CUDNN_DATA_COMPLEX_FP64, 21)                                  \
  X(cudnnTensorFormat_t, CUDNN_TENSOR_NCHW, 0)                                     \
  X(cudnnTensorFormat_t, CUDNN_TENSOR_NHWC, 1)                                     \
  X(cudnnTensorFormat_t, CUDNN_TENSOR_NCHW_VECT_C, 2)                              \
  X(cudnnConvolutionMode_t, CUDNN_CONVOLUTION, 0)                                  \
  X(cudnnConvolutionMode_t, CUDNN_CROSS_CORRELATION, 1)                            \
  X(cudnnMathType_t, CUDNN_DEFAULT_MATH, 0)                                        \
  X(cudnnMathType_t, CUDNN_TENSOR_OP_MATH, 1)                                      \
  X(cudnnMathType_t, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION, 2)                     \
  X(cudnnMathType_t, CUDNN_FMA_MATH, 3)                                            \
  X(cudnnDeterminism_t, CUDNN_NON_DETERMINISTIC, 0)                                \
  X(cudnnDeterminism_t, CUDNN_DETERMINISTIC, 1)                                    \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0)        \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, 1) \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_GEMM, 2)                 \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_DIRECT, 3)               \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_FFT, 4)                  \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING, 5)           \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, 6)             \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED, 7)    \
  X(cudnnConvolutionFwdAlgo_t, CUDNN_CONVOLUTION_FWD_ALGO_COUNT, 8)                \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, 0)           \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, 1)           \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT, 2)         \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING, 3)  \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD, 4)    \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED, 5) \
  X(cudnnConvolutionBwdDataAlgo_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, 6)       \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, 0)       \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, 1)       \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT, 2)     \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, 3)       \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD, 4) \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED, 5) \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING, 6) \
  X(cudnnConvolutionBwdFilterAlgo_t, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, 7)

#ifdef __cplusplus
// C passes these enums as 32-bit integers; a fixed underlying type keeps every value representable.
#define VGPU_CUDNN_TYPE(t) enum t : int {};
VGPU_CUDNN_ENUM_TYPES(VGPU_CUDNN_TYPE)
#undef VGPU_CUDNN_TYPE
#define VGPU_CUDNN_CONST(t, name, value) constexpr t name = t(value);
VGPU_CUDNN_ENUMS(VGPU_CUDNN_CONST)
#undef VGPU_CUDNN_CONST

// Every entry as a line `TYPE::NAME=VALUE`.
extern "C" const char* vgpu_cudnn_enum_table();
#endif
