//! The heavy arithmetic of the layers, behind a trait so that a device backend can stand in for
//! the CPU one without touching the model code.
//!
//! Every reduction over the batch is split into a fixed number of chunks summed in a fixed order,
//! so results do not depend on how many threads ran them.

use super::norm;
use crate::cpu::conv::{self, Conv3, Isa};
use crate::cpu::moments::{for_each_image, image_moments};
use crate::cpu::pool::Scratch;
use crate::cpu::{batch_chunk, matmul, Mat, MatRef};

/// Fewest channels (in and out) for which the direct 3×3 kernel runs instead of im2col + GEMM.
const DIRECT_MIN_C: usize = 16;
use rayon::prelude::*;

/// Geometry of a 2-D convolution (square kernel, no bias, groups = 1, NCHW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    /// Input channels.
    pub in_c: usize,
    /// Output channels.
    pub out_c: usize,
    /// Kernel side, in pixels.
    pub k: usize,
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zero padding on each side, in pixels.
    pub pad: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width, in pixels.
    pub w: usize,
}

impl ConvSpec {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// The direct kernel's shape, when this convolution is one it runs (3×3, padding 1, stride 1
    /// or 2, with enough channels on both sides to fill its tiles; the rest unfold into a GEMM).
    fn direct(&self) -> Option<Conv3> {
        let fits = self.k == 3 && self.pad == 1 && (self.stride == 1 || self.stride == 2);
        (fits && self.in_c.min(self.out_c) >= DIRECT_MIN_C).then_some(Conv3 {
            ci: self.in_c,
            co: self.out_c,
            h: self.h,
            w: self.w,
            stride: self.stride,
        })
    }
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    /// Rows of the unfolded input: C·K·K.
    fn col_rows(&self) -> usize {
        self.in_c * self.k * self.k
    }
}

/// The operations layers delegate. Shapes are given explicitly; buffers are row-major. Outputs
/// (`y`, `dx`, `moments`) arrive holding anything and are written in full; gradients of
/// parameters (`dw`, `db`, `dgamma`, `dbeta`) accumulate.
pub trait Backend: Sync {
    /// A short name for logs (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// How many equal batches the batch statistics span: 1, or the ranks of a data-parallel
    /// group whose batch norm is synchronized (the running variance's unbiasing counts them).
    fn stat_batches(&self) -> usize {
        1
    }

    /// `y[n] = conv(x[n], w)`, y of shape [n, out_c, ho, wo]; when `moments` is given, also the
    /// per-plane moments of y ([n, out_c, 3], see [`channel_stats`](Backend::channel_stats)),
    /// gathered while each image is still in cache.
    fn conv2d_forward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        moments: Option<&mut [f32]>,
    );

    /// Accumulates dL/dw into `dw` and, when given, writes dL/dx into `dx`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    );

    /// `y = x·wᵀ (+ b)`: x [n, in], w [out, in], y [n, out].
    fn linear_forward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
        out: usize,
    );

    /// Accumulates dL/dw (and dL/db) and, when given, writes dL/dx.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        out: usize,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    );

    /// Per-channel batch statistics of x [n, c, hw]: biased mean and variance, from the
    /// per-plane moments the convolution that wrote x gathered, or from x when there are none.
    #[allow(clippy::too_many_arguments)]
    fn channel_stats(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        moments: Option<&[f32]>,
        mean: &mut [f32],
        var: &mut [f32],
    );

    /// `y = (x − mean)·rstd·γ + β` per channel, plus `residual` when given, clamped at zero when
    /// `relu`: the whole normalization in one pass.
    #[allow(clippy::too_many_arguments)]
    fn norm_apply(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        affine: (&[f32], &[f32]),
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    );

    /// BatchNorm backward from the norm's input x and its batch statistics (mean, rstd): zeroes dy
    /// where `relu_out` (the output of a fused ReLU) is not positive, then accumulates dγ, dβ and
    /// writes dx.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        gamma: &[f32],
        relu_out: Option<&[f32]>,
        dy: &mut [f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    );
}

/// The CPU backend: rayon over images or channels, `gemm` for the products.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// The output columns `ox` whose input column `ox·s − p + kx` lies inside `0..w`, as a range.
fn valid_cols(wo: usize, w: usize, s: usize, p: usize, kx: usize) -> (usize, usize) {
    // ox·s + kx ≥ p  and  ox·s + kx − p ≤ w − 1
    let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) };
    let hi = if w + p > kx {
        ((w + p - kx - 1) / s + 1).min(wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

fn im2col(spec: &ConvSpec, x: &[f32], col: &mut [f32]) {
    let (ho, wo) = (spec.ho(), spec.wo());
    let (h, w, k, s, p) = (spec.h, spec.w, spec.k, spec.stride, spec.pad);
    let hw = ho * wo;
    for c in 0..spec.in_c {
        let xc = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((c * k + ky) * k + kx) * hw..][..hw];
                let (lo, hi) = valid_cols(wo, w, s, p, kx);
                for oy in 0..ho {
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize || lo >= hi {
                        out.fill(0.0);
                        continue;
                    }
                    let xr = &xc[iy as usize * w..][..w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let x0 = lo * s + kx - p;
                    if s == 1 {
                        out[lo..hi].copy_from_slice(&xr[x0..x0 + (hi - lo)]);
                    } else {
                        for (i, v) in out[lo..hi].iter_mut().enumerate() {
                            *v = xr[x0 + i * s];
                        }
                    }
                }
            }
        }
    }
}

fn col2im(spec: &ConvSpec, col: &[f32], dx: &mut [f32]) {
    let (ho, wo) = (spec.ho(), spec.wo());
    let (h, w, k, s, p) = (spec.h, spec.w, spec.k, spec.stride, spec.pad);
    let hw = ho * wo;
    dx.fill(0.0);
    for c in 0..spec.in_c {
        let xc = &mut dx[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((c * k + ky) * k + kx) * hw..][..hw];
                let (lo, hi) = valid_cols(wo, w, s, p, kx);
                if lo >= hi {
                    continue;
                }
                for oy in 0..ho {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let xr = &mut xc[iy as usize * w..][..w];
                    let x0 = lo * s + kx - p;
                    let src = &row[oy * wo + lo..oy * wo + hi];
                    if s == 1 {
                        for (d, v) in xr[x0..x0 + (hi - lo)].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (i, v) in src.iter().enumerate() {
                            xr[x0 + i * s] += v;
                        }
                    }
                }
            }
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn conv2d_forward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        moments: Option<&mut [f32]>,
    ) {
        if let Some(s) = spec.direct() {
            return conv::forward(Isa::detect(), &s, n, x, w, y, moments);
        }
        let in_len = spec.in_c * spec.h * spec.w;
        let hw = spec.ho() * spec.wo();
        let out_len = spec.out_c * hw;
        let kk = spec.col_rows();
        for_each_image(
            n,
            (y, out_len),
            (x, in_len),
            moments.map(|m| (m, spec.out_c)),
            || Scratch::take(if spec.is_pointwise() { 0 } else { kk * hw }),
            |col, yi, xi, mi| {
                let src: &[f32] = if spec.is_pointwise() {
                    xi
                } else {
                    im2col(spec, xi, col);
                    col
                };
                matmul(
                    Mat::new(yi, spec.out_c, hw, hw as isize, 1),
                    MatRef::new(w, spec.out_c, kk, kk as isize, 1),
                    MatRef::new(src, kk, hw, hw as isize, 1),
                    1.0,
                    false,
                    false,
                );
                if let Some(mi) = mi {
                    image_moments(hw, yi, mi);
                }
            },
        );
    }

    fn conv2d_backward(
        &self,
        spec: &ConvSpec,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        if let Some(s) = spec.direct() {
            conv::backward_filter(Isa::detect(), &s, n, x, dy, dw);
            if let Some(dx) = dx {
                conv::backward_input(Isa::detect(), &s, n, w, dy, dx);
            }
            return;
        }
        // A "same" stride-1 convolution's input gradient is a forward convolution of dy with the
        // flipped, transposed kernel: one efficient GEMM per image instead of a thin GEMM plus
        // col2im.
        let dx = match dx {
            Some(dx) if spec.stride == 1 && spec.k > 1 && 2 * spec.pad == spec.k - 1 => {
                let k = spec.k;
                let mut wt = Scratch::take(w.len());
                for o in 0..spec.out_c {
                    for c in 0..spec.in_c {
                        for ky in 0..k {
                            for kx in 0..k {
                                wt[((c * spec.out_c + o) * k + ky) * k + kx] =
                                    w[((o * spec.in_c + c) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
                            }
                        }
                    }
                }
                let tspec = ConvSpec {
                    in_c: spec.out_c,
                    out_c: spec.in_c,
                    h: spec.ho(),
                    w: spec.wo(),
                    ..*spec
                };
                self.conv2d_forward(&tspec, n, dy, &wt, dx, None);
                None
            }
            other => other,
        };
        let in_len = spec.in_c * spec.h * spec.w;
        let hw = spec.ho() * spec.wo();
        let out_len = spec.out_c * hw;
        let kk = spec.col_rows();
        let per = batch_chunk(n);
        let wlen = spec.out_c * kk;
        // One dw partial per chunk of images; dx is written per image inside its chunk.
        let work = |ci: usize, dx_chunk: Option<&mut [f32]>| -> Scratch {
            let start = ci * per;
            let end = (start + per).min(n);
            let mut dwp = Scratch::zeroed(wlen);
            let unfolded = if spec.is_pointwise() { 0 } else { kk * hw };
            let mut col = Scratch::take(unfolded);
            let mut dcol = Scratch::take(if dx_chunk.is_some() { unfolded } else { 0 });
            let mut dx_chunk = dx_chunk;
            for i in start..end {
                let xi = &x[i * in_len..(i + 1) * in_len];
                let dyi = &dy[i * out_len..(i + 1) * out_len];
                let src: &[f32] = if spec.is_pointwise() {
                    xi
                } else {
                    im2col(spec, xi, &mut col);
                    &col
                };
                // dw += dy_i · colᵀ
                matmul(
                    Mat::new(&mut dwp, spec.out_c, kk, kk as isize, 1),
                    MatRef::new(dyi, spec.out_c, hw, hw as isize, 1),
                    MatRef::new(src, hw, kk, 1, hw as isize),
                    1.0,
                    true,
                    false,
                );
                if let Some(dxc) = dx_chunk.as_deref_mut() {
                    let dxi = &mut dxc[(i - start) * in_len..(i - start + 1) * in_len];
                    let wt = MatRef::new(w, kk, spec.out_c, 1, kk as isize);
                    let dyr = MatRef::new(dyi, spec.out_c, hw, hw as isize, 1);
                    if spec.is_pointwise() {
                        matmul(
                            Mat::new(dxi, kk, hw, hw as isize, 1),
                            wt,
                            dyr,
                            1.0,
                            false,
                            false,
                        );
                    } else {
                        matmul(
                            Mat::new(&mut dcol, kk, hw, hw as isize, 1),
                            wt,
                            dyr,
                            1.0,
                            false,
                            false,
                        );
                        col2im(spec, &dcol, dxi);
                    }
                }
            }
            dwp
        };
        let chunks = n.div_ceil(per);
        let partials: Vec<Scratch> = match dx {
            Some(dx) => dx[..n * in_len]
                .par_chunks_mut(per * in_len)
                .enumerate()
                .map(|(ci, dxc)| work(ci, Some(dxc)))
                .collect(),
            None => (0..chunks)
                .into_par_iter()
                .map(|ci| work(ci, None))
                .collect(),
        };
        for p in &partials {
            for (a, b) in dw.iter_mut().zip(p.iter()) {
                *a += b;
            }
        }
    }

    fn linear_forward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        y: &mut [f32],
        out: usize,
    ) {
        let inp = w.len() / out;
        matmul(
            Mat::new(&mut y[..n * out], n, out, out as isize, 1),
            MatRef::new(x, n, inp, inp as isize, 1),
            MatRef::new(w, inp, out, 1, inp as isize),
            1.0,
            false,
            true,
        );
        if let Some(b) = b {
            y[..n * out].par_chunks_mut(out).for_each(|row| {
                row.iter_mut().zip(b).for_each(|(v, bb)| *v += bb);
            });
        }
    }

    fn linear_backward(
        &self,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        out: usize,
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: Option<&mut [f32]>,
    ) {
        let inp = w.len() / out;
        matmul(
            Mat::new(dw, out, inp, inp as isize, 1),
            MatRef::new(dy, out, n, 1, out as isize),
            MatRef::new(x, n, inp, inp as isize, 1),
            1.0,
            true,
            true,
        );
        if let Some(dx) = dx {
            matmul(
                Mat::new(&mut dx[..n * inp], n, inp, inp as isize, 1),
                MatRef::new(dy, n, out, out as isize, 1),
                MatRef::new(w, out, inp, inp as isize, 1),
                1.0,
                false,
                true,
            );
        }
        if let Some(db) = db {
            for row in dy[..n * out].chunks_exact(out) {
                db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    }

    fn channel_stats(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        moments: Option<&[f32]>,
        mean: &mut [f32],
        var: &mut [f32],
    ) {
        let m = (n * hw) as f64;
        norm::channel_stats(n, c, hw, x, moments, m, &|_| {}, mean, var);
    }

    fn norm_apply(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        affine: (&[f32], &[f32]),
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        norm::apply(n, c, hw, x, stats, affine, residual, relu, y);
    }

    fn batch_norm_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        x: &[f32],
        stats: (&[f32], &[f32]),
        gamma: &[f32],
        relu_out: Option<&[f32]>,
        dy: &mut [f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let sums = norm::grad_sums(n, c, hw, x, stats, relu_out, dy);
        for ch in 0..c {
            dbeta[ch] += sums[2 * ch] as f32;
            dgamma[ch] += sums[2 * ch + 1] as f32;
        }
        norm::input_grad(n, c, hw, &sums, (n * hw) as f64, x, stats, gamma, dy, dx);
    }
}
