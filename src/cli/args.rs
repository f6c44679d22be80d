//! Option types shared by several subcommands, and the value parsers that reject bad options
//! while parsing.

use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PrecisionArg {
    Bf16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ArchArg {
    Resnet18,
    Resnet50,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum StemArg {
    Small,
    Imagenet,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub(crate) enum Device {
    /// The GPU when one works, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl From<ArchArg> for barlow::nn::resnet::Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Resnet18 => Self::Resnet18,
            ArchArg::Resnet50 => Self::Resnet50,
        }
    }
}

impl From<StemArg> for barlow::nn::resnet::Stem {
    fn from(s: StemArg) -> Self {
        match s {
            StemArg::Small => Self::Small,
            StemArg::Imagenet => Self::Imagenet,
        }
    }
}

impl From<Device> for barlow::train::run::DeviceChoice {
    fn from(d: Device) -> Self {
        match d {
            Device::Auto => Self::Auto,
            Device::Cpu => Self::Cpu,
            Device::Cuda => Self::Cuda,
        }
    }
}

impl From<PrecisionArg> for barlow::train::run::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Bf16 => Self::Bf16,
            PrecisionArg::F32 => Self::F32,
        }
    }
}

/// Parses a value and keeps it only when `ok` accepts it; clap adds the option's name to the
/// message.
pub(crate) fn checked<T>(s: &str, ok: impl Fn(&T) -> bool, need: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let v: T = s.parse().map_err(|e: T::Err| e.to_string())?;
    if ok(&v) {
        Ok(v)
    } else {
        Err(need.into())
    }
}

/// A count of at least 1.
pub(crate) fn positive(s: &str) -> Result<usize, String> {
    checked(s, |&v| v >= 1, "must be at least 1")
}

/// A batch size: the loss standardizes over the batch, so at least 2.
pub(crate) fn batch(s: &str) -> Result<usize, String> {
    checked(
        s,
        |&v| v >= 2,
        "must be at least 2 (Barlow Twins standardizes over the batch)",
    )
}

/// A crop size in pixels: at least 1 and no larger than any image worth training on.
pub(crate) fn crop(s: &str) -> Result<usize, String> {
    checked(
        s,
        |v| (1..=4096).contains(v),
        "must be between 1 and 4096 pixels",
    )
}

/// A finite number >= 0.
pub(crate) fn non_negative(s: &str) -> Result<f32, String> {
    checked(
        s,
        |v: &f32| v.is_finite() && *v >= 0.0,
        "must be a finite number >= 0",
    )
}

/// A finite number > 0.
pub(crate) fn finite_positive(s: &str) -> Result<f32, String> {
    checked(
        s,
        |v: &f32| v.is_finite() && *v > 0.0,
        "must be a finite number > 0",
    )
}
