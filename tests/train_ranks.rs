//! Whole data-parallel runs on the CPU twin (ranks as threads of this process): W ranks take the
//! steps of one rank on the whole batch, rank 0 alone writes the run folder, a run resumes
//! exactly (on the same number of ranks, or on another), and failures end every rank.
#![cfg(feature = "train")]

mod common;

use barlow::train::checkpoint;
use barlow::train::ranks::Ranks;
use barlow::train::run::{self, Progress, Quiet, TrainConfig};
use barlow::Error;
use common::within;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barlow-ranks-{name}-{}", std::process::id()));
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
        // At the default peak rate this tiny network amplifies rounding differences a hundredfold
        // per step; at a tenth of it the runs stay within float rounding of each other.
        .lr_weights(0.02)
}

/// The metrics file's lines, by event.
fn events(dir: &Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == event)
        .collect()
}

fn losses(dir: &Path) -> Vec<f64> {
    events(dir, "step")
        .iter()
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// Every parameter, buffer and momentum of a checkpoint, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    use barlow::nn::Visit;
    let l = checkpoint::load(path).unwrap();
    let mcfg: barlow::train::ModelConfig =
        serde_json::from_value(l.state["model"].clone()).unwrap();
    let mut m = barlow::train::BarlowTwins::new(mcfg, &mut barlow::rng::Rng::new(99)).unwrap();
    l.restore_model(&mut m).unwrap();
    let mut out = Vec::new();
    m.params_mut(&mut |p| out.push((p.name.clone(), p.value.clone())));
    m.buffers_mut(&mut |b| out.push((b.name.clone(), b.value.clone())));
    let mut opt = barlow::train::Lars::new(Default::default());
    l.restore_optimizer(&mut m, &mut opt).unwrap();
    out.extend(
        opt.momentum
            .into_iter()
            .map(|(n, v)| (format!("mu.{n}"), v)),
    );
    out
}

fn world_of(path: &Path) -> u64 {
    checkpoint::load(path).unwrap().state["world"]
        .as_u64()
        .unwrap()
}

#[derive(Default)]
struct Said(Vec<String>);
impl Progress for Said {
    fn message(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

#[test]
fn two_cpu_ranks_take_the_steps_of_one_rank_and_resume_exactly() {
    // One epoch on one rank and on two. Only the first epoch is compared across rank counts: in
    // the second, at the warm-up's higher rates, runs whose rounding differs (as it does with the
    // split of the batch) part as any two trainings do — seen here as one step's loss moving by
    // 1e-5 after the step before agreed to 1e-8, then 1e-3 within a few steps. A rank out of step
    // differs from the first step on.
    let one = tmpdir("one");
    let split = tmpdir("split");
    let s1 = run::train(&tiny().epochs(1), &one, None, &mut Quiet).unwrap();
    let mut said = Said::default();
    let s2 = run::train_with(
        &tiny().epochs(1),
        &Ranks::CpuThreads(2),
        &split,
        None,
        &mut said,
    )
    .unwrap();
    assert_eq!((s1.steps, s2.steps), (10, 10));
    assert!(
        said.0.iter().any(|m| m.contains("2 ranks of 32 images")),
        "{:?}",
        said.0
    );
    let (l1, l2) = (losses(&one), losses(&split));
    assert_eq!(l2.len(), 10);
    for (i, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "step {}: one rank {a}, two ranks {b}",
            i + 1
        );
    }
    let ckpt = split.join("checkpoint.safetensors");
    assert_eq!(world_of(&ckpt), 2);
    assert_eq!(world_of(&one.join("checkpoint.safetensors")), 1);
    let (t1, t2) = (tensors(&one.join("checkpoint.safetensors")), tensors(&ckpt));
    assert_eq!(t1.len(), t2.len());
    for ((n1, a), (n2, b)) in t1.iter().zip(&t2) {
        assert_eq!(n1, n2);
        let norm = a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        // Floored: small biases move by rounding-sized steps of their own. The momentum sums
        // the gradients of the batch norms' parameters, sums over every pixel that cancel to a
        // thousandth of their terms, so another split of the batch moves its last digits more.
        let tol = if n1.starts_with("mu.") { 1e-2 } else { 1e-4 };
        assert!(
            diff <= tol * norm.max(0.1),
            "{n1}: difference {diff:.3e} of norm {norm:.3e} after 10 steps"
        );
    }

    // Two epochs straight on two ranks: rank 0 alone wrote, one line per step and evaluation.
    let two = tmpdir("two");
    let full = run::train_with(&tiny(), &Ranks::CpuThreads(2), &two, None, &mut Quiet).unwrap();
    assert_eq!(full.steps, 20);
    let lfull = losses(&two);
    assert_eq!(lfull.len(), 20);
    assert_eq!(events(&two, "knn").len(), 3);
    assert_eq!(
        &lfull[..10],
        &l2[..],
        "the same two ranks take the same first epoch"
    );

    // Stopped after one epoch and resumed on two ranks: bit-identical to the straight run.
    let r = run::train_with(
        &tiny(),
        &Ranks::CpuThreads(2),
        &split,
        Some(&run::Resume::new(&ckpt).epochs(Some(2))),
        &mut Quiet,
    )
    .unwrap();
    assert_eq!(r.final_loss.to_bits(), full.final_loss.to_bits());
    let straight = tensors(&two.join("checkpoint.safetensors"));
    let resumed = tensors(&ckpt);
    for ((n, a), (_, b)) in straight.iter().zip(&resumed) {
        assert!(a == b, "{n} differs after resuming on two ranks");
    }
    assert_eq!(losses(&split), lfull);

    // Resumed on one rank from the two-rank checkpoint of epoch 1: said, and the same run (its
    // first step from the same parameters agrees to rounding; later ones part as above).
    let again = tmpdir("again");
    run::train_with(
        &tiny().epochs(1),
        &Ranks::CpuThreads(2),
        &again,
        None,
        &mut Quiet,
    )
    .unwrap();
    let ckpt = again.join("checkpoint.safetensors");
    let mut said = Said::default();
    let r = run::train(
        &tiny(),
        &again,
        Some(&run::Resume::new(&ckpt).epochs(Some(2))),
        &mut said,
    )
    .unwrap();
    assert!(
        said.0.iter().any(|m| m.contains("written by 2 rank(s)")),
        "{:?}",
        said.0
    );
    assert_eq!(r.steps, 20);
    let la = losses(&again);
    assert_eq!(la.len(), 20);
    assert!(
        (la[10] - lfull[10]).abs() <= 1e-6 * lfull[10].abs(),
        "step 11 on one rank {} after two ranks' epoch, {} on two",
        la[10],
        lfull[10]
    );
    assert_eq!(world_of(&ckpt), 1);
    for d in [one, two, split, again] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn a_failing_rank_ends_the_run_with_its_error() {
    let out = tmpdir("fail");
    let mut cfg = tiny().epochs(1);
    cfg.inject_data_failure = Some(2);
    let o = out.clone();
    let r = within(300, move || {
        run::train_with(&cfg, &Ranks::CpuThreads(2), &o, None, &mut Quiet)
    });
    match r {
        Err(Error::Dataset { reason, .. }) => assert!(reason.contains("panicked"), "{reason}"),
        other => panic!("expected the data thread's error, got {other:?}"),
    }
    // Every rank diverges at the same step (they share the loss): the run ends, typed.
    let diverge = tmpdir("diverge");
    let cfg = tiny()
        .epochs(1)
        .lr_weights(1e30)
        .lr_biases(1e30)
        .batch_size(63);
    let o = diverge.clone();
    let r = within(300, move || {
        run::train_with(&cfg, &Ranks::CpuThreads(3), &o, None, &mut Quiet)
    });
    assert!(matches!(r, Err(Error::Diverged { .. })), "{r:?}");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&diverge);
}

#[test]
fn bad_rank_settings_are_errors_that_say_so() {
    let dir = tmpdir("bad");
    let e = run::train_with(&tiny(), &Ranks::CpuThreads(3), &dir, None, &mut Quiet).unwrap_err();
    assert!(
        e.to_string().contains("does not split evenly over 3 ranks"),
        "{e}"
    );
    let e = run::train_with(&tiny(), &Ranks::CpuThreads(0), &dir, None, &mut Quiet).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig(_)), "{e}");
    // GPU ranks never fall back to the CPU.
    let e = run::train_with(&tiny(), &Ranks::Gpus(2), &dir, None, &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("--device cuda"), "{e}");
    let launch = barlow::collective::Launch::from_vars(|k| {
        [("WORLD_SIZE", "2"), ("RANK", "1")]
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap()
    .unwrap();
    let e = run::train_with(&tiny(), &Ranks::Launched(launch), &dir, None, &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("--device cuda"), "{e}");
    assert!(!dir.exists(), "a refused run created its folder");
}
