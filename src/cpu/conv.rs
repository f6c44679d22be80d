//! Direct 3×3, padding-1 convolutions of stride 1 or 2 on the CPU: forward, input gradient and
//! weight gradient.
//!
//! Each image is copied once into a zero-padded channels-last buffer, so every output position
//! reads its 3×3×C patch without bounds checks or an unfolded copy. A register tile of R output
//! positions × NV vectors of output channels accumulates over the 9 taps and the input channels
//! (forward; the input gradient runs the same tile over dy with the taps of each stride phase),
//! or of R input channels × NV vectors of output channels over every position of a chunk of
//! images (weight gradient). The tiles are written once per instruction set (AVX-512,
//! AVX2 with FMA, and a portable one that every target builds), chosen at run time.
//!
//! The tensors outside are NCHW and OIHW: the channels-last copies are per image (forward) or per
//! chunk of images (weight gradient) and cost one pass over data that each element of which feeds
//! hundreds of multiply-adds.

use super::moments::{for_each_image, image_moments};
use super::pool::Scratch;
use rayon::prelude::*;
use std::sync::OnceLock;

/// The vector instruction set the tiles run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 16 lanes, 32 registers.
    Avx512,
    /// 8 lanes with fused multiply-add, 16 registers.
    Avx2,
    /// Plain arrays of 8 lanes (left to the compiler); every target builds it.
    Portable,
}

impl Isa {
    /// The best the running CPU supports (detected once).
    pub fn detect() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Whether the running CPU can run this instruction set.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            Isa::Avx2 => Self::detect() != Isa::Portable,
            Isa::Avx512 => Self::detect() == Isa::Avx512,
        }
    }

    /// Lanes per vector, then (vectors, rows) of the forward tile for `co` output channels over
    /// rows of `w` positions, and of the weight-gradient tile (rows are input channels there).
    fn tiles(self, co: usize, w: usize) -> (usize, (usize, usize), (usize, usize)) {
        match self {
            Isa::Avx512 => {
                let dw = match co {
                    0..=16 => (1, 8),
                    17..=32 => (2, 4),
                    _ => (4, 4),
                };
                // Rows of 7 or 14 positions split into tiles of 7 with nothing wasted.
                let fwd = match (dw.0, w.is_multiple_of(7)) {
                    (1, true) => (1, 7),
                    (1, false) => (1, 8),
                    (_, true) => (2, 7),
                    (nv, false) => (nv, 4),
                };
                (16, fwd, dw)
            }
            Isa::Avx2 | Isa::Portable => (8, (2, 4), (2, 4)),
        }
    }
}

/// A 3×3, padding-1 convolution of `ci` to `co` channels over h×w images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3 {
    /// Input channels.
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Image height.
    pub h: usize,
    /// Image width.
    pub w: usize,
    /// Step between output positions (1 or 2).
    pub stride: usize,
}

/// Sizes of the padded, channels-last layout for an instruction set.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Output channels rounded up to a whole tile.
    cop: usize,
    /// Input channels rounded up to a whole tile (the weight gradient's rows).
    cip: usize,
    /// Padded row length, in positions.
    pw: usize,
    /// Positions of one padded image, plus slack for the last tile's overrun.
    plen: usize,
    lanes: usize,
    /// Vectors and rows of the forward tile.
    fwd: (usize, usize),
    /// Vectors and rows of the weight-gradient tile.
    dw: (usize, usize),
}

impl Conv3 {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h - 1) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w - 1) / self.stride + 1
    }

    fn layout(&self, isa: Isa) -> Layout {
        let (lanes, fwd, dw) = isa.tiles(self.co, self.wo());
        let block = lanes * fwd.0.max(dw.0);
        let cop = self.co.div_ceil(block) * block;
        let cip = self.ci.div_ceil(dw.1) * dw.1;
        let pw = self.w + 2;
        Layout {
            cop,
            cip,
            pw,
            // The last forward tile reads up to (wo − 1 + R − 1)·stride + 2 columns into its
            // last row.
            plen: (self.h + 2) * pw + (fwd.1 + 2) * self.stride + 2,
            lanes,
            fwd,
            dw,
        }
    }
}

/// Copies one NCHW image into the zero-padded channels-last buffer (`pad` positions × cip).
fn pad_image(s: &Conv3, l: &Layout, x: &[f32], pad: &mut [f32]) {
    pad.fill(0.0);
    let hw = s.h * s.w;
    for c in 0..s.ci {
        let plane = &x[c * hw..][..hw];
        for y in 0..s.h {
            for (xx, &v) in plane[y * s.w..][..s.w].iter().enumerate() {
                pad[((y + 1) * l.pw + xx + 1) * l.cip + c] = v;
            }
        }
    }
}

/// Weights OIHW → [tap][ci][cop], output channels padded with zeros.
fn pack_weights(s: &Conv3, l: &Layout, w: &[f32]) -> Vec<f32> {
    let mut p = vec![0f32; 9 * s.ci * l.cop];
    for o in 0..s.co {
        for c in 0..s.ci {
            for t in 0..9 {
                p[(t * s.ci + c) * l.cop + o] = w[(o * s.ci + c) * 9 + t];
            }
        }
    }
    p
}

/// The tiles, written once over an instruction set's vector type and operations.
macro_rules! tiles {
    ([$(#[$attr:meta])*], $vec:ty, $lanes:expr, $zero:expr, $load:path, $splat:path, $fma:path, $store:path) => {
        /// acc[r][v] = Σ over the taps and `ci` channels of x[tap + r·step + c] · w[tap][c][v],
        /// each tap an (x offset, w offset) pair in floats.
        ///
        /// # Safety
        /// `x` plus every tap's x offset points at a padded image readable for the tile's R
        /// positions `step` floats apart and `ci` channels each; `w` plus every tap's w offset
        /// at packed weights with rows `cop` apart, readable for `ci` rows of NV vectors; `out`
        /// holds R·NV·lanes.
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn forward_tile<const R: usize, const NV: usize>(
            x: *const f32,
            w: *const f32,
            ci: usize,
            taps: &[(usize, usize)],
            step: usize,
            cop: usize,
            out: &mut [f32],
        ) {
            let mut acc: [[$vec; NV]; R] = [[$zero; NV]; R];
            for &(xo, wo) in taps {
                let xt = x.add(xo);
                let wt = w.add(wo);
                for c in 0..ci {
                    let mut b: [$vec; NV] = [$zero; NV];
                    for v in 0..NV {
                        b[v] = $load(wt.add(c * cop + v * $lanes));
                    }
                    for r in 0..R {
                        let a = $splat(*xt.add(r * step + c));
                        for v in 0..NV {
                            acc[r][v] = $fma(a, b[v], acc[r][v]);
                        }
                    }
                }
            }
            for r in 0..R {
                for v in 0..NV {
                    $store(out.as_mut_ptr().add((r * NV + v) * $lanes), acc[r][v]);
                }
            }
        }

        /// acc[r][v] += Σ over `images` padded images and their h×w output positions of
        /// x[stride·position + tap][r] · dy[position][v].
        ///
        /// # Safety
        /// `x` points at input channel r = 0 of the tap's offset in the first padded image
        /// (images `plen` positions apart, positions `cip` floats apart, rows `pw` positions
        /// apart); `dy` at output channel v = 0 of the first channels-last gradient (images
        /// h·w positions apart, positions `cop` floats apart); both readable over every image;
        /// `acc` holds R·NV·lanes.
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn filter_tile<const R: usize, const NV: usize>(
            x: *const f32,
            dy: *const f32,
            images: usize,
            (h, w, stride): (usize, usize, usize),
            (cip, pw, plen): (usize, usize, usize),
            cop: usize,
            acc_out: &mut [f32],
        ) {
            let mut acc: [[$vec; NV]; R] = [[$zero; NV]; R];
            for i in 0..images {
                let xi = x.add(i * plen * cip);
                let di = dy.add(i * h * w * cop);
                for y in 0..h {
                    for xx in 0..w {
                        let xp = xi.add((y * pw + xx) * stride * cip);
                        let dp = di.add((y * w + xx) * cop);
                        let mut b: [$vec; NV] = [$zero; NV];
                        for v in 0..NV {
                            b[v] = $load(dp.add(v * $lanes));
                        }
                        for r in 0..R {
                            let a = $splat(*xp.add(r));
                            for v in 0..NV {
                                acc[r][v] = $fma(a, b[v], acc[r][v]);
                            }
                        }
                    }
                }
            }
            for r in 0..R {
                for v in 0..NV {
                    let p = acc_out.as_mut_ptr().add((r * NV + v) * $lanes);
                    $store(p, acc[r][v]);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    tiles!(
        [#[target_feature(enable = "avx512f")]],
        __m512,
        16,
        _mm512_setzero_ps(),
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    tiles!(
        [#[target_feature(enable = "avx2,fma")]],
        __m256,
        8,
        _mm256_setzero_ps(),
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
}

mod portable {
    pub(super) type V = [f32; 8];
    #[inline(always)]
    pub(super) unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 8 readable floats at `p`.
        unsafe { std::ptr::read_unaligned(p.cast::<V>()) }
    }
    #[inline(always)]
    pub(super) fn splat(a: f32) -> V {
        [a; 8]
    }
    #[inline(always)]
    pub(super) fn fma(a: V, b: V, c: V) -> V {
        std::array::from_fn(|k| a[k] * b[k] + c[k])
    }
    #[inline(always)]
    pub(super) unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: the caller guarantees 8 writable floats at `p`.
        unsafe { std::ptr::write_unaligned(p.cast::<V>(), v) }
    }
    tiles!([], V, 8, [0f32; 8], load, splat, fma, store);
}

/// Runs the forward tile of `isa` with the layout's shape over `taps`, positions `step` apart.
///
/// # Safety
/// As [`avx512::forward_tile`], and `isa` is available on this CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile(
    isa: Isa,
    l: &Layout,
    taps: &[(usize, usize)],
    step: usize,
    x: *const f32,
    w: *const f32,
    ci: usize,
    out: &mut [f32],
) {
    let cop = l.cop;
    // SAFETY: forwarded from the caller; the tile's R and NV are the layout's.
    unsafe {
        match (isa, l.fwd) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (4, _)) => avx512::forward_tile::<4, 4>(x, w, ci, taps, step, cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (2, 7)) => avx512::forward_tile::<7, 2>(x, w, ci, taps, step, cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (2, _)) => avx512::forward_tile::<4, 2>(x, w, ci, taps, step, cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (_, 7)) => avx512::forward_tile::<7, 1>(x, w, ci, taps, step, cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, _) => avx512::forward_tile::<8, 1>(x, w, ci, taps, step, cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => avx2::forward_tile::<4, 2>(x, w, ci, taps, step, cop, out),
            _ => portable::forward_tile::<4, 2>(x, w, ci, taps, step, cop, out),
        }
    }
}

/// Runs the weight-gradient tile of `isa` with the layout's shape.
///
/// # Safety
/// As [`avx512::filter_tile`], and `isa` is available on this CPU.
unsafe fn filter_tile(
    isa: Isa,
    s: &Conv3,
    l: &Layout,
    x: *const f32,
    dy: *const f32,
    images: usize,
    out: &mut [f32],
) {
    let hw = (s.ho(), s.wo(), s.stride);
    let geo = (l.cip, l.pw, l.plen);
    // SAFETY: forwarded from the caller; the tile's R and NV are the layout's.
    unsafe {
        match (isa, l.dw) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (4, _)) => {
                avx512::filter_tile::<4, 4>(x, dy, images, hw, geo, l.cop, out)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, (1, _)) => {
                avx512::filter_tile::<8, 1>(x, dy, images, hw, geo, l.cop, out)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, _) => avx512::filter_tile::<4, 2>(x, dy, images, hw, geo, l.cop, out),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => avx2::filter_tile::<4, 2>(x, dy, images, hw, geo, l.cop, out),
            _ => portable::filter_tile::<4, 2>(x, dy, images, hw, geo, l.cop, out),
        }
    }
}

/// y = conv(x, w) for `n` NCHW images, weights OIHW; every element of y is written. When
/// `moments` is given ([n, co, 3]), each image's per-plane moments go there as soon as it is
/// written (Σx, Σ(x − c) and Σ(x − c)² per plane, c its rounded mean).
///
/// # Panics
/// When `isa` is not available on this CPU or a slice is shorter than its shape.
pub fn forward(
    isa: Isa,
    s: &Conv3,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    moments: Option<&mut [f32]>,
) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (hw, ohw, wo) = (s.h * s.w, s.ho() * s.wo(), s.wo());
    let (in_len, out_len) = (s.ci * hw, s.co * ohw);
    assert!(x.len() >= n * in_len && y.len() >= n * out_len && w.len() >= s.co * s.ci * 9);
    let l = s.layout(isa);
    let wp = pack_weights(s, &l, w);
    let (block, rows) = (l.fwd.0 * l.lanes, l.fwd.1);
    let taps: [(usize, usize); 9] =
        std::array::from_fn(|t| (((t / 3) * l.pw + t % 3) * l.cip, t * s.ci * l.cop));
    for_each_image(
        n,
        (y, out_len),
        (x, in_len),
        moments.map(|m| (m, s.co)),
        || (Scratch::take(l.plen * l.cip), vec![0f32; rows * block]),
        |(pad, tile), yi, xi, mi| {
            pad_image(s, &l, xi, pad);
            for oy in 0..s.ho() {
                for ox in (0..wo).step_by(rows) {
                    // cop is a whole number of blocks, so the last block stays inside it.
                    for co0 in (0..s.co).step_by(block) {
                        // SAFETY: the tile reads positions up to (oy·stride + 2)·pw +
                        // (ox + R − 1)·stride + 2 < plen and channels below ci ≤ cip of the
                        // padded image, and NV vectors from column co0 < cop of the packed
                        // weights' 9·ci rows; `tile` holds R·NV·lanes; `isa` was checked.
                        unsafe {
                            let xp = pad.as_ptr().add((oy * l.pw + ox) * s.stride * l.cip);
                            let wq = wp.as_ptr().add(co0);
                            let step = s.stride * l.cip;
                            forward_tile(isa, &l, &taps, step, xp, wq, s.ci, tile);
                        }
                        for r in 0..rows.min(wo - ox) {
                            for k in 0..block.min(s.co - co0) {
                                yi[(co0 + k) * ohw + oy * wo + ox + r] = tile[r * block + k];
                            }
                        }
                    }
                }
            }
            if let Some(mi) = mi {
                image_moments(ohw, yi, mi);
            }
        },
    );
}

/// dx = dL/dx for `n` NCHW output gradients dy, weights OIHW; every element of dx is written.
///
/// Input positions split into stride × stride phases by their parity; within a phase each
/// position takes the same taps (one of the 3×3 at stride 2 for an even row, two for an odd one),
/// at fixed offsets in dy: a stride-1 correlation of the padded, channels-last dy with those taps
/// of the transposed weights, run by the forward's tiles. Nothing is unfolded and no zero is
/// multiplied.
///
/// # Panics
/// When `isa` is not available on this CPU or a slice is shorter than its shape.
pub fn backward_input(isa: Isa, s: &Conv3, n: usize, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (hw, ohw) = (s.h * s.w, s.ho() * s.wo());
    let (in_len, out_len) = (s.ci * hw, s.co * ohw);
    assert!(dx.len() >= n * in_len && dy.len() >= n * out_len && w.len() >= s.co * s.ci * 9);
    // The transposed problem: co channels in, ci out, over the ho×wo gradient.
    let t = Conv3 {
        ci: s.co,
        co: s.ci,
        h: s.ho(),
        w: s.wo(),
        stride: 1,
    };
    let l = t.layout(isa);
    let mut wp = vec![0f32; 9 * s.co * l.cop];
    for o in 0..s.co {
        for c in 0..s.ci {
            for k in 0..9 {
                wp[(k * s.co + o) * l.cop + c] = w[(o * s.ci + c) * 9 + k];
            }
        }
    }
    // Phase (py, px): input rows iy ≡ py, columns ix ≡ px (mod stride). Tap (ky, kx) reaches
    // it from output row (iy + 1 − ky)/stride when that divides, which is padded row
    // iy/stride + 1 + (py + 1 − ky)/stride: an offset of 0, 1 or 2 rows from the tile's own.
    let st = s.stride as isize;
    let offset = |p: usize, k: usize| -> Option<usize> {
        let d = p as isize + 1 - k as isize;
        (d.rem_euclid(st) == 0).then(|| (1 + d.div_euclid(st)) as usize)
    };
    // (py, px, taps as (x offset, w offset) pairs)
    type Phase = (usize, usize, Vec<(usize, usize)>);
    let phases: Vec<Phase> = (0..s.stride * s.stride)
        .map(|ph| {
            let (py, px) = (ph / s.stride, ph % s.stride);
            let taps = (0..9)
                .filter_map(|k| {
                    let (ry, rx) = (offset(py, k / 3)?, offset(px, k % 3)?);
                    Some(((ry * l.pw + rx) * l.cip, k * s.co * l.cop))
                })
                .collect();
            (py, px, taps)
        })
        .collect();
    let (block, rows) = (l.fwd.0 * l.lanes, l.fwd.1);
    for_each_image(
        n,
        (dx, in_len),
        (dy, out_len),
        None,
        || (Scratch::take(l.plen * l.cip), vec![0f32; rows * block]),
        |(pad, tile), dxi, dyi, _| {
            pad_image(&t, &l, dyi, pad);
            for (py, px, taps) in &phases {
                let (ny, nx) = ((s.h - py).div_ceil(s.stride), (s.w - px).div_ceil(s.stride));
                for a in 0..ny {
                    for b in (0..nx).step_by(rows) {
                        for c0 in (0..s.ci).step_by(block) {
                            // SAFETY: a < ny ≤ ho and b < nx ≤ wo, so the tile reads padded rows
                            // up to a + 2 ≤ ho + 1 and columns up to b + R − 1 + 2, inside plen
                            // (its slack covers the last tile's overrun), channels below
                            // co ≤ cip; weights of tap rows below 9·co, NV vectors from column
                            // c0 < cop; `tile` holds R·NV·lanes; `isa` was checked.
                            unsafe {
                                let xp = pad.as_ptr().add((a * l.pw + b) * l.cip);
                                let wq = wp.as_ptr().add(c0);
                                forward_tile(isa, &l, taps, l.cip, xp, wq, s.co, tile);
                            }
                            for r in 0..rows.min(nx - b) {
                                let at = (a * s.stride + py) * s.w + (b + r) * s.stride + px;
                                for k in 0..block.min(s.ci - c0) {
                                    dxi[(c0 + k) * hw + at] = tile[r * block + k];
                                }
                            }
                        }
                    }
                }
            }
        },
    );
}

/// dw += dL/dw for `n` NCHW images x and output gradients dy, dw OIHW. Partial sums per fixed
/// chunk of images, added in order, so the result does not depend on the thread count.
///
/// # Panics
/// When `isa` is not available on this CPU or a slice is shorter than its shape.
pub fn backward_filter(isa: Isa, s: &Conv3, n: usize, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (hw, ohw) = (s.h * s.w, s.ho() * s.wo());
    let (in_len, out_len) = (s.ci * hw, s.co * ohw);
    assert!(x.len() >= n * in_len && dy.len() >= n * out_len && dw.len() >= s.co * s.ci * 9);
    let l = s.layout(isa);
    let (block, rows) = (l.dw.0 * l.lanes, l.dw.1);
    let per = super::batch_chunk(n);
    let plen = l.plen * l.cip;
    let partial = |first: usize| -> Scratch {
        let images = per.min(n - first);
        // Every padded image is filled in full; the gradients' channels past co stay zero.
        let mut pads = Scratch::take(images * plen);
        let mut dyt = Scratch::zeroed(images * ohw * l.cop);
        for i in 0..images {
            let img = first + i;
            pad_image(
                s,
                &l,
                &x[img * in_len..][..in_len],
                &mut pads[i * plen..][..plen],
            );
            let (src, dst) = (&dy[img * out_len..][..out_len], &mut dyt[i * ohw * l.cop..]);
            for o in 0..s.co {
                for (p, &v) in src[o * ohw..][..ohw].iter().enumerate() {
                    dst[p * l.cop + o] = v;
                }
            }
        }
        // Every row of every tap is copied from a tile below.
        let mut part = Scratch::take(9 * l.cip * l.cop);
        let mut tile = vec![0f32; rows * block];
        for t in 0..9 {
            for c0 in (0..l.cip).step_by(rows) {
                for co0 in (0..l.cop).step_by(block) {
                    // SAFETY: for every image the tile reads positions (y·stride + ky)·pw +
                    // x·stride + kx < plen at channels c0 + r < cip of the padded images, and NV vectors at
                    // column co0 < cop of every position of the channels-last gradients;
                    // `tile` holds R·NV·lanes; `isa` was checked above.
                    unsafe {
                        let xp = pads.as_ptr().add(((t / 3) * l.pw + t % 3) * l.cip + c0);
                        filter_tile(isa, s, &l, xp, dyt.as_ptr().add(co0), images, &mut tile);
                    }
                    for r in 0..rows {
                        let row = &mut part[(t * l.cip + c0 + r) * l.cop + co0..][..block];
                        row.copy_from_slice(&tile[r * block..][..block]);
                    }
                }
            }
        }
        part
    };
    let partials: Vec<Scratch> = (0..n)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(partial)
        .collect();
    let mut sum = vec![0f32; 9 * l.cip * l.cop];
    for p in &partials {
        sum.iter_mut().zip(p.iter()).for_each(|(a, b)| *a += b);
    }
    for o in 0..s.co {
        for c in 0..s.ci {
            for t in 0..9 {
                dw[(o * s.ci + c) * 9 + t] += sum[(t * l.cip + c) * l.cop + o];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::moments::{channel_squares, channel_sums, PER_PLANE};
    use crate::rng::Rng;

    fn randn(rng: &mut Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    /// Float64 reference: y[n][o][y][x] and dw[o][c][ky][kx].
    /// y, dw and dx in float64, straight from the definition.
    fn reference(
        s: &Conv3,
        n: usize,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (h, wd) = (s.h as isize, s.w as isize);
        let (ho, wo) = (s.ho(), s.wo());
        let mut y = vec![0f64; n * s.co * ho * wo];
        let mut dw = vec![0f64; s.co * s.ci * 9];
        let mut dx = vec![0f64; x.len()];
        for i in 0..n {
            for o in 0..s.co {
                for oy in 0..ho as isize {
                    for ox in 0..wo as isize {
                        let yi = ((i * s.co + o) * ho + oy as usize) * wo + ox as usize;
                        let st = s.stride as isize;
                        for c in 0..s.ci {
                            for t in 0..9 {
                                let iy = oy * st + t as isize / 3 - 1;
                                let ix = ox * st + t as isize % 3 - 1;
                                if iy < 0 || iy >= h || ix < 0 || ix >= wd {
                                    continue;
                                }
                                let xi = ((i * s.ci + c) * s.h + iy as usize) * s.w + ix as usize;
                                let xv = f64::from(x[xi]);
                                let wi = (o * s.ci + c) * 9 + t;
                                y[yi] += xv * f64::from(w[wi]);
                                dw[wi] += xv * f64::from(dy[yi]);
                                dx[xi] += f64::from(w[wi]) * f64::from(dy[yi]);
                            }
                        }
                    }
                }
            }
        }
        (y, dw, dx)
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (f64::from(g) - w).abs() / scale)
            .fold(0f64, |m, e| {
                if e.is_nan() || m.is_nan() {
                    f64::NAN
                } else {
                    m.max(e)
                }
            })
    }

    /// Every instruction set this CPU has, on odd shapes (channel counts that are no multiple of
    /// a tile, widths that are no multiple of R, more images than chunks, 1×1 images), against
    /// the float64 reference; outputs poisoned with NaN, dw accumulated onto random values.
    #[test]
    fn tiles_match_a_float64_reference_on_every_instruction_set() {
        // Between them every tile of every instruction set runs (forward rows of 4, 7 and 8;
        // 1, 2 and 4 vectors), at strides 1 and 2 (odd and even sides).
        let shapes = [
            (
                3,
                Conv3 {
                    ci: 5,
                    co: 7,
                    h: 5,
                    w: 6,
                    stride: 1,
                },
            ),
            (
                2,
                Conv3 {
                    ci: 9,
                    co: 13,
                    h: 3,
                    w: 14,
                    stride: 1,
                },
            ),
            (
                2,
                Conv3 {
                    ci: 36,
                    co: 40,
                    h: 7,
                    w: 7,
                    stride: 1,
                },
            ),
            (
                2,
                Conv3 {
                    ci: 20,
                    co: 70,
                    h: 2,
                    w: 5,
                    stride: 1,
                },
            ),
            (
                17,
                Conv3 {
                    ci: 3,
                    co: 17,
                    h: 1,
                    w: 1,
                    stride: 1,
                },
            ),
            (
                2,
                Conv3 {
                    ci: 32,
                    co: 32,
                    h: 4,
                    w: 9,
                    stride: 1,
                },
            ),
            (
                3,
                Conv3 {
                    ci: 6,
                    co: 19,
                    h: 7,
                    w: 9,
                    stride: 2,
                },
            ),
            (
                2,
                Conv3 {
                    ci: 33,
                    co: 66,
                    h: 14,
                    w: 13,
                    stride: 2,
                },
            ),
            (
                18,
                Conv3 {
                    ci: 16,
                    co: 32,
                    h: 2,
                    w: 1,
                    stride: 2,
                },
            ),
        ];
        let mut rng = Rng::new(3);
        let mut ran = 0;
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if !isa.available() {
                continue;
            }
            for (n, s) in shapes {
                let x = randn(&mut rng, n * s.ci * s.h * s.w);
                let w = randn(&mut rng, s.co * s.ci * 9);
                let dy = randn(&mut rng, n * s.co * s.ho() * s.wo());
                let (y_ref, dw_ref, dx_ref) = reference(&s, n, &x, &w, &dy);
                let mut y = vec![f32::NAN; y_ref.len()];
                let mut mo = vec![f32::NAN; n * s.co * PER_PLANE];
                forward(isa, &s, n, &x, &w, &mut y, Some(&mut mo));
                let e = max_rel(&y, &y_ref);
                assert!(e <= 1e-5, "{isa:?} {s:?}: forward error {e:.2e}");
                // The moments gathered on the way give the batch statistics of the output.
                let (ohw, m) = (s.ho() * s.wo(), (n * s.ho() * s.wo()) as f64);
                let mean: Vec<f32> = channel_sums(s.co, &mo)
                    .iter()
                    .map(|v| (v / m) as f32)
                    .collect();
                let var: Vec<f64> = channel_squares(s.co, ohw, &mo, &mean)
                    .iter()
                    .map(|q| q / m)
                    .collect();
                for ch in 0..s.co {
                    let vals = (0..n).flat_map(|i| &y_ref[(i * s.co + ch) * ohw..][..ohw]);
                    let mu = vals.clone().sum::<f64>() / m;
                    let va = vals.map(|v| (v - mu).powi(2)).sum::<f64>() / m;
                    let scale = va.sqrt();
                    let em = (f64::from(mean[ch]) - mu).abs() / scale;
                    let ev = (var[ch] - va).abs() / va;
                    assert!(em <= 1e-5 && ev <= 1e-5, "{isa:?} {s:?}: moments of {ch}");
                }
                let dw0 = randn(&mut rng, dw_ref.len());
                let mut dw = dw0.clone();
                backward_filter(isa, &s, n, &x, &dy, &mut dw);
                let delta: Vec<f32> = dw.iter().zip(&dw0).map(|(a, b)| a - b).collect();
                let e = max_rel(&delta, &dw_ref);
                assert!(e <= 1e-5, "{isa:?} {s:?}: weight gradient error {e:.2e}");
                let mut dx = vec![f32::NAN; x.len()];
                backward_input(isa, &s, n, &w, &dy, &mut dx);
                let e = max_rel(&dx, &dx_ref);
                assert!(e <= 1e-5, "{isa:?} {s:?}: input gradient error {e:.2e}");
                ran += 1;
            }
        }
        assert!(ran >= shapes.len(), "the portable tiles always run");
    }
}
