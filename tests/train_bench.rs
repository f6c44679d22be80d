//! `barlow bench train` on the CPU: the step timed, and its breakdown by kind of operation
//! (every backend call timed and its work counted, LARS, the rest of the step).
#![cfg(feature = "train")]

use barlow::nn::resnet::{Arch, Stem};
use barlow::train::bench::{read_rows, render, run, TrainBench};
use barlow::train::run::DeviceChoice;

fn tiny() -> TrainBench {
    let mut b = TrainBench::small();
    b.arch = Arch::Resnet18;
    b.stem = Stem::Small;
    b.image = 8;
    b.batch = 4;
    b.width = 4;
    b.projector = vec![16, 16, 16];
    b.device = DeviceChoice::Cpu;
    b.warmup = 1;
    b.steps = 2;
    b.profile_steps = 2;
    b
}

#[test]
fn the_cpu_step_is_broken_down_by_operation() {
    let row = run(&tiny(), &mut |_| {}).unwrap();
    assert!(row.step_ms_median.unwrap() > 0.0);
    assert!(row.images_per_s.unwrap().is_finite());
    let ms = row.breakdown_ms.clone().unwrap();
    for kind in [
        "conv forward",
        "conv backward",
        "linear forward",
        "linear backward",
        "batch norm statistics",
        "batch norm apply",
        "batch norm backward",
        "LARS",
        "loss, ReLU, pooling, adds, copies",
        "augment (CPU threads, per batch)",
    ] {
        let v = ms.get(kind).copied();
        assert!(
            v.is_some_and(|v| v.is_finite() && v >= 0.0),
            "{kind}: {v:?}"
        );
    }
    let gflops = row.breakdown_gflops.clone().unwrap();
    for kind in ["conv forward", "conv backward", "linear forward"] {
        assert!(gflops[kind] > 0.0 && gflops[kind].is_finite(), "{kind}");
    }
    assert!(!gflops.contains_key("LARS"));
    let table = render(std::slice::from_ref(&row));
    assert!(
        table.contains("GFLOP/s") && table.contains("conv backward"),
        "{table}"
    );
    // The JSON line keeps the rates (to the last digit or so: JSON floats are decimal).
    let back = read_rows(&serde_json::to_string(&row).unwrap()).unwrap();
    let read = back[0].breakdown_gflops.clone().unwrap();
    assert_eq!(read.len(), gflops.len());
    for (kind, v) in &gflops {
        assert!(
            (read[kind] - v).abs() <= 1e-12 * v.abs(),
            "{kind}: {} vs {v}",
            read[kind]
        );
    }
}
