//! Evaluation of a backbone: the kNN monitor (cosine similarity, k nearest, temperature-weighted
//! votes) and the linear probe (a softmax classifier on frozen features, SGD with a cosine
//! schedule).

use super::augment::{eval_batch, AugmentConfig};
use super::data::Dataset;
use crate::cpu::{matmul, Mat, MatRef};
use crate::error::{Error, Result};
use crate::nn::resnet::ResNet;
use crate::nn::{Backend, Tensor};
use crate::rng::Rng;
use rayon::prelude::*;

/// Backbone features (evaluation mode) of every image of `ds`, L2-normalized when `unit`;
/// [`Error::Diverged`] when one is not finite.
pub fn features(
    be: &dyn Backend,
    net: &mut ResNet,
    ds: &Dataset,
    aug: &AugmentConfig,
    batch: usize,
    unit: bool,
) -> Result<Vec<f32>> {
    let mut f = |x: &Tensor| -> crate::Result<Tensor> { Ok(net.forward(be, x, false)) };
    features_with(ds, aug, batch, unit, &mut f)
}

/// [`features`] through any feature extractor (the CPU backbone or a device copy of it).
pub fn features_with(
    ds: &Dataset,
    aug: &AugmentConfig,
    batch: usize,
    unit: bool,
    net: &mut dyn FnMut(&Tensor) -> crate::Result<Tensor>,
) -> crate::Result<Vec<f32>> {
    let mut out = Vec::new();
    let idx: Vec<usize> = (0..ds.len()).collect();
    let mut f = 0;
    for chunk in idx.chunks(batch.max(1)) {
        let x = eval_batch(ds, chunk, aug);
        let y = net(&x)?;
        f = y.item_len();
        if let Some(i) = y.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Diverged {
                what: "the backbone".into(),
                at: format!("image {} of {}", chunk[i / f.max(1)], ds.source),
                value: format!("a feature came out as {}", y.data[i]),
                advice: "its weights are too large to evaluate (the run that made them \
                         diverged: lower its learning rates, or use an earlier checkpoint)"
                    .into(),
            });
        }
        out.extend_from_slice(&y.data);
    }
    if unit && f > 0 {
        out.par_chunks_mut(f).for_each(|v| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= n);
        });
    }
    Ok(out)
}

/// kNN top-1 accuracy (in [0, 1]) of unit feature rows `test` against the labelled `bank`:
/// the k most similar bank rows vote with weight exp(similarity / t).
#[allow(clippy::too_many_arguments)]
pub fn knn_top1(
    bank: &[f32],
    bank_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    classes: usize,
    k: usize,
    t: f32,
) -> Result<f64> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if k == 0 {
        return bad("kNN needs k >= 1".into());
    }
    if !(t.is_finite() && t > 0.0) {
        return bad(format!("kNN temperature {t} must be a finite number > 0"));
    }
    check_features("bank", bank, bank_labels, dim, classes)?;
    check_features("test", test, test_labels, dim, classes)?;
    let nb = bank_labels.len();
    let nt = test_labels.len();
    if nb == 0 || nt == 0 {
        return bad("kNN needs at least one bank and one test feature".into());
    }
    let k = k.min(nb);
    let correct: usize = test
        .par_chunks(dim * 256)
        .zip(test_labels.par_chunks(256))
        .map(|(rows, labels)| {
            let m = labels.len();
            let mut sim = vec![0f32; m * nb];
            matmul(
                Mat::new(&mut sim, m, nb, nb as isize, 1),
                MatRef::new(rows, m, dim, dim as isize, 1),
                MatRef::new(bank, dim, nb, 1, dim as isize),
                1.0,
                false,
                false,
            );
            let mut hits = 0;
            for (i, &label) in labels.iter().enumerate() {
                let row = &sim[i * nb..(i + 1) * nb];
                let mut order: Vec<usize> = (0..nb).collect();
                order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
                // exp(s / t) scaled by exp(-max s / t): the same vote, but the largest weight
                // is 1, so no temperature > 0 overflows; at small t the nearest neighbour wins.
                let top = order[..k]
                    .iter()
                    .map(|&j| f64::from(row[j]))
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut votes = vec![0f64; classes];
                for &j in &order[..k] {
                    votes[bank_labels[j] as usize] +=
                        ((f64::from(row[j]) - top) / f64::from(t)).exp();
                }
                let pred = votes
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(c, _)| c);
                hits += usize::from(pred as u32 == label);
            }
            hits
        })
        .sum();
    Ok(correct as f64 / nt as f64)
}

/// Rows of `dim` features, one per label, every label below `classes`.
fn check_features(name: &str, x: &[f32], labels: &[u32], dim: usize, classes: usize) -> Result<()> {
    if dim == 0 || x.len() != labels.len() * dim {
        return Err(Error::InvalidConfig(format!(
            "{name}: {} feature values for {} labels of dimension {dim}",
            x.len(),
            labels.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Diverged {
            what: "evaluation".into(),
            at: format!("{name} feature row {}", i / dim),
            value: format!("the feature is {}", x[i]),
            advice: "no accuracy comes from non-finite features (the backbone's run diverged?)"
                .into(),
        });
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(Error::InvalidConfig(format!(
            "{name}: label {l} is not below the {classes} classes"
        )));
    }
    Ok(())
}

/// Options of the linear probe (`ProbeConfig::default()`; setters change one field).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ProbeConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// Features per SGD step.
    pub batch: usize,
    /// Initial learning rate, decayed towards 0 by a cosine over all steps.
    pub lr: f32,
    /// SGD momentum, in [0, 1).
    pub momentum: f32,
    /// L2 penalty on the classifier's weights (not its biases).
    pub weight_decay: f32,
    /// Seed of the shuffling.
    pub seed: u64,
}

setters!(ProbeConfig {
    epochs: usize,
    batch: usize,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    seed: u64,
});

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch: 256,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-6,
            seed: 0,
        }
    }
}

/// Trains a linear softmax classifier on frozen `train` features (standardized with the train
/// set's statistics) and returns its top-1 accuracy on `test`.
#[allow(clippy::too_many_arguments)]
pub fn linear_probe(
    train: &[f32],
    train_labels: &[u32],
    test: &[f32],
    test_labels: &[u32],
    dim: usize,
    classes: usize,
    cfg: ProbeConfig,
    mut progress: impl FnMut(usize, f64),
) -> Result<f64> {
    let bad = |m: String| Err(Error::InvalidConfig(m));
    if cfg.epochs == 0 || cfg.batch == 0 {
        return bad("the linear probe needs epochs >= 1 and a batch >= 1".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!(
            "probe learning rate {} must be a finite number > 0",
            cfg.lr
        ));
    }
    let momentum_ok = cfg.momentum.is_finite() && (0.0..1.0).contains(&cfg.momentum);
    let decay_ok = cfg.weight_decay.is_finite() && cfg.weight_decay >= 0.0;
    if !(momentum_ok && decay_ok) {
        return bad("probe momentum must be in [0, 1) and weight decay finite and >= 0".into());
    }
    check_features("train", train, train_labels, dim, classes)?;
    check_features("test", test, test_labels, dim, classes)?;
    if train_labels.is_empty() || test_labels.is_empty() {
        return bad("the linear probe needs training and test features".into());
    }
    let n = train_labels.len();
    let mut mean = vec![0f64; dim];
    let mut var = vec![0f64; dim];
    for row in train.chunks_exact(dim) {
        row.iter()
            .zip(&mut mean)
            .for_each(|(x, m)| *m += f64::from(*x));
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    for row in train.chunks_exact(dim) {
        row.iter()
            .zip(&mean)
            .zip(&mut var)
            .for_each(|((x, m), v)| *v += (f64::from(*x) - m).powi(2));
    }
    let scale: Vec<f32> = var
        .iter()
        .map(|v| (1.0 / (v / n as f64 + 1e-8).sqrt()) as f32)
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let standardize = |x: &[f32]| -> Vec<f32> {
        x.chunks_exact(dim)
            .flat_map(|r| {
                r.iter()
                    .zip(&mean)
                    .zip(&scale)
                    .map(|((v, m), s)| (v - m) * s)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (xtr, xte) = (standardize(train), standardize(test));
    let mut w = vec![0f32; classes * dim];
    let mut b = vec![0f32; classes];
    let (mut mw, mut mb) = (vec![0f32; classes * dim], vec![0f32; classes]);
    let steps_per_epoch = n.div_ceil(cfg.batch.max(1));
    let total = (cfg.epochs * steps_per_epoch).max(1);
    let mut rng = Rng::new(cfg.seed);
    let mut step = 0;
    let logits = |x: &[f32], w: &[f32], b: &[f32], m: usize| -> Vec<f32> {
        let mut z = vec![0f32; m * classes];
        matmul(
            Mat::new(&mut z, m, classes, classes as isize, 1),
            MatRef::new(x, m, dim, dim as isize, 1),
            MatRef::new(w, dim, classes, 1, dim as isize),
            1.0,
            false,
            true,
        );
        z.chunks_exact_mut(classes)
            .for_each(|r| r.iter_mut().zip(b).for_each(|(v, bb)| *v += bb));
        z
    };
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut loss_sum = 0f64;
        for idx in order.chunks(cfg.batch.max(1)) {
            let m = idx.len();
            let x: Vec<f32> = idx
                .iter()
                .flat_map(|&i| xtr[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let mut z = logits(&x, &w, &b, m);
            // Softmax cross-entropy; z becomes dL/dz.
            for (r, &i) in z.chunks_exact_mut(classes).zip(idx) {
                let mx = r.iter().fold(f32::MIN, |a, &v| a.max(v));
                let s: f32 = r.iter().map(|v| (v - mx).exp()).sum();
                let y = train_labels[i] as usize;
                loss_sum += f64::from(s.ln() + mx - r[y]);
                r.iter_mut()
                    .for_each(|v| *v = (*v - mx).exp() / s / m as f32);
                r[y] -= 1.0 / m as f32;
            }
            let mut gw = vec![0f32; classes * dim];
            matmul(
                Mat::new(&mut gw, classes, dim, dim as isize, 1),
                MatRef::new(&z, classes, m, 1, classes as isize),
                MatRef::new(&x, m, dim, dim as isize, 1),
                1.0,
                false,
                true,
            );
            let mut gb = vec![0f32; classes];
            z.chunks_exact(classes)
                .for_each(|r| gb.iter_mut().zip(r).for_each(|(g, v)| *g += v));
            let lr =
                cfg.lr * 0.5 * (1.0 + (std::f32::consts::PI * step as f32 / total as f32).cos());
            for ((wv, g), mv) in w.iter_mut().zip(&gw).zip(&mut mw) {
                *mv = cfg.momentum * *mv + g + cfg.weight_decay * *wv;
                *wv -= lr * *mv;
            }
            for ((bv, g), mv) in b.iter_mut().zip(&gb).zip(&mut mb) {
                *mv = cfg.momentum * *mv + g;
                *bv -= lr * *mv;
            }
            step += 1;
        }
        let loss = loss_sum / n as f64;
        let weights_ok = w.iter().chain(&b).all(|v| v.is_finite());
        if !(loss.is_finite() && weights_ok) {
            return Err(probe_diverged(epoch + 1, loss, cfg.lr));
        }
        progress(epoch, loss);
    }
    let nt = test_labels.len();
    let z = logits(&xte, &w, &b, nt);
    if let Some(v) = z.iter().find(|v| !v.is_finite()) {
        return Err(Error::Diverged {
            what: "the linear probe".into(),
            at: "the test set".into(),
            value: format!("a logit came out as {v}"),
            advice: format!("lower its learning rate (--lr {})", cfg.lr),
        });
    }
    let hits = z
        .chunks_exact(classes)
        .zip(test_labels)
        .filter(|(r, &y)| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(c, _)| c)
                == Some(y as usize)
        })
        .count();
    Ok(hits as f64 / nt as f64)
}

fn probe_diverged(epoch: usize, loss: f64, lr: f32) -> Error {
    Error::Diverged {
        what: "the linear probe".into(),
        at: format!("probe epoch {epoch}"),
        value: if loss.is_finite() {
            "a classifier weight became infinite or NaN".into()
        } else {
            format!("the loss became {loss}")
        },
        advice: format!("lower its learning rate (--lr {lr}); no accuracy was computed"),
    }
}
