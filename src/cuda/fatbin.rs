//! The kernels, compiled by `build.rs` into one fatbin (machine code for each target architecture
//! plus PTX for newer ones) and embedded in the binary.

/// The embedded fatbin, or `None` when the crate was built without nvcc.
#[cfg(barlow_kernels)]
pub const FATBIN: Option<&[u8]> = Some(include_bytes!(env!("BARLOW_FATBIN")));
/// The embedded fatbin, or `None` when the crate was built without nvcc.
#[cfg(not(barlow_kernels))]
pub const FATBIN: Option<&[u8]> = None;

/// Every kernel the Rust side launches, by name. Loading checks each one once per context.
pub const KERNEL_NAMES: &[&str] = &[
    "standardize_fwd_f32_f32",
    "standardize_fwd_bf16_f32",
    "standardize_fwd_f16_f32",
    "standardize_fwd_f32_bf16",
    "standardize_fwd_bf16_bf16",
    "standardize_fwd_f16_bf16",
    "standardize_bwd_f32",
    "standardize_bwd_bf16",
    "standardize_bwd_f16",
    "loss_reduce_partial_f32",
    "loss_reduce_partial_bf16",
    "loss_reduce_final",
    "gram_diag_f32",
    "gram_diag_bf16",
    "gram_dot_partial",
    "gram_final",
    "gram_grad_init_f32",
    "gram_grad_init_bf16",
    "naive_col_mean",
    "naive_col_var",
    "naive_normalize",
    "naive_col_sum",
    "naive_mul",
    "naive_affine",
    "naive_square",
    "naive_diag_copy",
    "naive_off_diag_copy",
    "naive_off_diag_scatter",
    "naive_diag_scatter",
    "naive_sum_partial",
    "naive_sum_final",
    "naive_bn_bwd",
    "naive_cast_bf16",
];
