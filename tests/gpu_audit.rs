//! The launch audit, on the virtual CUDA device only: `scripts/test-vgpu.sh` runs this file with
//! `VGPU_LAUNCH_LOG` (every launch's grid, block and shared memory, by kernel name) and
//! `VGPU_SKIP_COMPUTE=1` (kernels and GEMMs recorded, not run), so the loss can be driven at the
//! paper's shapes, far beyond what the host emulates. It checks how many blocks each kernel
//! launches there against an H100's 132 SMs, and that growing the loss's workspace keeps its
//! cuBLAS handle. What it cannot see, the speed of anything, only a GPU shows.
#![cfg(feature = "cuda")]
// The two tests read one log from offsets: scripts/test-vgpu.sh runs them one at a time
// (RUST_TEST_THREADS=1).

mod common;

use barlow::cuda::cudarc::driver::CudaStream;
use barlow::{BarlowTwinsLoss, Dims, LossConfig, LossPath, Math};
use common::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Two blocks per SM of an H100 (132 SMs): less leaves SMs idle or without a second block to
/// hide latency.
const MIN_BLOCKS: u64 = 2 * 132;

/// Kernels that may launch fewer blocks at the paper's shapes, and why.
const FIXED_WORK: &[(&str, &str)] = &[
    (
        "loss_reduce_final",
        "sums one pair of partial sums per block of the partial pass (4,096 at D = 8,192), one \
         block, in a fixed order",
    ),
    (
        "gram_final",
        "sums the partial blocks' dots and D diagonal terms (O(D), a few microseconds' work), \
         one block, in a fixed order",
    ),
];

/// Kernels known to be too narrow for an H100 at the paper's shapes, to be widened (rows split
/// across blocks). Listed so that the audit fails when a new kernel is narrow or one of these
/// is widened without leaving this list.
const TOO_NARROW_YET: &[&str] = &[
    "standardize_bwd_f32",
    "standardize_fwd_f32_bf16",
    "standardize_fwd_f32_f32",
];

/// The audit log, or `None` (and a SKIP line) when this is not an audited virtual-device run.
fn audit(test: &str) -> Option<(Arc<CudaStream>, PathBuf)> {
    let Some(path) = std::env::var_os("VGPU_LAUNCH_LOG").map(PathBuf::from) else {
        println!(
            "SKIP: {test}: the launch audit runs on the virtual device (scripts/test-vgpu.sh)"
        );
        return None;
    };
    let s = gpu(test)?;
    if !barlow::cuda::is_virtual(s.context()) {
        println!("SKIP: {test}: VGPU_LAUNCH_LOG is set but the device is not the virtual one");
        return None;
    }
    Some((s, path))
}

/// The log's lines from byte `from` on.
fn lines_from(path: &PathBuf, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text[from.min(text.len())..]
        .lines()
        .map(str::to_string)
        .collect()
}

fn log_len(path: &PathBuf) -> usize {
    std::fs::metadata(path).map_or(0, |m| m.len() as usize)
}

/// One launch: kernel, blocks, threads per block, dynamic shared bytes.
fn launches(lines: &[String]) -> Vec<(String, u64, u64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.first() != Some(&"launch") || f.len() != 9 {
                return None;
            }
            let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
            Some((
                f[1].to_string(),
                n(2) * n(3) * n(4),
                n(5) * n(6) * n(7),
                n(8),
            ))
        })
        .collect()
}

#[test]
fn loss_kernels_fill_an_h100_at_the_papers_shapes() {
    let Some((s, log)) = audit("loss_kernels_fill_an_h100_at_the_papers_shapes") else {
        return;
    };
    let mut rng = Rng::new(7);
    // kernel -> (fewest blocks of any launch at the paper's shapes, threads, where)
    let mut table: BTreeMap<String, (u64, u64, String)> = BTreeMap::new();
    for (n, d) in [(2048, 8192), (2048, 2048)] {
        let dims = Dims::new(n, d);
        // Random inputs once per shape: only the launches are audited.
        let za = rng.matrix(n, d);
        let zb = rng.correlated(&za, 0.5);
        let (a, b) = (s.clone_htod(&za).unwrap(), s.clone_htod(&zb).unwrap());
        let mut dza = s.alloc_zeros::<f32>(n * d).unwrap();
        let mut dzb = s.alloc_zeros::<f32>(n * d).unwrap();
        for math in [Math::F32, Math::Tf32, Math::Bf16] {
            for path in [LossPath::Direct, LossPath::Gram] {
                let loss =
                    BarlowTwinsLoss::new(LossConfig::default().math(math).path(path)).unwrap();
                let from = log_len(&log);
                // The value is not computed (kernels skipped); the launches are what counts.
                let _ = loss.forward_backward(&s, &a, &b, dims, &mut dza, &mut dzb);
                s.synchronize().unwrap();
                let seen = launches(&lines_from(&log, from));
                assert!(
                    !seen.is_empty(),
                    "N={n} D={d} {math:?} {path:?}: no launch recorded"
                );
                for (k, blocks, threads, _) in seen {
                    let at = format!("N={n} D={d} {math:?} {path:?}");
                    let e = table.entry(k).or_insert((u64::MAX, threads, at.clone()));
                    if blocks < e.0 {
                        *e = (blocks, threads, at);
                    }
                }
            }
        }
    }
    println!("\nkernel                               fewest blocks  threads  where");
    let mut narrow = Vec::new();
    for (k, (blocks, threads, at)) in &table {
        let fixed = FIXED_WORK.iter().find(|(f, _)| f == k);
        let mark = match fixed {
            Some((_, why)) => format!("  (fixed work: {why})"),
            None if *blocks < MIN_BLOCKS => {
                narrow.push(k.clone());
                "  <-- under 2 blocks per SM".into()
            }
            None => String::new(),
        };
        println!("{k:<36} {blocks:>13}  {threads:>7}  {at}{mark}");
    }
    let mut expected: Vec<String> = TOO_NARROW_YET.iter().map(|s| s.to_string()).collect();
    expected.sort();
    narrow.sort();
    assert_eq!(
        narrow, expected,
        "kernels under {MIN_BLOCKS} blocks at the paper's shapes (left) against the list of those \
         known to be (right)"
    );
}

#[test]
fn growing_the_workspace_keeps_the_cublas_handle() {
    let Some((s, log)) = audit("growing_the_workspace_keeps_the_cublas_handle") else {
        return;
    };
    let mut rng = Rng::new(8);
    let from = log_len(&log);
    let loss = BarlowTwinsLoss::new(LossConfig::default().path(LossPath::Direct)).unwrap();
    // Each shape needs a larger workspace than the last.
    for (n, d) in [(16, 8), (64, 40), (300, 129)] {
        let dims = Dims::new(n, d);
        let za = rng.matrix(n, d);
        let (a, b) = (s.clone_htod(&za).unwrap(), s.clone_htod(&za).unwrap());
        let mut dza = s.alloc_zeros::<f32>(n * d).unwrap();
        let mut dzb = s.alloc_zeros::<f32>(n * d).unwrap();
        let _ = loss.forward_backward(&s, &a, &b, dims, &mut dza, &mut dzb);
    }
    s.synchronize().unwrap();
    let events: Vec<String> = lines_from(&log, from)
        .into_iter()
        .filter(|l| l.starts_with("event cublas"))
        .collect();
    assert_eq!(
        events,
        vec!["event cublasCreate".to_string()],
        "three workspace sizes: one cuBLAS handle, never destroyed while the loss lives"
    );
}
