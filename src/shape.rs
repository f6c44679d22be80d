//! Shape checks shared by every entry point, so that each one rejects bad input the same way.

use crate::error::{Error, Result};

/// The shape of one view's projector output: N rows (the batch) × D columns (features), row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Batch size N (rows). Must be at least 2.
    pub n: usize,
    /// Feature dimension D (columns). Must be at least 1.
    pub d: usize,
}

impl Dims {
    /// A shape of `n` rows and `d` columns (checked when used).
    pub fn new(n: usize, d: usize) -> Self {
        Self { n, d }
    }

    /// Returns `(n, d)` when the shape is usable: N ≥ 2, D ≥ 1, and N×D, D×D fit in memory sizes.
    pub fn checked(self) -> Result<(usize, usize)> {
        let Dims { n, d } = self;
        if n < 2 {
            return Err(Error::BatchTooSmall { n });
        }
        if d == 0 {
            return Err(Error::EmptyFeatures);
        }
        let too_large = |what: String| Error::TooLarge { what };
        let nd = n
            .checked_mul(d)
            .ok_or_else(|| too_large(format!("N×D with N = {n}, D = {d}")))?;
        let dd = d
            .checked_mul(d)
            .ok_or_else(|| too_large(format!("D×D with D = {d}")))?;
        // Byte sizes must fit too (f64 references use 8 bytes per element).
        nd.checked_mul(8)
            .and(dd.checked_mul(8))
            .ok_or_else(|| too_large(format!("N = {n}, D = {d} overflows a byte count")))?;
        Ok((n, d))
    }

    /// Number of elements, N×D (call after [`Dims::checked`]).
    pub fn len(self) -> usize {
        self.n * self.d
    }

    /// True when N×D is zero.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// An input must hold exactly N×D elements.
pub(crate) fn check_input(name: &'static str, len: usize, dims: Dims) -> Result<()> {
    let expected = dims.n * dims.d;
    if len != expected {
        return Err(Error::ShapeMismatch {
            name,
            len,
            n: dims.n,
            d: dims.d,
            expected,
        });
    }
    Ok(())
}

/// An output must hold at least `needed` elements; only the first `needed` are written.
pub(crate) fn check_output(name: &'static str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::BufferTooSmall { name, len, needed });
    }
    Ok(())
}
