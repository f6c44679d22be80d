//! The kernels, compiled by `build.rs` into one fatbin per module (machine code for each target
//! architecture plus PTX for newer ones) and embedded in the binary. A module is loaded into a
//! context the first time one of its kernels is needed.

/// One kernel as its source declares it.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// Its `extern "C"` name.
    pub name: &'static str,
    /// Its parameters' C types, normalized (`const float*`, `int64_t`), macro arguments
    /// substituted.
    pub params: &'static [&'static str],
}

/// One module of kernels: its fatbin and the signature of every kernel its sources define.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// The folder under `kernels/` it is built from.
    pub name: &'static str,
    /// The fatbin, or `None` when the crate was built without nvcc.
    pub image: Option<&'static [u8]>,
    /// Every kernel the module defines, sorted by name (generated from the sources by
    /// `build.rs`).
    pub kernels: &'static [Kernel],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every module this build has (its features enabled).
pub const MODULES: &[Module] = &[
    LOSS,
    #[cfg(feature = "bench")]
    BENCH,
    #[cfg(feature = "train")]
    TRAIN,
];

/// Whether the kernels were compiled in.
pub fn built() -> bool {
    MODULES.iter().all(|m| m.image.is_some())
}
