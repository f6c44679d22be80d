//! Layers: convolution, batch norm (2-D and 1-D), linear, ReLU, max-pool.
//!
//! A training forward pushes what the backward pass needs onto the layer's stack and the backward
//! pass pops it, so a layer can run forward on both views before either runs backward (each view
//! is its own batch, with its own BatchNorm statistics, as in the reference training code).

use super::{Backend, Buffer, ConvSpec, Param, Tensor};
use crate::cpu::moments::PER_PLANE;
use crate::cpu::pool::Scratch;
use crate::rng::Rng;
use rayon::prelude::*;
use std::sync::Arc;

/// 2-D convolution without bias (as every ResNet convolution), square kernel.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Kernel, shape [out_c, in_c, k, k].
    pub weight: Param,
    /// Step between output positions, in input pixels.
    pub stride: usize,
    /// Zero padding on each side, in pixels.
    pub pad: usize,
    cache: Vec<(Arc<Tensor>, ConvSpec)>,
}

impl Conv2d {
    /// Kaiming-normal init with fan-out, as torchvision's ResNet.
    pub fn new(
        name: &str,
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        pad: usize,
        rng: &mut Rng,
    ) -> Self {
        let std = (2.0 / (out_c * k * k) as f64).sqrt();
        let w = (0..out_c * in_c * k * k)
            .map(|_| (std * rng.normal()) as f32)
            .collect();
        Self {
            weight: Param::new(format!("{name}.weight"), &[out_c, in_c, k, k], w),
            stride,
            pad,
            cache: Vec::new(),
        }
    }

    fn spec(&self, x: &Tensor) -> ConvSpec {
        let s = &self.weight.shape;
        assert_eq!(
            x.shape[1], s[1],
            "{}: input has {} channels, expected {}",
            self.weight.name, x.shape[1], s[1]
        );
        ConvSpec {
            in_c: s[1],
            out_c: s[0],
            k: s[2],
            stride: self.stride,
            pad: self.pad,
            h: x.shape[2],
            w: x.shape[3],
        }
    }

    /// [N, in_c, H, W] → [N, out_c, Ho, Wo]; a training forward keeps a copy of the input for
    /// the backward ([`Conv2d::forward_shared`] keeps a reference instead).
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        self.forward_shared(be, &Arc::new(x.clone()), train, None)
    }

    /// [`Conv2d::forward`] on a shared input, which a training forward keeps without copying;
    /// with `moments`, also the output's per-plane moments for the batch norm that follows.
    pub fn forward_shared(
        &mut self,
        be: &dyn Backend,
        x: &Arc<Tensor>,
        train: bool,
        moments: Option<&mut PlaneMoments>,
    ) -> Tensor {
        let spec = self.spec(x);
        let n = x.batch();
        let mut y = Tensor::for_overwrite(&[n, spec.out_c, spec.ho(), spec.wo()]);
        let mo = moments.map(|m| {
            m.images = n;
            m.channels = spec.out_c;
            m.data = Scratch::take(n * spec.out_c * PER_PLANE);
            &mut *m.data
        });
        be.conv2d_forward(&spec, n, &x.data, &self.weight.value, &mut y.data, mo);
        if train {
            self.cache.push((Arc::clone(x), spec));
        }
        y
    }

    /// Accumulates dL/dw; returns dL/dx when `need_dx`.
    pub fn backward(&mut self, be: &dyn Backend, dy: &Tensor, need_dx: bool) -> Option<Tensor> {
        let (x, spec) = self
            .cache
            .pop()
            .expect("Conv2d::backward without a training forward");
        let n = x.batch();
        let mut dx = need_dx.then(|| Tensor::for_overwrite(&x.shape));
        be.conv2d_backward(
            &spec,
            n,
            &x.data,
            &self.weight.value,
            &dy.data,
            dx.as_mut().map(|t| t.data.as_mut_slice()),
            &mut self.weight.grad,
        );
        dx
    }
}

/// The per-plane moments of a convolution's output (for each image and channel, three sums),
/// gathered while the convolution writes it so that the batch norm reading it skips its own pass
/// for the statistics.
#[derive(Debug, Clone, Default)]
pub struct PlaneMoments {
    images: usize,
    channels: usize,
    data: Scratch,
}

/// Batch normalization over [N, C, H, W] (or [N, C]): batch statistics in training, running
/// statistics in evaluation; running variance unbiased, momentum 0.1, as PyTorch.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Per-channel scale γ.
    pub weight: Param,
    /// Per-channel shift β.
    pub bias: Param,
    /// Per-channel mean used in evaluation.
    pub running_mean: Buffer,
    /// Per-channel (unbiased) variance used in evaluation.
    pub running_var: Buffer,
    /// Training forwards so far, kept as PyTorch keeps it.
    pub num_batches_tracked: Buffer,
    /// Added to the variance before the square root (1e-5).
    pub eps: f32,
    /// Weight of each new batch in the running statistics (0.1).
    pub momentum: f32,
    cache: Vec<NormCache>,
}

/// What a training forward of [`BatchNorm`] keeps for its backward.
#[derive(Debug, Clone)]
struct NormCache {
    /// The norm's input.
    x: Arc<Tensor>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    /// The output, when a ReLU was fused (its mask).
    out: Option<Arc<Tensor>>,
}

impl BatchNorm {
    /// γ = 1 (or 0 for the zero-initialized last norm of a residual branch), β = 0.
    pub fn new(name: &str, c: usize, gamma: f32) -> Self {
        let buf = |suffix: &str, v: f32, shape: &[usize]| Buffer {
            name: format!("{name}.{suffix}"),
            shape: shape.to_vec(),
            value: vec![v; shape.iter().product()],
        };
        Self {
            weight: Param::new(format!("{name}.weight"), &[c], vec![gamma; c]),
            bias: Param::new(format!("{name}.bias"), &[c], vec![0.0; c]),
            running_mean: buf("running_mean", 0.0, &[c]),
            running_var: buf("running_var", 1.0, &[c]),
            num_batches_tracked: buf("num_batches_tracked", 0.0, &[]),
            eps: 1e-5,
            momentum: 0.1,
            cache: Vec::new(),
        }
    }

    fn dims(x: &Tensor) -> (usize, usize, usize) {
        (x.shape[0], x.shape[1], x.shape[2..].iter().product())
    }

    /// Normalizes with the batch's statistics when `train` (updating the running ones and caching
    /// for the backward), else with the running statistics.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let y = self.forward_shared(be, &Arc::new(x.clone()), None, None, false, train);
        Arc::try_unwrap(y).unwrap_or_else(|y| (*y).clone())
    }

    /// Batch norm followed by ReLU, in one pass.
    pub fn forward_relu(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let y = self.forward_shared(be, &Arc::new(x.clone()), None, None, true, train);
        // The cache holds the output too (the ReLU's mask), so this copies.
        Arc::try_unwrap(y).unwrap_or_else(|y| (*y).clone())
    }

    /// The norm, plus `residual` when given, then ReLU when `relu`, in one pass over a shared
    /// input. A training forward keeps the input (x̂ is recomputed from it in the backward) and,
    /// with a ReLU, the output for the mask, both without copying; it takes its statistics from
    /// `moments` when the convolution that wrote x gathered them.
    ///
    /// # Panics
    /// When x, `residual` or `moments` do not match the layer or each other.
    pub fn forward_shared(
        &mut self,
        be: &dyn Backend,
        x: &Arc<Tensor>,
        moments: Option<&PlaneMoments>,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Arc<Tensor> {
        let (n, c, hw) = Self::dims(x);
        assert_eq!(
            c,
            self.weight.value.len(),
            "{}: channel mismatch",
            self.weight.name
        );
        if let Some(r) = residual {
            assert_eq!(r.shape, x.shape, "{}: shortcut shape", self.weight.name);
        }
        let mut y = Tensor::for_overwrite(&x.shape);
        let affine = (self.weight.value.as_slice(), self.bias.value.as_slice());
        let res = residual.map(|r| r.data.as_slice());
        if !train {
            let rstd: Vec<f32> = self
                .running_var
                .value
                .iter()
                .map(|v| 1.0 / (v + self.eps).sqrt())
                .collect();
            let stats = (self.running_mean.value.as_slice(), rstd.as_slice());
            be.norm_apply(n, c, hw, &x.data, stats, affine, res, relu, &mut y.data);
            return Arc::new(y);
        }
        let mo = moments.map(|m| {
            assert_eq!(
                (m.images, m.channels),
                (n, c),
                "{}: moments of another tensor",
                self.weight.name
            );
            &*m.data
        });
        let (mut mean, mut var) = (vec![0f32; c], vec![0f32; c]);
        be.channel_stats(n, c, hw, &x.data, mo, &mut mean, &mut var);
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        be.norm_apply(
            n,
            c,
            hw,
            &x.data,
            (&mean, &rstd),
            affine,
            res,
            relu,
            &mut y.data,
        );
        let m = (n * hw * be.stat_batches()) as f32;
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        let mo = self.momentum;
        for ch in 0..c {
            let rm = &mut self.running_mean.value[ch];
            *rm = (1.0 - mo) * *rm + mo * mean[ch];
            let rv = &mut self.running_var.value[ch];
            *rv = (1.0 - mo) * *rv + mo * var[ch] * unbias;
        }
        self.num_batches_tracked.value[0] += 1.0;
        let y = Arc::new(y);
        self.cache.push(NormCache {
            x: Arc::clone(x),
            mean,
            rstd,
            out: relu.then(|| Arc::clone(&y)),
        });
        y
    }

    /// Backward of [`BatchNorm::forward_relu`].
    pub fn backward_relu(&mut self, be: &dyn Backend, dy: &Tensor) -> Tensor {
        self.backward_owned(be, dy.clone()).0
    }

    /// Accumulates dL/dγ and dL/dβ; returns dL/dx.
    pub fn backward(&mut self, be: &dyn Backend, dy: &Tensor) -> Tensor {
        self.backward_owned(be, dy.clone()).0
    }

    /// Backward of the last training forward, taking dy by value: accumulates dL/dγ and dL/dβ
    /// and returns dL/dx and dy as it reached the norm (zeroed where a fused ReLU clamped: the
    /// gradient a residual's shortcut receives).
    pub fn backward_owned(&mut self, be: &dyn Backend, mut dy: Tensor) -> (Tensor, Tensor) {
        let cache = self
            .cache
            .pop()
            .expect("BatchNorm::backward without a training forward");
        let (n, c, hw) = Self::dims(&dy);
        let mut dx = Tensor::for_overwrite(&dy.shape);
        be.batch_norm_backward(
            n,
            c,
            hw,
            &cache.x.data,
            (&cache.mean, &cache.rstd),
            &self.weight.value,
            cache.out.as_ref().map(|o| o.data.as_slice()),
            &mut dy.data,
            &mut dx.data,
            &mut self.weight.grad,
            &mut self.bias.grad,
        );
        (dx, dy)
    }

    pub(crate) fn visit(&mut self, p: &mut dyn FnMut(&mut Param)) {
        p(&mut self.weight);
        p(&mut self.bias);
    }

    pub(crate) fn visit_buffers(&mut self, b: &mut dyn FnMut(&mut Buffer)) {
        b(&mut self.running_mean);
        b(&mut self.running_var);
        b(&mut self.num_batches_tracked);
    }
}

/// Fully connected layer, `y = x·Wᵀ (+ b)`, x of shape [N, in].
#[derive(Debug, Clone)]
pub struct Linear {
    /// Shape [out, in].
    pub weight: Param,
    /// One value per output (shape `[out]`), when the layer has one.
    pub bias: Option<Param>,
    cache: Vec<Tensor>,
}

impl Linear {
    /// PyTorch's default init: U(−1/√in, 1/√in) for weight and bias.
    pub fn new(name: &str, inp: usize, out: usize, bias: bool, rng: &mut Rng) -> Self {
        let bound = 1.0 / (inp as f64).sqrt();
        let mut u = || ((2.0 * rng.uniform() - 1.0) * bound) as f32;
        let w = (0..out * inp).map(|_| u()).collect();
        let b = bias.then(|| {
            Param::new(
                format!("{name}.bias"),
                &[out],
                (0..out).map(|_| u()).collect(),
            )
        });
        Self {
            weight: Param::new(format!("{name}.weight"), &[out, inp], w),
            bias: b,
            cache: Vec::new(),
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }

    /// [N, in] → [N, out]; a training forward caches the input for the backward.
    pub fn forward(&mut self, be: &dyn Backend, x: &Tensor, train: bool) -> Tensor {
        let n = x.batch();
        let out = self.out_features();
        assert_eq!(
            x.item_len(),
            self.weight.shape[1],
            "{}: input width mismatch",
            self.weight.name
        );
        let mut y = Tensor::for_overwrite(&[n, out]);
        be.linear_forward(
            n,
            &x.data,
            &self.weight.value,
            self.bias.as_ref().map(|b| b.value.as_slice()),
            &mut y.data,
            out,
        );
        if train {
            self.cache.push(x.clone());
        }
        y
    }

    /// Accumulates dL/dW (and dL/db); returns dL/dx when `need_dx`.
    pub fn backward(&mut self, be: &dyn Backend, dy: &Tensor, need_dx: bool) -> Option<Tensor> {
        let x = self
            .cache
            .pop()
            .expect("Linear::backward without a training forward");
        let n = x.batch();
        let mut dx = need_dx.then(|| Tensor::for_overwrite(&x.shape));
        be.linear_backward(
            n,
            &x.data,
            &self.weight.value,
            &dy.data,
            self.out_features(),
            dx.as_mut().map(|t| t.data.as_mut_slice()),
            &mut self.weight.grad,
            self.bias.as_mut().map(|b| b.grad.as_mut_slice()),
        );
        dx
    }

    pub(crate) fn visit(&mut self, p: &mut dyn FnMut(&mut Param)) {
        p(&mut self.weight);
        if let Some(b) = &mut self.bias {
            p(b);
        }
    }
}

/// ReLU, in place; keeps its output to mask the gradient.
#[derive(Debug, Clone, Default)]
pub struct Relu {
    cache: Vec<Tensor>,
}

impl Relu {
    /// Clamps negatives to zero in place; a training forward caches the output.
    pub fn forward(&mut self, mut x: Tensor, train: bool) -> Tensor {
        x.data.par_iter_mut().for_each(|v| *v = v.max(0.0));
        if train {
            self.cache.push(x.clone());
        }
        x
    }

    /// Zeroes the gradient where the output was not positive.
    pub fn backward(&mut self, mut dy: Tensor) -> Tensor {
        let y = self
            .cache
            .pop()
            .expect("Relu::backward without a training forward");
        dy.data
            .par_iter_mut()
            .zip(y.data.par_iter())
            .for_each(|(g, &v)| {
                if v <= 0.0 {
                    *g = 0.0;
                }
            });
        dy
    }
}

/// 3×3 max-pool, stride 2, padding 1 (the ImageNet stem's).
#[derive(Debug, Clone, Default)]
pub struct MaxPool {
    cache: Vec<(Vec<usize>, Vec<u32>)>,
}

impl MaxPool {
    const K: usize = 3;
    const S: usize = 2;
    const P: usize = 1;

    /// Output side for an input side of `h` pixels.
    pub fn out_size(h: usize) -> usize {
        (h + 2 * Self::P - Self::K) / Self::S + 1
    }

    /// [N, C, H, W] → [N, C, Ho, Wo]; a training forward caches where each maximum came from.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Tensor {
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let (ho, wo) = (Self::out_size(h), Self::out_size(w));
        let mut y = Tensor::zeros(&[n, c, ho, wo]);
        let mut arg = vec![0u32; n * c * ho * wo];
        y.data
            .par_chunks_mut(ho * wo)
            .zip(arg.par_chunks_mut(ho * wo))
            .zip(x.data.par_chunks(h * w))
            .for_each(|((yp, ap), xp)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut best = f32::NEG_INFINITY;
                        let mut bi = usize::MAX;
                        for ky in 0..Self::K {
                            let iy = (oy * Self::S + ky) as isize - Self::P as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..Self::K {
                                let ix = (ox * Self::S + kx) as isize - Self::P as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let i = iy as usize * w + ix as usize;
                                if bi == usize::MAX || xp[i] > best {
                                    best = xp[i];
                                    bi = i;
                                }
                            }
                        }
                        yp[oy * wo + ox] = best;
                        ap[oy * wo + ox] = bi as u32;
                    }
                }
            });
        if train {
            self.cache.push((x.shape.clone(), arg));
        }
        y
    }

    /// Routes each output gradient to the input position that held the maximum.
    pub fn backward(&mut self, dy: &Tensor) -> Tensor {
        let (shape, arg) = self
            .cache
            .pop()
            .expect("MaxPool::backward without a training forward");
        let hw = shape[2] * shape[3];
        let ohw = dy.shape[2] * dy.shape[3];
        let mut dx = Tensor::zeros(&shape);
        dx.data
            .par_chunks_mut(hw)
            .zip(dy.data.par_chunks(ohw).zip(arg.par_chunks(ohw)))
            .for_each(|(dxp, (dyp, ap))| {
                for (g, &i) in dyp.iter().zip(ap) {
                    dxp[i as usize] += g;
                }
            });
        dx
    }
}

/// Global average pool [N, C, H, W] → [N, C].
pub fn global_avg_pool(x: &Tensor) -> Tensor {
    let (n, c) = (x.shape[0], x.shape[1]);
    let hw: usize = x.shape[2..].iter().product();
    let data = x
        .data
        .chunks_exact(hw)
        .map(|p| p.iter().sum::<f32>() / hw as f32)
        .collect();
    Tensor::from_vec(&[n, c], data)
}

/// Backward of [`global_avg_pool`] to `shape`.
pub fn global_avg_pool_backward(dy: &Tensor, shape: &[usize]) -> Tensor {
    let hw: usize = shape[2..].iter().product();
    let mut dx = Tensor::zeros(shape);
    dx.data
        .par_chunks_mut(hw)
        .zip(dy.data.par_iter())
        .for_each(|(p, &g)| p.iter_mut().for_each(|v| *v = g / hw as f32));
    dx
}
