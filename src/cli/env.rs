//! The environment variables the command line maps onto library settings (the library itself reads
//! none), and the logger that prints the library's warnings.

use barlow::cuda::cudnn::AlgoSearch;
use barlow::train::data::DEFAULT_IMAGE_MEMORY;

/// `BARLOW_CUDNN_FIND=0`: cuDNN's heuristic ranking instead of timing the algorithms.
pub(crate) fn cudnn_search() -> AlgoSearch {
    match std::env::var("BARLOW_CUDNN_FIND") {
        Ok(v) if v == "0" => AlgoSearch::Heuristic,
        _ => AlgoSearch::Benchmark,
    }
}

/// `BARLOW_IMAGE_MEMORY_GB`: GiB of decoded images an image folder may hold in memory.
pub(crate) fn image_memory() -> Result<usize, String> {
    match std::env::var("BARLOW_IMAGE_MEMORY_GB") {
        Err(_) => Ok(DEFAULT_IMAGE_MEMORY),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(g) if g.is_finite() && g >= 0.0 => Ok((g * (1u64 << 30) as f64) as usize),
            _ => Err(format!(
                "BARLOW_IMAGE_MEMORY_GB={v:?} is not a number of GiB (0 or more)"
            )),
        },
    }
}

/// Prints the library's log records at `info` and above on stderr, as `barlow: ...` lines.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("barlow")
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            match r.level() {
                log::Level::Error | log::Level::Warn => {
                    eprintln!(
                        "barlow: {}: {}",
                        r.level().as_str().to_lowercase(),
                        r.args()
                    )
                }
                _ => eprintln!("barlow: {}", r.args()),
            }
        }
    }

    fn flush(&self) {}
}

pub(crate) fn install_logger() {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
