//! `barlow eval knn` and `barlow eval linear`.

use super::args::*;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum EvalCommand {
    /// kNN top-1 (cosine, k = 20, temperature 0.1) of a checkpoint's backbone features.
    Knn(EvalArgs),
    /// Linear probe: a softmax classifier on frozen features, SGD with a cosine schedule.
    Linear(LinearArgs),
}

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// The checkpoint (a run's checkpoint.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Neighbours.
    #[arg(long, default_value_t = 20, value_parser = positive)]
    k: usize,
    /// Temperature of the votes.
    #[arg(long, default_value_t = 0.1, value_parser = finite_positive)]
    t: f32,
    /// Where the features are computed: auto picks the first GPU when one works.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(clap::Args)]
pub(crate) struct LinearArgs {
    /// The checkpoint (a run's checkpoint.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset [default: the one the run trained on].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Epochs over the frozen features.
    #[arg(long, default_value_t = 30, value_parser = positive)]
    epochs: usize,
    /// Peak learning rate (cosine decay to 0).
    #[arg(long, default_value_t = 0.1, value_parser = finite_positive)]
    lr: f32,
    /// Batch size.
    #[arg(long, default_value_t = 256, value_parser = batch)]
    batch_size: usize,
    /// Where the features are computed: auto picks the first GPU when one works.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

/// Loads a checkpoint's model and the dataset it names (or `data`).
pub(crate) fn load_for_eval(
    path: &std::path::Path,
    data: Option<PathBuf>,
) -> Result<
    (
        barlow::train::BarlowTwins,
        barlow::train::data::Splits,
        barlow::train::augment::AugmentConfig,
    ),
    String,
> {
    use barlow::train::{checkpoint, data as ds, BarlowTwins, ModelConfig};
    let l = checkpoint::load(path).map_err(|e| e.to_string())?;
    let mcfg: ModelConfig = serde_json::from_value(l.state["model"].clone())
        .map_err(|e| format!("{}: model configuration: {e}", path.display()))?;
    let aug = serde_json::from_value(l.state["augment"].clone())
        .map_err(|e| format!("{}: augment configuration: {e}", path.display()))?;
    let data = match data {
        Some(d) => d,
        None => {
            let saved: barlow::train::run::TrainConfig =
                serde_json::from_value(l.state["train"].clone())
                    .map_err(|e| format!("{}: train configuration: {e}", path.display()))?;
            saved.data
        }
    };
    let mut model =
        BarlowTwins::new(mcfg, &mut barlow::rng::Rng::new(0)).map_err(|e| e.to_string())?;
    l.restore_model(&mut model).map_err(|e| e.to_string())?;
    let splits = ds::open(&data, crate::env::image_memory()?).map_err(|e| e.to_string())?;
    let (want, have) = (model.config.backbone.in_channels, splits.train.channels());
    if want != have {
        let name = |c| {
            if c == 1 {
                "gray (1 channel)"
            } else {
                "RGB (3 channels)"
            }
        };
        return Err(format!(
            "{}: the model takes {} images but {} holds {} images; evaluate it on data like \
             what it was trained on",
            path.display(),
            data.display(),
            name(want),
            name(have)
        ));
    }
    Ok((model, splits, aug))
}

/// Backbone features of both splits (evaluation mode) on the device asked for.
pub(crate) fn eval_features(
    model: &mut barlow::train::BarlowTwins,
    s: &barlow::train::data::Splits,
    aug: &barlow::train::augment::AugmentConfig,
    device: Device,
    unit: bool,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    use barlow::train::eval::features_with;
    use barlow::train::run::{Engine, EngineOptions, Precision};
    let choice = device.into();
    let opt = barlow::train::Lars::new(Default::default());
    // f32 without tensor-core rounding, so the figures match the CPU's; batches of 16 keep the
    // device buffers (a training step's, two views) small.
    let mut engine = Engine::open(
        EngineOptions::new(choice, Precision::F32).cudnn(crate::env::cudnn_search()),
        model,
        &opt,
        16,
        (s.train.channels(), aug.size, aug.size),
        &mut |m| eprintln!("barlow: features: {m}"),
    )
    .map_err(|e| e.to_string())?;
    let mut f = |x: &barlow::nn::Tensor| engine.features(model, x);
    let train = features_with(&s.train, aug, 256, unit, &mut f).map_err(|e| e.to_string())?;
    let test = features_with(&s.test, aug, 256, unit, &mut f).map_err(|e| e.to_string())?;
    Ok((train, test))
}

pub(crate) fn eval_knn(a: EvalArgs) -> Result<(), String> {
    use barlow::train::eval::knn_top1;
    let (mut model, s, aug) = load_for_eval(&a.checkpoint, a.data)?;
    let dim = model.backbone.config.features();
    let classes = s.train.classes.len();
    let (fb, ft) = eval_features(&mut model, &s, &aug, a.device, true)?;
    let acc = knn_top1(
        &fb,
        &s.train.labels,
        &ft,
        &s.test.labels,
        dim,
        classes,
        a.k,
        a.t,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "kNN top-1 (k = {}, t = {}): {:.2}% on {} test images against {} training images",
        a.k,
        a.t,
        100.0 * acc,
        s.test.len(),
        s.train.len()
    );
    Ok(())
}

pub(crate) fn eval_linear(a: LinearArgs) -> Result<(), String> {
    use barlow::train::eval::{linear_probe, ProbeConfig};
    let (mut model, s, aug) = load_for_eval(&a.checkpoint, a.data)?;
    let dim = model.backbone.config.features();
    let classes = s.train.classes.len();
    eprintln!(
        "extracting features of {} + {} images",
        s.train.len(),
        s.test.len()
    );
    let (ftr, fte) = eval_features(&mut model, &s, &aug, a.device, false)?;
    let cfg = ProbeConfig::default()
        .epochs(a.epochs)
        .lr(a.lr)
        .batch(a.batch_size);
    let acc = linear_probe(
        &ftr,
        &s.train.labels,
        &fte,
        &s.test.labels,
        dim,
        classes,
        cfg,
        |e, loss| eprintln!("probe epoch {}: loss {loss:.4}", e + 1),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "linear probe top-1: {:.2}% on {} test images",
        100.0 * acc,
        s.test.len()
    );
    Ok(())
}
