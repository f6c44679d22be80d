//! `barlow train`.

use super::args::*;
use super::plot::plot_metrics;
use super::progress::Bar;
use crate::Failure;
use barlow::train::ranks::Ranks;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// Dataset: builtin, fashion-mnist (/usr/share/datasets/fashion-mnist), or a folder
    /// (ImageFolder with train/ and test/ or val/, IDX files, or CIFAR-10 binary batches).
    #[arg(long, default_value = "builtin")]
    data: PathBuf,
    /// Backbone.
    #[arg(long, value_enum, default_value_t = ArchArg::Resnet18)]
    arch: ArchArg,
    /// Stem [default: small for images up to 64 pixels, imagenet otherwise].
    #[arg(long, value_enum)]
    stem: Option<StemArg>,
    /// Channels of the first stage (torchvision: 64); later stages double it.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    width: usize,
    /// Projector widths, comma-separated (paper: 8192,8192,8192).
    #[arg(long, value_delimiter = ',', default_value = "512,512,512", value_parser = positive)]
    projector: Vec<usize>,
    /// Weight of the off-diagonal term.
    #[arg(long, default_value_t = 0.0051, value_parser = non_negative)]
    lambda: f32,
    /// Images per batch (each gives two views).
    #[arg(long, default_value_t = 256, value_parser = batch)]
    batch_size: usize,
    /// Passes over the training images.
    #[arg(long, default_value_t = 4, value_parser = positive)]
    epochs: usize,
    /// Linear warm-up epochs [default: 10, or a tenth of the run when shorter than 100 epochs].
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Base learning rate of the weights (scaled by batch/256).
    #[arg(long, default_value_t = 0.2, value_parser = non_negative)]
    lr_weights: f32,
    /// Base learning rate of biases and norm parameters (scaled by batch/256).
    #[arg(long, default_value_t = 0.0048, value_parser = non_negative)]
    lr_biases: f32,
    /// Weight decay (weights only).
    #[arg(long, default_value_t = 1.5e-6, value_parser = non_negative)]
    weight_decay: f32,
    /// Crop size [default: the dataset's image size; 224 for large images].
    #[arg(long, value_parser = crop)]
    crop: Option<usize>,
    /// Train on at most this many images (0: all).
    #[arg(long, default_value_t = 0)]
    max_train: usize,
    /// Run the kNN monitor every this many epochs (0: only before and after training).
    #[arg(long, default_value_t = 1)]
    knn_every: usize,
    /// Seed of the initialization, the data order and the augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder [default: runs/<UTC timestamp>-<process id>]; a folder holding another run is
    /// refused (resume that run with --resume instead).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this checkpoint, in its own folder, with its saved settings:
    /// only --epochs (to extend it), --data (a dataset that moved), --device, --precision and
    /// --gpus may be given. With --out NEW, start a new run from the checkpoint instead.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Compute device: auto picks the first GPU when one works (and says which), else the CPU.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Activations on the GPU: bf16 (fast; f32 master weights and accumulation) or f32 (exact,
    /// no tensor-core rounding; for checking).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Bf16)]
    precision: PrecisionArg,
    /// GPUs of this machine to train on, a worker each (data parallel: every batch is split
    /// between them, the step is the whole batch's). For several machines, start one process
    /// per GPU with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set instead.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    gpus: usize,
}

pub(crate) fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Options a resume may give: what extends the run, where its data is now, and the machine.
const RESUMABLE: [&str; 7] = [
    "resume",
    "out",
    "epochs",
    "data",
    "device",
    "precision",
    "gpus",
];

pub(crate) fn train(a: TrainArgs, given: &[String]) -> Result<(), Failure> {
    if a.resume.is_some() {
        if let Some(id) = given.iter().find(|g| !RESUMABLE.contains(&g.as_str())) {
            return Err(Failure::Usage(format!(
                "--{} cannot be given with --resume: a resumed run keeps the settings it was \
                 saved with (only --epochs, --data, --device, --precision, --gpus and --out may \
                 be given); to train with other settings, start a new run without --resume",
                id.replace('_', "-")
            )));
        }
    }
    let resume = a.resume.as_ref().map(|r| {
        let given = |id: &str| given.iter().any(|g| g == id);
        barlow::train::run::Resume::new(r)
            .epochs(given("epochs").then_some(a.epochs))
            .data(given("data").then(|| a.data.clone()))
    });
    let cfg = barlow::train::run::TrainConfig::default()
        .device(a.device.into())
        .precision(a.precision.into())
        .data(a.data)
        .arch(a.arch.into())
        .stem(a.stem.map(Into::into))
        .width(a.width)
        .projector(a.projector)
        .lambda(a.lambda)
        .batch_size(a.batch_size)
        .epochs(a.epochs)
        .warmup_epochs(a.warmup_epochs)
        .lr_weights(a.lr_weights)
        .lr_biases(a.lr_biases)
        .weight_decay(a.weight_decay)
        .crop(a.crop)
        .max_train(a.max_train)
        .knn_every(a.knn_every)
        .seed(a.seed)
        .cudnn(crate::env::cudnn_search())
        .image_memory(crate::env::image_memory()?);
    let out = match (&a.out, &a.resume) {
        (Some(o), _) => o.clone(),
        // The run's own folder; `checkpoint.safetensors` alone means the current one.
        (None, Some(r)) => r
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()),
        // The process id keeps runs started in the same second apart.
        (None, None) => {
            PathBuf::from("runs").join(format!("{}-{}", timestamp(), std::process::id()))
        }
    };
    let launch = barlow::collective::Launch::from_vars(|k| std::env::var(k).ok())
        .map_err(|e| e.to_string())?;
    if let (Some(l), Device::Cpu) = (&launch, a.device) {
        return Err(Failure::Usage(format!(
            "the launcher's variables (RANK, WORLD_SIZE = {}, ...) start a rank of a GPU group, \
             but --device cpu was given; unset them to train on the CPU, or use --device cuda",
            l.world_size
        )));
    }
    let ranks = match (launch, a.gpus) {
        (Some(l), 1) => Ranks::Launched(l),
        (Some(l), n) => {
            return Err(Failure::Usage(format!(
                "--gpus {n} given inside a launched group (WORLD_SIZE={}): the launcher starts \
                 a process per GPU, so leave --gpus out",
                l.world_size
            )))
        }
        (None, 1) => Ranks::One,
        (None, n) => Ranks::Gpus(n),
    };
    let mut bar = Bar::default();
    let result = barlow::train::run::train_with(&cfg, &ranks, &out, resume.as_ref(), &mut bar);
    if result.is_err() && ranks.world() > 1 {
        // Other ranks may still wait on the one that failed: end them with the process.
        if let Err(e) = &result {
            if let Some(b) = &bar.bar {
                b.abandon();
            }
            eprintln!("barlow: {e}");
            std::process::exit(if matches!(e, barlow::Error::Interrupted { .. }) {
                130
            } else {
                1
            });
        }
    }
    let s = match result {
        Ok(s) => s,
        Err(e @ barlow::Error::Interrupted { .. }) => {
            if let Some(b) = &bar.bar {
                b.abandon();
            }
            eprintln!("barlow: {e}");
            std::process::exit(130);
        }
        Err(e @ barlow::Error::InvalidConfig(_)) => return Err(Failure::Usage(e.to_string())),
        Err(e) => return Err(Failure::Run(e.to_string())),
    };
    if let Ranks::Launched(l) = &ranks {
        if l.rank != 0 {
            println!(
                "rank {} of {}: done, {} steps",
                l.rank, l.world_size, s.steps
            );
            return Ok(());
        }
    }
    plot_metrics(&barlow::train::run::RunFiles {
        dir: s.out_dir.clone(),
    })
    .map_err(|e| e.to_string())?;
    println!(
        "done: {} steps, final loss {:.2}, {:.0} pairs/s; kNN top-1 {} at init -> {:.2}% after training",
        s.steps,
        s.final_loss,
        s.images_per_second,
        if s.knn_initial.is_nan() { "-".to_string() } else { format!("{:.2}%", 100.0 * s.knn_initial) },
        100.0 * s.knn_final
    );
    println!(
        "wrote {}/checkpoint.safetensors, metrics.jsonl, curves.png",
        s.out_dir.display()
    );
    Ok(())
}
