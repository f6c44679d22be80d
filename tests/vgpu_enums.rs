//! The virtual CUDA device (`tests/vgpu`) has no cuBLAS or cuDNN header to compile against, so it
//! mirrors the enum values it uses in `tests/vgpu/cublas_enums.h` and `tests/vgpu/cudnn_enums.h`.
//! This checks every mirrored value against the bindings barlow itself calls through, in both
//! directions, so a change of either side is caught here rather than as a wrong status code.
#![cfg(feature = "train")]

use barlow::cuda::cudarc::{cublas, cudnn};
use std::collections::BTreeMap;
use std::path::Path;

/// `TYPE::NAME` → value, from the X(type, name, value) entries of a mirror header.
fn mirrored(file: &str) -> BTreeMap<String, i64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vgpu")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("X(") else {
            continue;
        };
        let Some(body) = rest.split(')').next() else {
            continue;
        };
        let parts: Vec<&str> = body.split(',').map(str::trim).collect();
        if let [ty, name, value] = parts[..] {
            if let Ok(v) = value.parse::<i64>() {
                out.insert(format!("{ty}::{name}"), v);
            }
        }
    }
    out
}

macro_rules! values {
    ($($ty:ident :: $name:ident),* $(,)?) => {
        BTreeMap::from([$((concat!(stringify!($ty), "::", stringify!($name)).to_string(), $ty::$name as i64)),*])
    };
}

fn compare(file: &str, bindings: BTreeMap<String, i64>) {
    let header = mirrored(file);
    assert!(
        !header.is_empty(),
        "{file}: no X(type, name, value) entries found"
    );
    for (k, v) in &header {
        match bindings.get(k) {
            Some(b) => assert_eq!(v, b, "{file}: {k} is {v}, the bindings say {b}"),
            None => panic!("{file}: {k} is mirrored but not listed in this test"),
        }
    }
    for k in bindings.keys() {
        assert!(
            header.contains_key(k),
            "{file}: {k} is listed here but no longer mirrored"
        );
    }
}

#[test]
fn cublas_enums_mirrored_by_the_virtual_device_match_the_bindings() {
    use cublas::sys::*;
    compare(
        "cublas_enums.h",
        values![
            cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED,
            cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
            cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE,
            cublasStatus_t::CUBLAS_STATUS_ARCH_MISMATCH,
            cublasStatus_t::CUBLAS_STATUS_MAPPING_ERROR,
            cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED,
            cublasStatus_t::CUBLAS_STATUS_INTERNAL_ERROR,
            cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            cublasStatus_t::CUBLAS_STATUS_LICENSE_ERROR,
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_C,
            cudaDataType_t::CUDA_R_32F,
            cudaDataType_t::CUDA_R_16F,
            cudaDataType_t::CUDA_R_16BF,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST,
            cublasPointerMode_t::CUBLAS_POINTER_MODE_DEVICE,
            cublasMath_t::CUBLAS_DEFAULT_MATH,
            cublasMath_t::CUBLAS_TENSOR_OP_MATH,
            cublasMath_t::CUBLAS_PEDANTIC_MATH,
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
            cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
        ],
    );
}

#[test]
fn cudnn_enums_mirrored_by_the_virtual_device_match_the_bindings() {
    use cudnn::sys::*;
    compare(
        "cudnn_enums.h",
        values![
            cudnnStatus_t::CUDNN_STATUS_SUCCESS,
            cudnnStatus_t::CUDNN_STATUS_NOT_INITIALIZED,
            cudnnStatus_t::CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_SERIALIZATION_VERSION_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_DEPRECATED,
            cudnnStatus_t::CUDNN_STATUS_LICENSE_ERROR,
            cudnnStatus_t::CUDNN_STATUS_RUNTIME_IN_PROGRESS,
            cudnnStatus_t::CUDNN_STATUS_RUNTIME_FP_OVERFLOW,
            cudnnStatus_t::CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM,
            cudnnStatus_t::CUDNN_STATUS_INVALID_VALUE,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_NULL_POINTER,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_NOT_FINALIZED,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_SIZE_INSUFFICIENT,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_STREAM_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_SHAPE_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_DUPLICATED_ENTRIES,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_ATTRIBUTE_TYPE,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_CUDA_GRAPH_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_BAD_PARAM_DESCRIPTOR_TYPE,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_GRAPH_PATTERN,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_SHAPE,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_DATA_TYPE,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_LAYOUT,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_SHARED_MEMORY_INSUFFICIENT,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_PADDING,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_BAD_LAUNCH_PARAM,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_CUDA_GRAPH_NATIVE_API,
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED_INVALID_DYNAMIC_SHAPE,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_UNEXPECTED_VALUE,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_BAD_LAUNCH_PARAM,
            cudnnStatus_t::CUDNN_STATUS_INTERNAL_ERROR_TEXTURE_CREATION_FAILED,
            cudnnStatus_t::CUDNN_STATUS_EXECUTION_FAILED,
            cudnnStatus_t::CUDNN_STATUS_EXECUTION_FAILED_CUDA_DRIVER,
            cudnnStatus_t::CUDNN_STATUS_EXECUTION_FAILED_CUBLAS,
            cudnnStatus_t::CUDNN_STATUS_EXECUTION_FAILED_CUDART,
            cudnnStatus_t::CUDNN_STATUS_EXECUTION_FAILED_CURAND,
            cudnnDataType_t::CUDNN_DATA_FLOAT,
            cudnnDataType_t::CUDNN_DATA_DOUBLE,
            cudnnDataType_t::CUDNN_DATA_HALF,
            cudnnDataType_t::CUDNN_DATA_INT8,
            cudnnDataType_t::CUDNN_DATA_INT32,
            cudnnDataType_t::CUDNN_DATA_INT8x4,
            cudnnDataType_t::CUDNN_DATA_UINT8,
            cudnnDataType_t::CUDNN_DATA_UINT8x4,
            cudnnDataType_t::CUDNN_DATA_INT8x32,
            cudnnDataType_t::CUDNN_DATA_BFLOAT16,
            cudnnDataType_t::CUDNN_DATA_INT64,
            cudnnDataType_t::CUDNN_DATA_BOOLEAN,
            cudnnDataType_t::CUDNN_DATA_FP8_E4M3,
            cudnnDataType_t::CUDNN_DATA_FP8_E5M2,
            cudnnDataType_t::CUDNN_DATA_FAST_FLOAT_FOR_FP8,
            cudnnDataType_t::CUDNN_DATA_FP8_E8M0,
            cudnnDataType_t::CUDNN_DATA_FP4_E2M1,
            cudnnDataType_t::CUDNN_DATA_INT4,
            cudnnDataType_t::CUDNN_DATA_UINT4,
            cudnnDataType_t::CUDNN_DATA_UINT32,
            cudnnDataType_t::CUDNN_DATA_COMPLEX_FP32,
            cudnnDataType_t::CUDNN_DATA_COMPLEX_FP64,
            cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            cudnnTensorFormat_t::CUDNN_TENSOR_NCHW_VECT_C,
            cudnnConvolutionMode_t::CUDNN_CONVOLUTION,
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            cudnnMathType_t::CUDNN_DEFAULT_MATH,
            cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
            cudnnMathType_t::CUDNN_FMA_MATH,
            cudnnDeterminism_t::CUDNN_NON_DETERMINISTIC,
            cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
        ],
    );
}
