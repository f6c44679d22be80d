//! The paper's two asymmetric views: random resized crop (bicubic), horizontal flip, colour jitter
//! (p 0.8), grayscale (p 0.2), Gaussian blur (p 1.0 / 0.1), solarization (p 0.0 / 0.2), then
//! per-channel normalization. The crop is resized straight from the u8 image (nothing outside it is
//! converted), then processed as f32 HWC in [0, 1]; each sample draws from
//! its own generator seeded by (seed, epoch, index, view), so batches are the same whatever the
//! thread count.

use super::data::{Dataset, Image};
use crate::nn::Tensor;
use crate::rng::Rng;
use rayon::prelude::*;

/// What every view shares ([`AugmentConfig::for_dataset`] makes one; setters change a field).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct AugmentConfig {
    /// Output side length.
    pub size: usize,
    /// Range of the crop's area as a fraction of the image (0.08–1 for ImageNet, 0.2–1 small).
    pub scale: (f32, f32),
    /// Gaussian blur kernel size (odd; about a tenth of `size`).
    pub blur_kernel: usize,
    /// Per-channel normalization.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (pixels in [0, 1]) that centred pixels are divided by.
    pub std: Vec<f32>,
}

setters!(AugmentConfig {
    size: usize,
    scale: (f32, f32),
    blur_kernel: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
});

impl AugmentConfig {
    /// Crops of `size` pixels covering `scale` of the image's area, a blur of `blur_kernel`
    /// pixels, and normalization by the per-channel `mean` and `std`.
    pub fn new(
        size: usize,
        scale: (f32, f32),
        blur_kernel: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
    ) -> Self {
        Self {
            size,
            scale,
            blur_kernel,
            mean,
            std,
        }
    }

    /// The recipe for a dataset: crop to the image size, scale 0.08–1 for large images and
    /// 0.2–1 for small ones, blur kernel a tenth of the side, the dataset's pixel statistics.
    pub fn for_dataset(ds: &Dataset, size: Option<usize>) -> Self {
        // The most common shorter side (ties: the smaller) over up to 1,000 images spread
        // across the set, so one odd file cannot set the crop for all.
        let side = if ds.is_empty() {
            32
        } else {
            let step = ds.len().div_ceil(1000).max(1);
            let mut counts = std::collections::BTreeMap::<usize, usize>::new();
            for i in (0..ds.len()).step_by(step) {
                let (h, w) = ds.dims(i);
                *counts.entry(h.min(w)).or_default() += 1;
            }
            counts
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map_or(32, |(&side, _)| side)
        };
        let size = size.unwrap_or(if side > 64 { 224 } else { side });
        let scale = if size >= 96 { (0.08, 1.0) } else { (0.2, 1.0) };
        let blur_kernel = ((size as f32 * 0.1) as usize).max(3) | 1;
        let (mean, std) = ds.pixel_stats();
        Self {
            size,
            scale,
            blur_kernel,
            mean,
            std,
        }
    }
}

/// Probabilities that differ between the two views.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewKind {
    /// Probability of the Gaussian blur.
    pub blur_p: f32,
    /// Probability of solarization.
    pub solarize_p: f32,
}

/// The first view: always blurred, never solarized.
pub const VIEW_A: ViewKind = ViewKind {
    blur_p: 1.0,
    solarize_p: 0.0,
};
/// The second view: rarely blurred, sometimes solarized.
pub const VIEW_B: ViewKind = ViewKind {
    blur_p: 0.1,
    solarize_p: 0.2,
};

/// A crop rectangle: top, left, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    /// First row, in pixels of the source image.
    pub top: usize,
    /// First column, in pixels of the source image.
    pub left: usize,
    /// Height, in pixels of the source image.
    pub h: usize,
    /// Width, in pixels of the source image.
    pub w: usize,
}

fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

/// torchvision's RandomResizedCrop parameters: up to ten tries at an area in `scale` and an
/// aspect ratio in [3/4, 4/3] (log-uniform), else the largest centred crop within the ratios.
pub fn crop_params(rng: &mut Rng, h: usize, w: usize, scale: (f32, f32)) -> Crop {
    let area = (h * w) as f64;
    let (r0, r1) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    for _ in 0..10 {
        let target = area * uniform(rng, f64::from(scale.0), f64::from(scale.1));
        let aspect = uniform(rng, r0.ln(), r1.ln()).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let top = (rng.next_u64() % (h - ch + 1) as u64) as usize;
            let left = (rng.next_u64() % (w - cw + 1) as u64) as usize;
            return Crop {
                top,
                left,
                h: ch,
                w: cw,
            };
        }
    }
    let ratio = w as f64 / h as f64;
    let (ch, cw) = if ratio < r0 {
        ((w as f64 / r0).round() as usize, w)
    } else if ratio > r1 {
        (h, (h as f64 * r1).round() as usize)
    } else {
        (h, w)
    };
    Crop {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        h: ch,
        w: cw,
    }
}

fn cubic(x: f32) -> f32 {
    // Keys' kernel with a = −0.5, as PIL's bicubic filter.
    let a = -0.5f32;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// For each output coordinate, the first input index and the normalized weights (PIL's scheme:
/// the kernel widens by the scale factor when shrinking, which antialiases).
fn weights(in_len: usize, out_len: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = in_len as f32 / out_len as f32;
    let support_scale = scale.max(1.0);
    let support = 2.0 * support_scale;
    (0..out_len)
        .map(|o| {
            let center = (o as f32 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(in_len);
            let mut ws: Vec<f32> = (lo..hi)
                .map(|j| cubic((j as f32 + 0.5 - center) / support_scale))
                .collect();
            let s: f32 = ws.iter().sum();
            if s != 0.0 {
                ws.iter_mut().for_each(|w| *w /= s);
            }
            (lo, ws)
        })
        .collect()
}

/// A source pixel of [`resize_crop`]: f32 in [0, 1], or u8 read as v/255 (so only the crop's
/// pixels are ever converted, and an image is never copied to f32 whole).
pub trait Pixel: Copy {
    /// The value in [0, 1].
    fn value(self) -> f32;
}

impl Pixel for f32 {
    #[inline]
    fn value(self) -> f32 {
        self
    }
}

/// v/255 for every byte, the same values a division gives.
const UNIT: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32 / 255.0;
        i += 1;
    }
    t
};

impl Pixel for u8 {
    #[inline]
    fn value(self) -> f32 {
        UNIT[usize::from(self)]
    }
}

/// Bicubic resize of the `crop` of an HWC image to size × size (values clamped to [0, 1]).
pub fn resize_crop<P: Pixel>(src: &[P], w: usize, c: usize, crop: Crop, size: usize) -> Vec<f32> {
    let wx = weights(crop.w, size);
    let wy = weights(crop.h, size);
    // Horizontal pass over the crop's rows, then vertical.
    let mut tmp = vec![0f32; crop.h * size * c];
    for y in 0..crop.h {
        let row = &src[((crop.top + y) * w + crop.left) * c..];
        for (ox, (lo, ws)) in wx.iter().enumerate() {
            for ch in 0..c {
                let mut acc = 0f32;
                for (k, wt) in ws.iter().enumerate() {
                    acc += wt * row[(lo + k) * c + ch].value();
                }
                tmp[(y * size + ox) * c + ch] = acc;
            }
        }
    }
    let mut out = vec![0f32; size * size * c];
    for (oy, (lo, ws)) in wy.iter().enumerate() {
        for x in 0..size * c {
            let mut acc = 0f32;
            for (k, wt) in ws.iter().enumerate() {
                acc += wt * tmp[(lo + k) * size * c + x];
            }
            out[oy * size * c + x] = acc.clamp(0.0, 1.0);
        }
    }
    out
}

/// Mirrors an HWC image left to right.
pub fn hflip(img: &mut [f32], w: usize, c: usize) {
    for row in img.chunks_exact_mut(w * c) {
        for x in 0..w / 2 {
            for ch in 0..c {
                row.swap(x * c + ch, (w - 1 - x) * c + ch);
            }
        }
    }
}

fn luma(p: &[f32]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

fn to_gray(img: &mut [f32], c: usize) {
    if c == 3 {
        for p in img.chunks_exact_mut(3) {
            let l = luma(p);
            p.iter_mut().for_each(|v| *v = l);
        }
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        ((g - b) / d).rem_euclid(6.0) / 6.0
    } else if max == g {
        ((b - r) / d + 2.0) / 6.0
    } else {
        ((r - g) / d + 4.0) / 6.0
    };
    let s = if max == 0.0 { 0.0 } else { d / max };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1): brightness, contrast, saturation and hue, each
/// with a random factor, in a random order. Saturation and hue do nothing to grayscale images.
pub fn color_jitter(img: &mut [f32], c: usize, rng: &mut Rng) {
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let b = uniform(rng, 0.6, 1.4) as f32;
    let ct = uniform(rng, 0.6, 1.4) as f32;
    let s = uniform(rng, 0.8, 1.2) as f32;
    let hue = uniform(rng, -0.1, 0.1) as f32;
    for op in order {
        match op {
            0 => img.iter_mut().for_each(|v| *v = (*v * b).clamp(0.0, 1.0)),
            1 => {
                let mean = if c == 3 {
                    img.chunks_exact(3).map(luma).sum::<f32>() / (img.len() / 3) as f32
                } else {
                    img.iter().sum::<f32>() / img.len() as f32
                };
                img.iter_mut()
                    .for_each(|v| *v = (ct * *v + (1.0 - ct) * mean).clamp(0.0, 1.0));
            }
            2 if c == 3 => {
                for p in img.chunks_exact_mut(3) {
                    let l = luma(p);
                    p.iter_mut()
                        .for_each(|v| *v = (s * *v + (1.0 - s) * l).clamp(0.0, 1.0));
                }
            }
            3 if c == 3 => {
                for p in img.chunks_exact_mut(3) {
                    let (h, sa, v) = rgb_to_hsv(p[0], p[1], p[2]);
                    let (r, g, bb) = hsv_to_rgb(h + hue, sa, v);
                    p[0] = r;
                    p[1] = g;
                    p[2] = bb;
                }
            }
            _ => {}
        }
    }
}

/// Separable Gaussian blur with reflected borders.
pub fn gaussian_blur(img: &mut [f32], h: usize, w: usize, c: usize, sigma: f32, ksize: usize) {
    let r = (ksize / 2) as isize;
    let mut k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let mut i = i;
        while i < 0 || i >= n {
            i = if i < 0 { -i } else { 2 * (n - 1) - i };
        }
        i as usize
    };
    let mut tmp = vec![0f32; img.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let mut a = 0f32;
                for (t, kv) in k.iter().enumerate() {
                    let xx = reflect(x as isize + t as isize - r, w);
                    a += kv * img[(y * w + xx) * c + ch];
                }
                tmp[(y * w + x) * c + ch] = a;
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let mut a = 0f32;
                for (t, kv) in k.iter().enumerate() {
                    let yy = reflect(y as isize + t as isize - r, h);
                    a += kv * tmp[(yy * w + x) * c + ch];
                }
                img[(y * w + x) * c + ch] = a;
            }
        }
    }
}

/// PIL's solarize at 128: values at or above half are inverted.
pub fn solarize(img: &mut [f32]) {
    img.iter_mut().for_each(|v| {
        if *v >= 128.0 / 255.0 {
            *v = 1.0 - *v;
        }
    });
}

/// HWC [0, 1] → normalized CHW, written into `out`.
fn normalize_into(img: &[f32], size: usize, c: usize, cfg: &AugmentConfig, out: &mut [f32]) {
    for ch in 0..c {
        let (m, s) = (cfg.mean[ch], cfg.std[ch]);
        for p in 0..size * size {
            out[ch * size * size + p] = (img[p * c + ch] - m) / s;
        }
    }
}

/// One augmented view of `img`, as normalized CHW.
pub fn view(img: &Image, cfg: &AugmentConfig, kind: ViewKind, rng: &mut Rng, out: &mut [f32]) {
    let c = img.c;
    let crop = crop_params(rng, img.h, img.w, cfg.scale);
    let mut x = resize_crop(&img.data, img.w, c, crop, cfg.size);
    if rng.uniform() < 0.5 {
        hflip(&mut x, cfg.size, c);
    }
    if rng.uniform() < 0.8 {
        color_jitter(&mut x, c, rng);
    }
    if rng.uniform() < 0.2 {
        to_gray(&mut x, c);
    }
    if rng.uniform() < f64::from(kind.blur_p) {
        let sigma = uniform(rng, 0.1, 2.0) as f32;
        gaussian_blur(&mut x, cfg.size, cfg.size, c, sigma, cfg.blur_kernel);
    }
    if rng.uniform() < f64::from(kind.solarize_p) {
        solarize(&mut x);
    }
    normalize_into(&x, cfg.size, c, cfg, out);
}

/// The evaluation view: the whole image resized to size × size, normalized, no randomness.
pub fn eval_view(img: &Image, cfg: &AugmentConfig, out: &mut [f32]) {
    let crop = Crop {
        top: 0,
        left: 0,
        h: img.h,
        w: img.w,
    };
    let x = resize_crop(&img.data, img.w, img.c, crop, cfg.size);
    normalize_into(&x, cfg.size, img.c, cfg, out);
}

/// Mixes the seeds of one sample's generator.
pub fn sample_seed(seed: u64, epoch: u64, index: u64, view: u64) -> u64 {
    let mut r = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let a = r.next_u64() ^ index.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    Rng::new(a ^ view.wrapping_mul(0x94D0_49BB_1331_11EB)).next_u64()
}

/// Two augmented views of the images at `indices`, as [B, C, S, S] tensors, built in parallel.
pub fn two_views(
    ds: &Dataset,
    indices: &[usize],
    cfg: &AugmentConfig,
    seed: u64,
    epoch: u64,
) -> (Tensor, Tensor) {
    let c = ds.channels();
    let item = c * cfg.size * cfg.size;
    let shape = [indices.len(), c, cfg.size, cfg.size];
    let mut a = Tensor::zeros(&shape);
    let mut b = Tensor::zeros(&shape);
    a.data
        .par_chunks_mut(item)
        .zip(b.data.par_chunks_mut(item))
        .zip(indices.par_iter())
        .for_each(|((oa, ob), &i)| {
            let img = ds.image(i);
            let mut ra = Rng::new(sample_seed(seed, epoch, i as u64, 0));
            let mut rb = Rng::new(sample_seed(seed, epoch, i as u64, 1));
            view(&img, cfg, VIEW_A, &mut ra, oa);
            view(&img, cfg, VIEW_B, &mut rb, ob);
        });
    (a, b)
}

/// Evaluation views of the images at `indices`.
pub fn eval_batch(ds: &Dataset, indices: &[usize], cfg: &AugmentConfig) -> Tensor {
    let c = ds.channels();
    let item = c * cfg.size * cfg.size;
    let mut t = Tensor::zeros(&[indices.len(), c, cfg.size, cfg.size]);
    t.data
        .par_chunks_mut(item)
        .zip(indices.par_iter())
        .for_each(|(o, &i)| eval_view(&ds.image(i), cfg, o));
    t
}
