//! Memory layouts between the host model (PyTorch's NCHW, OIHW) and the device (NHWC, OHWI).

use crate::cuda::Act;
use rayon::prelude::*;

/// OIHW (the CPU layout, PyTorch's) → OHWI (cuDNN's NHWC filter layout).
pub fn oihw_to_ohwi(v: &[f32], s: &[usize]) -> Vec<f32> {
    permute_filter(v, s, true)
}

/// OHWI → OIHW, the inverse of [`oihw_to_ohwi`].
pub fn ohwi_to_oihw(v: &[f32], s: &[usize]) -> Vec<f32> {
    permute_filter(v, s, false)
}

/// Moves the input-channel axis of a filter of shape `s` (O, I, H, W) last, or back.
fn permute_filter(v: &[f32], s: &[usize], to_last: bool) -> Vec<f32> {
    let (o, i, h, w) = (s[0], s[1], s[2], s[3]);
    let mut out = vec![0f32; v.len()];
    for a in 0..o {
        for b in 0..i {
            for y in 0..h {
                for x in 0..w {
                    let oihw = ((a * i + b) * h + y) * w + x;
                    let ohwi = ((a * h + y) * w + x) * i + b;
                    if to_last {
                        out[ohwi] = v[oihw];
                    } else {
                        out[oihw] = v[ohwi];
                    }
                }
            }
        }
    }
    out
}

/// NCHW f32 images → NHWC `A`, in parallel over images.
pub fn nchw_to_nhwc<A: Act>(x: &[f32], (n, c, h, w): (usize, usize, usize, usize), out: &mut [A]) {
    let item = c * h * w;
    out[..n * item]
        .par_chunks_mut(item)
        .zip(x[..n * item].par_chunks(item))
        .for_each(|(o, i)| {
            for p in 0..h * w {
                for ch in 0..c {
                    o[p * c + ch] = A::from_f32(i[ch * h * w + p]);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_layouts_round_trip() {
        let shape = [3, 2, 3, 3];
        let v: Vec<f32> = (0..54).map(|i| i as f32).collect();
        let t = oihw_to_ohwi(&v, &shape);
        // Output channel 1, input channel 1, position (2, 0): OIHW index ((1·2+1)·3+2)·3+0.
        assert_eq!(t[((3 + 2) * 3) * 2 + 1], v[((2 + 1) * 3 + 2) * 3]);
        assert_eq!(ohwi_to_oihw(&t, &shape), v);
    }

    #[test]
    fn images_go_channel_last() {
        // Two images of 2 channels × 1×3 pixels.
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut out = vec![0f32; 12];
        nchw_to_nhwc(&x, (2, 2, 1, 3), &mut out);
        assert_eq!(out, vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
    }
}
