//! Whole training runs on the built-in sample: files written, learning happens, a resumed run is
//! bit-identical to an uninterrupted one, checkpoints round-trip, bad settings are errors.
#![cfg(feature = "train")]

mod common;

use barlow::nn::Visit;
use barlow::train::run::{self, Quiet, TrainConfig};
use barlow::train::{checkpoint, BarlowTwins, ModelConfig};
use barlow::Error;
use common::within;
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barlow-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny() -> TrainConfig {
    TrainConfig::default()
        .width(4)
        .projector(vec![64, 64, 64])
        .batch_size(64)
        .epochs(2)
        .max_train(640)
        .knn_bank(640)
        .knn_test(400)
        .seed(5)
}

fn tensors(path: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let l = checkpoint::load(path).unwrap();
    let mcfg: ModelConfig = serde_json::from_value(l.state["model"].clone()).unwrap();
    let mut m = BarlowTwins::new(mcfg, &mut barlow::rng::Rng::new(99)).unwrap();
    l.restore_model(&mut m).unwrap();
    let mut out = Vec::new();
    m.params_mut(&mut |p| {
        out.push((
            p.name.clone(),
            p.value.iter().map(|v| v.to_bits()).collect(),
        ))
    });
    m.buffers_mut(&mut |b| {
        out.push((
            b.name.clone(),
            b.value.iter().map(|v| v.to_bits()).collect(),
        ))
    });
    let mut opt = barlow::train::Lars::new(Default::default());
    l.restore_optimizer(&mut m, &mut opt).unwrap();
    for (n, mu) in opt.momentum {
        out.push((format!("mu.{n}"), mu.iter().map(|v| v.to_bits()).collect()));
    }
    out
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let straight = tmpdir("straight");
    let s = run::train(&tiny(), &straight, None, &mut Quiet).unwrap();
    assert_eq!(s.steps, 20);
    for f in ["checkpoint.safetensors", "metrics.jsonl"] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    // The plot is the command line's (feature `cli`), drawn from metrics.jsonl after the run.
    assert!(
        !straight.join("curves.png").exists(),
        "the library drew a plot"
    );

    let split = tmpdir("split");
    let first = tiny().epochs(1);
    run::train(&first, &split, None, &mut Quiet).unwrap();
    let ckpt = split.join("checkpoint.safetensors");
    let s2 = run::train(
        &tiny(),
        &split,
        Some(&run::Resume::new(&ckpt).epochs(Some(2))),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(s2.steps, 20);
    let (a, b) = (
        tensors(&straight.join("checkpoint.safetensors")),
        tensors(&ckpt),
    );
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resuming");
    }
    assert_eq!(s.final_loss.to_bits(), s2.final_loss.to_bits());
    std::fs::remove_dir_all(&straight).unwrap();
    std::fs::remove_dir_all(&split).unwrap();
}

#[test]
fn training_on_the_sample_beats_random_init_in_knn() {
    let dir = tmpdir("learn");
    let cfg = TrainConfig::default()
        .width(8)
        .projector(vec![256, 256, 256])
        .batch_size(128)
        .epochs(3)
        .max_train(3_000)
        .knn_every(0)
        .knn_bank(3_000)
        .knn_test(1_000);
    let s = run::train(&cfg, &dir, None, &mut Quiet).unwrap();
    println!(
        "kNN {:.3} -> {:.3}, loss {:.1}",
        s.knn_initial, s.knn_final, s.final_loss
    );
    assert!(
        s.knn_final > s.knn_initial + 0.03,
        "kNN {} -> {}",
        s.knn_initial,
        s.knn_final
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect();
    assert!(losses.len() >= 10);
    assert!(
        losses.last().unwrap() < &losses[0],
        "loss did not fall: {losses:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An edit of one tensor in a checkpoint: its shape, type and bytes.
type Change = dyn Fn(&mut Vec<usize>, &mut safetensors::Dtype, &mut Vec<u8>);

#[test]
fn checkpoint_names_follow_torchvision_and_bad_files_are_errors() {
    let dir = tmpdir("names");
    let cfg = tiny().epochs(1);
    run::train(&cfg, &dir, None, &mut Quiet).unwrap();
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    for want in [
        "conv1.weight",
        "bn1.running_mean",
        "bn1.num_batches_tracked",
        "layer4.1.bn2.weight",
        "layer2.0.downsample.0.weight",
        "projector.6.weight",
        "optimizer.momentum.conv1.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    assert_eq!(
        st.tensor("bn1.num_batches_tracked").unwrap().dtype(),
        safetensors::Dtype::I64
    );

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    assert!(matches!(
        checkpoint::load(&junk),
        Err(Error::Checkpoint { .. })
    ));
    assert!(matches!(
        checkpoint::load(&dir.join("missing")),
        Err(Error::Io { .. })
    ));
    // A checkpoint of another architecture does not restore into this one.
    let l = checkpoint::load(&dir.join("checkpoint.safetensors")).unwrap();
    let mut mcfg: ModelConfig = serde_json::from_value(l.state["model"].clone()).unwrap();
    mcfg.backbone.width = 8;
    let mut other = BarlowTwins::new(mcfg, &mut barlow::rng::Rng::new(0)).unwrap();
    let e = l.restore_model(&mut other).unwrap_err();
    assert!(e.to_string().contains("expects"), "{e}");

    // One tensor changed at a time: the same element count in another shape, another type, a
    // NaN. Each is refused, naming the tensor.
    let original = dir.join("checkpoint.safetensors");
    let mcfg: ModelConfig = serde_json::from_value(l.state["model"].clone()).unwrap();
    let cases: [(&str, &Change); 3] = [
        ("shape", &|shape, _, _| shape.reverse()),
        ("type", &|_, dtype, _| *dtype = safetensors::Dtype::I32),
        ("NaN", &|_, _, bytes| {
            bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes())
        }),
    ];
    for (what, change) in cases {
        let bytes = std::fs::read(&original).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut owned: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.dtype(), v.data().to_vec()))
            .collect();
        for t in owned.iter_mut().filter(|t| t.0 == "layer1.0.conv1.weight") {
            change(&mut t.1, &mut t.2, &mut t.3);
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(n, shape, dtype, data)| {
                let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data);
                (n.clone(), view.unwrap())
            })
            .collect();
        let out = safetensors::tensor::serialize(views, meta.metadata().clone()).unwrap();
        let path = dir.join(format!("{what}.safetensors"));
        std::fs::write(&path, out).unwrap();
        let mut m = BarlowTwins::new(mcfg.clone(), &mut barlow::rng::Rng::new(0)).unwrap();
        let e = checkpoint::load(&path)
            .and_then(|l| l.restore_model(&mut m))
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::Checkpoint { .. }) && text.contains("layer1.0.conv1.weight"),
            "{what}: {text}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_and_data_are_clear_errors() {
    let dir = tmpdir("bad");
    let e = run::train(&tiny().batch_size(1), &dir, None, &mut Quiet).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    let e = run::train(&tiny().epochs(0), &dir, None, &mut Quiet).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    let e = run::train(
        &tiny().data("/no/such/place".into()),
        &dir,
        None,
        &mut Quiet,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Dataset { .. }), "{e}");
    let e = run::train(&tiny().max_train(10), &dir, None, &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("fewer than one batch"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cuda_device_says_what_is_missing_and_auto_falls_back_to_the_cpu() {
    use barlow::train::run::{DeviceChoice, Engine, EngineOptions, Precision};
    let gpu_ok = barlow::built_with_kernels()
        && barlow::cuda::device_count().is_ok_and(|n| n > 0)
        && barlow::cuda::cudnn::check_cudnn().is_ok();
    if gpu_ok {
        println!(
            "SKIP: cuda_device_says_what_is_missing_and_auto_falls_back_to_the_cpu: a GPU is present"
        );
        return;
    }
    let dir = tmpdir("nocuda");
    let cfg = tiny().device(DeviceChoice::Cuda);
    let e = run::train(&cfg, &dir, None, &mut Quiet).unwrap_err();
    assert!(e.is_unavailable(), "not an availability error: {e}");
    assert!(!dir.join("checkpoint.safetensors").exists());

    let mut m = BarlowTwins::new(
        ModelConfig::new(
            barlow::nn::resnet::ResNetConfig::new(
                barlow::nn::resnet::Arch::Resnet18,
                barlow::nn::resnet::Stem::Small,
                1,
                4,
            ),
            vec![8, 8, 8],
        )
        .lambda(0.0051),
        &mut barlow::rng::Rng::new(1),
    )
    .unwrap();
    let opt = barlow::train::Lars::new(Default::default());
    let mut said = Vec::new();
    let engine = Engine::open(
        EngineOptions::new(DeviceChoice::Auto, Precision::Bf16),
        &mut m,
        &opt,
        8,
        (1, 28, 28),
        &mut |t| said.push(t.to_string()),
    )
    .unwrap();
    assert!(matches!(engine, Engine::Cpu));
    assert!(
        said.iter()
            .any(|t| t.contains("no usable GPU") && t.contains("CPU")),
        "{said:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_diverging_run_stops_with_an_error_naming_the_step() {
    let out = tmpdir("diverge");
    let cfg = tiny().lr_weights(1e30).lr_biases(1e30).epochs(1);
    let o = out.clone();
    let r = within(300, move || run::train(&cfg, &o, None, &mut Quiet));
    match r {
        Err(e @ Error::Diverged { .. }) => {
            let text = e.to_string();
            assert!(text.contains("training diverged at step"), "{text}");
            assert!(text.contains("--lr-weights"), "{text}");
        }
        other => panic!("expected a divergence error, got {other:?}"),
    }
    // The metrics hold whole lines only, and no checkpoint of the unfinished epoch was written.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    assert!(!out.join("checkpoint.safetensors").exists());
    std::fs::remove_dir_all(&out).unwrap();

    // One step per epoch: the only update is the last, with no loss after it to show the
    // blow-up. The weights (or the features the kNN monitor takes from them) do.
    let last = tmpdir("diverge-last");
    let cfg = tiny()
        .lr_weights(1e30)
        .lr_biases(1e30)
        .epochs(1)
        .warmup_epochs(Some(0))
        .max_train(64);
    let o = last.clone();
    match within(300, move || run::train(&cfg, &o, None, &mut Quiet)) {
        Err(e @ Error::Diverged { .. }) => assert!(e.to_string().contains("diverged"), "{e}"),
        other => panic!("expected a divergence after the last update, got {other:?}"),
    }
    assert!(!last.join("checkpoint.safetensors").exists());
    let _ = std::fs::remove_dir_all(&last);
}

#[test]
fn run_folders_are_claimed_not_shared() {
    // A folder holding another run's files is refused before anything is written into it.
    let out = tmpdir("taken");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{}\n").unwrap();
    let e = run::train(&tiny(), &out, None, &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("already holds a run"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        "{}\n"
    );
    assert!(!out.join(".barlow.lock").exists());
    std::fs::remove_dir_all(&out).unwrap();

    // A lock held by a live process (pid 1 always runs) keeps a run out.
    let busy = tmpdir("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join(".barlow.lock"), "1").unwrap();
    let e = run::train(&tiny(), &busy, None, &mut Quiet).unwrap_err();
    assert!(
        e.to_string().contains("in use by another barlow process"),
        "{e}"
    );
    std::fs::remove_dir_all(&busy).unwrap();

    // A stale lock and a killed writer's temporary are cleaned up; the run goes ahead and
    // leaves no lock behind.
    let stale = tmpdir("stale");
    std::fs::create_dir_all(&stale).unwrap();
    let dead = 2_000_000_000; // above any pid the kernel hands out
    std::fs::write(stale.join(".barlow.lock"), dead.to_string()).unwrap();
    let tmp = stale.join(format!(".checkpoint.safetensors.tmp.{dead}"));
    std::fs::write(&tmp, "partial").unwrap();
    let cfg = tiny().epochs(1).max_train(128);
    run::train(&cfg, &stale, None, &mut Quiet).unwrap();
    assert!(!tmp.exists(), "the stale temporary is still there");
    assert!(!stale.join(".barlow.lock").exists());
    assert!(stale.join("checkpoint.safetensors").is_file());
    std::fs::remove_dir_all(&stale).unwrap();

    // Bad inputs create nothing.
    let never = tmpdir("never");
    let bad = tiny().data("/no/such/dataset".into());
    assert!(run::train(&bad, &never, None, &mut Quiet).is_err());
    assert!(!never.exists(), "a failed start left a folder");
}

/// Asks the run to stop once it has taken `at` steps.
struct StopAt {
    at: usize,
    seen: usize,
}

impl run::Progress for StopAt {
    fn step(&mut self, step: usize, _loss: f64, _rate: f64) {
        self.seen = step;
    }
    fn stop_requested(&self) -> bool {
        self.seen >= self.at
    }
}

#[test]
fn a_stop_request_ends_the_run_after_the_step_keeping_the_last_checkpoint() {
    let out = tmpdir("stop");
    // 10 steps an epoch: stopping after step 12 keeps epoch 1's checkpoint.
    let mut p = StopAt { at: 12, seen: 0 };
    match run::train(&tiny(), &out, None, &mut p) {
        Err(Error::Interrupted {
            step: 12,
            kept: true,
        }) => {}
        other => panic!("expected an interruption after step 12, got {other:?}"),
    }
    let l = checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(l.state["step"].as_u64(), Some(10));
    assert!(!out.join(".barlow.lock").exists());
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
#[cfg(unix)]
fn ctrl_c_stops_the_cli_with_exit_status_130() {
    let out = tmpdir("sigint");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_barlow"))
        .args([
            "train",
            "--width",
            "4",
            "--projector",
            "64,64,64",
            "--epochs",
            "50",
        ])
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(8));
    // SAFETY: sends SIGINT to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed().as_secs() > 180 {
            let _ = child.kill();
            panic!("the run did not stop after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    assert!(!out.join(".barlow.lock").exists());
    // Stopped within the first epoch, the run removed its folder itself.
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_step_far_beyond_the_memory_is_refused_before_it_starts() {
    let out = tmpdir("huge-crop");
    let cfg = tiny().crop(Some(4096)).batch_size(512);
    let e = run::train(&cfg, &out, None, &mut Quiet).unwrap_err();
    assert!(matches!(e, Error::OutOfHostMemory { .. }), "{e}");
    assert!(e.to_string().contains("crop"), "{e}");
    assert!(!out.exists(), "a refused run left a folder");
}

#[test]
fn a_data_thread_failure_ends_the_run_with_an_error() {
    let out = tmpdir("data-thread");
    let mut cfg = tiny().epochs(1);
    cfg.inject_data_failure = Some(3);
    let o = out.clone();
    match within(300, move || run::train(&cfg, &o, None, &mut Quiet)) {
        Err(e @ Error::Dataset { .. }) => assert!(e.to_string().contains("data thread"), "{e}"),
        other => panic!("expected a data-thread error, got {other:?}"),
    }
    assert!(!out.join(".barlow.lock").exists());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_resumed_run_records_each_step_once_and_a_stop_before_any_checkpoint_leaves_nothing() {
    let out = tmpdir("dedupe");
    // Stopped after step 12 of 20: epoch 1's checkpoint (step 10) is kept, steps 11 and 12 are
    // in the metrics and will be taken again.
    let mut p = StopAt { at: 12, seen: 0 };
    assert!(run::train(&tiny(), &out, None, &mut p).is_err());
    let ckpt = out.join("checkpoint.safetensors");
    run::train(&tiny(), &out, Some(&run::Resume::new(&ckpt)), &mut Quiet).unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    std::fs::remove_dir_all(&out).unwrap();

    // Stopped within the first epoch: nothing to resume, so nothing is left in the way.
    let early = tmpdir("early-stop");
    let mut p = StopAt { at: 3, seen: 0 };
    match run::train(&tiny(), &early, None, &mut p) {
        Err(
            e @ Error::Interrupted {
                step: 3,
                kept: false,
            },
        ) => {
            assert!(e.to_string().contains("no checkpoint"), "{e}")
        }
        other => panic!("expected an interruption without a checkpoint, got {other:?}"),
    }
    assert!(!early.exists(), "the stopped run left its folder");
    run::train(&tiny().epochs(1), &early, None, &mut Quiet).unwrap();
    std::fs::remove_dir_all(&early).unwrap();
}
