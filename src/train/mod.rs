//! Training: the optimizer and schedule, the two-view model step, data, augmentations,
//! evaluation, checkpoints and the run loop behind `barlow train`.

pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod eval;
pub mod folder;
pub mod lars;
pub mod model;
pub mod parallel;
pub mod ranks;
pub mod run;

pub use lars::{Lars, LarsConfig, Schedule};
pub use model::{BarlowTwins, ModelConfig};
