//! Strided f32 matrix products through the `gemm` crate.

/// A strided matrix view for [`matmul`]; strides are in elements.
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

pub(crate) struct Mat<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

/// Largest offset a rows×cols view with non-negative strides touches, plus one.
fn extent(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1
}

impl<'a> MatRef<'a> {
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize, rs: isize, cs: isize) -> Self {
        assert!(rs >= 0 && cs >= 0 && extent(rows, cols, rs, cs) <= data.len());
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

impl<'a> Mat<'a> {
    pub(crate) fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: isize, cs: isize) -> Self {
        assert!(rs >= 0 && cs >= 0 && extent(rows, cols, rs, cs) <= data.len());
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

/// `dst = scale · lhs · rhs`, or `dst += scale · lhs · rhs` with `accumulate`, through the
/// `gemm` crate; `parallel` spreads one product over rayon's threads (leave it off inside tasks
/// that are already parallel).
pub(crate) fn matmul(
    dst: Mat<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    assert!(lhs.rows == dst.rows && rhs.cols == dst.cols && lhs.cols == rhs.rows);
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the constructors checked that every strided view lies inside its slice, the shapes
    // agree (asserted above), and `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            dst.cs,
            dst.rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}
