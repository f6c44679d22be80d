//! The crate's one error type. Every failure a caller can cause or meet is a variant here; nothing
//! in the public API panics on caller input.

/// Errors returned by barlow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input's length does not match the N×D shape the caller declared.
    #[error("shape mismatch: `{name}` holds {len} elements, but N×D = {n}×{d} = {expected}")]
    ShapeMismatch {
        /// Which input.
        name: &'static str,
        /// Its length in elements.
        len: usize,
        /// Declared batch size N.
        n: usize,
        /// Declared feature dimension D.
        d: usize,
        /// N×D.
        expected: usize,
    },
    /// Standardizing over the batch needs at least two rows.
    #[error("batch size N = {n} is too small: standardization over the batch needs N >= 2")]
    BatchTooSmall {
        /// The batch size given.
        n: usize,
    },
    /// The feature dimension is zero.
    #[error("feature dimension D is 0: the projector output must have at least one column")]
    EmptyFeatures,
    /// N×D (or D×D) does not fit the index types the kernels and cuBLAS use.
    #[error("size too large: {what}")]
    TooLarge {
        /// Which size, with its value.
        what: String,
    },
    /// An output buffer is smaller than the shape needs.
    #[error("buffer `{name}` is too small: it holds {len} elements, but {needed} are needed")]
    BufferTooSmall {
        /// Which buffer.
        name: &'static str,
        /// Its length in elements.
        len: usize,
        /// Elements needed.
        needed: usize,
    },
    /// A device buffer belongs to a different CUDA context (device) than the stream.
    #[error(
        "buffer `{name}` lives on another CUDA device/context than the stream it was passed with"
    )]
    WrongContext {
        /// Which buffer.
        name: &'static str,
    },
    /// A configuration value (of the loss, the trainer or a command) is out of range; the
    /// message names it.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The inputs hold NaN or infinity, so the loss is not a number.
    #[error("non-finite inputs: the loss came out as {total} (NaN or infinity in Za or Zb)")]
    NonFinite {
        /// The loss that came out (NaN or ±infinity).
        total: f64,
    },
    /// The run was asked to stop (Ctrl-C or SIGTERM in the CLI).
    #[error("interrupted after step {step}; {}", interrupted_note(.kept))]
    Interrupted {
        /// The last step that finished.
        step: usize,
        /// Whether a checkpoint of an earlier epoch exists to resume from.
        kept: bool,
    },
    /// Training or an evaluation diverged: a loss, a weight, a feature or a logit stopped being
    /// a finite number. No accuracy or checkpoint comes from such values.
    #[error("{what} diverged at {at}: {value}; {advice}")]
    Diverged {
        /// What diverged: `training`, `the linear probe`, `evaluation`.
        what: String,
        /// Where: `step 12`, `the end of epoch 2`, `probe epoch 3`.
        at: String,
        /// The value that stopped being finite, e.g. `the loss became NaN`.
        value: String,
        /// What to lower, and what was kept.
        advice: String,
    },
    /// A buffer could not be allocated on the host.
    #[error("out of memory while {during} ({bytes} bytes); use a smaller N or D, or the Gram path for large D")]
    OutOfHostMemory {
        /// What was being allocated.
        during: String,
        /// Bytes asked for.
        bytes: usize,
    },
    /// The device ran out of memory.
    #[error("out of device memory while {during} (needs about {bytes} bytes); use a smaller N or D, or free device memory")]
    OutOfDeviceMemory {
        /// What was being allocated.
        during: String,
        /// Bytes asked for (0 when unknown).
        bytes: usize,
    },
    /// The crate was compiled without nvcc, so no CUDA kernels are embedded.
    #[error("built without CUDA kernels: install nvcc (scripts/install-nvcc.sh) and rebuild")]
    NoKernels,
    /// libcuda (the NVIDIA driver) could not be loaded.
    #[error(
        "no CUDA driver: libcuda could not be loaded, lacks the driver's entry points, or failed \
         to initialise (is an NVIDIA driver installed?)"
    )]
    NoCudaDriver,
    /// libcublas could not be loaded.
    #[error("cuBLAS not found: libcublas could not be loaded (install the CUDA toolkit or put its lib folder on LD_LIBRARY_PATH)")]
    NoCublas,
    /// libcudnn could not be loaded.
    #[error("cuDNN not found: libcudnn could not be loaded (install cuDNN 9 for CUDA 13, e.g. the nvidia-cudnn-cu13 wheel, and put its lib folder on LD_LIBRARY_PATH)")]
    NoCudnn,
    /// libnccl could not be loaded.
    #[error("NCCL not found: neither libnccl.so.2 nor libnccl.so could be loaded with NCCL's entry points (install NCCL, e.g. the nvidia-nccl-cu13 wheel or Debian's libnccl2, and put its lib folder on LD_LIBRARY_PATH)")]
    NoNccl,
    /// The driver found no usable CUDA device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A dataset is missing, empty or malformed.
    #[error("dataset {path}: {reason}")]
    Dataset {
        /// The dataset path or name.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other CUDA driver failure, with the call that failed.
    #[error("CUDA error in {during}: {message}")]
    Cuda {
        /// The operation that failed.
        during: String,
        /// The driver's error.
        message: String,
    },
    /// Any other cuDNN failure, with the call that failed.
    #[error("cuDNN error in {during}: {message}")]
    Cudnn {
        /// The operation that failed.
        during: String,
        /// cuDNN's error.
        message: String,
    },
    /// Any other cuBLAS failure, with the call that failed.
    #[error("cuBLAS error in {during}: {message}")]
    Cublas {
        /// The operation that failed.
        during: String,
        /// cuBLAS's error.
        message: String,
    },
    /// A collective between ranks failed: mismatched calls, a rank that left or stopped
    /// answering, or the communication library's error.
    #[error("collective {during}: {message}")]
    Collective {
        /// The operation and rank.
        during: String,
        /// What went wrong.
        message: String,
    },
}

fn interrupted_note(kept: &bool) -> &'static str {
    if *kept {
        "the checkpoint of the last finished epoch is kept (continue with --resume)"
    } else {
        "no epoch had finished, so there is no checkpoint to resume from, and the run's files \
         were removed"
    }
}

/// Shorthand for `Result<T, barlow::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }

    /// True when the error means no GPU can be used at all (no kernels, driver, device, cuBLAS
    /// or cuDNN), as opposed to a failure on a GPU that exists.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::NoKernels
                | Error::NoCudaDriver
                | Error::NoDevice(_)
                | Error::NoCublas
                | Error::NoCudnn
                | Error::NoNccl
        )
    }

    /// A dataset error on `path`.
    pub fn dataset(path: impl AsRef<std::path::Path>, reason: impl Into<String>) -> Self {
        Error::Dataset {
            path: path.as_ref().display().to_string(),
            reason: reason.into(),
        }
    }
}
