//! LARS as the reference Barlow Twins code implements it, and its learning-rate schedule.
//!
//! For every parameter: `dp = grad (+ wd·p)`, then `dp *= η·‖p‖/‖dp‖` (when both norms are > 0),
//! `μ = m·μ + dp`, `p −= lr·μ`. One-dimensional parameters (biases, norm weights) skip both the
//! weight decay and the trust ratio, and use the bias learning rate.

use crate::nn::{Param, Visit};

/// LARS hyper-parameters (`LarsConfig::default()` is the paper's; setters change one field).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct LarsConfig {
    /// Momentum coefficient m of the update's running sum.
    pub momentum: f32,
    /// Trust coefficient η.
    pub eta: f32,
    /// Weight decay added to the gradient of weights (not of one-dimensional parameters).
    pub weight_decay: f32,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            eta: 0.001,
            weight_decay: 1.5e-6,
        }
    }
}

setters!(LarsConfig {
    momentum: f32,
    eta: f32,
    weight_decay: f32,
});

/// The optimizer state: one momentum buffer per parameter, in visiting order.
#[derive(Debug, Clone)]
pub struct Lars {
    /// The hyper-parameters.
    pub config: LarsConfig,
    /// Momentum buffers, named like their parameters.
    pub momentum: Vec<(String, Vec<f32>)>,
}

fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

impl Lars {
    /// An optimizer with no momentum yet; buffers are created at the first step.
    pub fn new(config: LarsConfig) -> Self {
        Self {
            config,
            momentum: Vec::new(),
        }
    }

    /// Applies one update to every parameter of `model` from its accumulated gradient.
    pub fn step(&mut self, model: &mut dyn Visit, lr_weights: f32, lr_biases: f32) {
        let c = self.config;
        let mut i = 0;
        let momentum = &mut self.momentum;
        model.params_mut(&mut |p: &mut Param| {
            if momentum.len() <= i {
                momentum.push((p.name.clone(), vec![0.0; p.value.len()]));
            }
            let mu = &mut momentum[i].1;
            i += 1;
            let vector = p.is_vector();
            let mut dp = p.grad.clone();
            if !vector {
                dp.iter_mut()
                    .zip(&p.value)
                    .for_each(|(d, &w)| *d += c.weight_decay * w);
                let (pn, un) = (norm(&p.value), norm(&dp));
                if pn > 0.0 && un > 0.0 {
                    let q = (f64::from(c.eta) * pn / un) as f32;
                    dp.iter_mut().for_each(|d| *d *= q);
                }
            }
            let lr = if vector { lr_biases } else { lr_weights };
            for ((m, d), w) in mu.iter_mut().zip(&dp).zip(p.value.iter_mut()) {
                *m = c.momentum * *m + d;
                *w -= lr * *m;
            }
        });
    }
}

/// Learning rates over training: linear warm-up from 0, then cosine decay to 0.001 × peak.
/// The peak is `base × batch / 256`, separately for weights and for biases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Peak weight learning rate per 256 images of batch.
    pub base_lr_weights: f32,
    /// Peak bias learning rate (one-dimensional parameters) per 256 images of batch.
    pub base_lr_biases: f32,
    /// Images per batch; the peak rates scale with it.
    pub batch_size: usize,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// Steps of the whole run; the cosine decay ends here.
    pub total_steps: usize,
}

impl Schedule {
    /// (weights, biases) learning rates at `step`.
    pub fn lr(&self, step: usize) -> (f32, f32) {
        let base = self.batch_size as f64 / 256.0;
        let lr = if step < self.warmup_steps {
            base * step as f64 / self.warmup_steps as f64
        } else {
            let s = (step - self.warmup_steps) as f64;
            let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
            let q = 0.5 * (1.0 + (std::f64::consts::PI * s.min(span) / span).cos());
            let end = base * 0.001;
            base * q + end * (1.0 - q)
        };
        (
            (lr * f64::from(self.base_lr_weights)) as f32,
            (lr * f64::from(self.base_lr_biases)) as f32,
        )
    }
}
