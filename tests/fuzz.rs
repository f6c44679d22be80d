//! Bounded mutation fuzzing that runs on stable Rust, in every test run. Each target starts from
//! the checked-in corpus of bad files (`tests/corpus/<target>/`) plus valid seeds made here,
//! mutates them with a seeded generator (bit flips, boundary bytes, 32-bit integers overwritten
//! with extreme values, truncation, duplication) and feeds every mutant to the reader. Any error
//! is fine; a panic fails the test and names the mutant, saved under the temporary folder for
//! replay. An abort or a hang would take the whole binary down, so they fail it too.
//!
//! `BARLOW_FUZZ_ITERS` sets the mutants per target (default 2000).
#![cfg(feature = "train")]

use barlow::rng::Rng;
use barlow::train::{checkpoint, data, BarlowTwins, Lars, LarsConfig, ModelConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn iterations() -> usize {
    std::env::var("BARLOW_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// What a run does with a dataset it could open: statistics, a crop size, views of two images.
fn use_dataset(d: &data::Dataset) {
    if d.is_empty() {
        return;
    }
    let _ = d.pixel_stats();
    let cfg = barlow::train::augment::AugmentConfig::for_dataset(d, None);
    let idx: Vec<usize> = (0..d.len().min(2)).collect();
    let _ = barlow::train::augment::eval_batch(d, &idx, &cfg);
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn scratch(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barlow-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    let edits = 1 + (rng.next_u64() % 4) as usize;
    for _ in 0..edits {
        let r = rng.next_u64();
        let at = if v.is_empty() {
            0
        } else {
            (r >> 8) as usize % v.len()
        };
        match r % 6 {
            0 if !v.is_empty() => v[at] ^= 1 << ((r >> 40) % 8),
            1 if !v.is_empty() => v[at] = [0, 1, 0x7f, 0x80, 0xff][(r >> 40) as usize % 5],
            2 if v.len() >= 4 => {
                let at = at.min(v.len() - 4);
                let x: u32 =
                    [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 65_536][(r >> 40) as usize % 6];
                let bytes = if r & (1 << 50) != 0 {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                };
                v[at..at + 4].copy_from_slice(&bytes);
            }
            3 => v.truncate(at),
            4 if !v.is_empty() => {
                let end = (at + 1 + (r >> 40) as usize % 64).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ => v.push((r >> 32) as u8),
        }
    }
    v
}

/// Feeds `iterations()` mutants of the seeds to `read`; a panic fails with the mutant saved.
fn fuzz(target: &str, seeds: Vec<Vec<u8>>, mut read: impl FnMut(&[u8])) {
    assert!(!seeds.is_empty());
    let mut rng = Rng::new(0xf022 ^ target.len() as u64);
    // The seeds themselves first (the checked-in bad files are regression cases).
    let mut inputs: Vec<Vec<u8>> = seeds.clone();
    for i in 0..iterations() {
        inputs.push(mutate(&mut rng, &seeds[i % seeds.len()]));
    }
    for (i, input) in inputs.iter().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| read(input))).is_err() {
            let keep = std::env::temp_dir().join(format!("barlow-fuzz-{target}-crash-{i}"));
            std::fs::write(&keep, input).unwrap();
            panic!(
                "{target}: input {i} panicked the reader; saved to {}",
                keep.display()
            );
        }
    }
}

fn idx_file(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

#[test]
fn idx_reader_survives_mutants() {
    let labels = idx_file(&[2], &[3, 4]);
    let mut seeds = corpus("idx");
    seeds.push(idx_file(&[2, 3, 3], &[9; 18]));
    fuzz("idx", seeds, |images| {
        if let Ok(d) = data::idx_from_bytes("fuzz", images, &labels) {
            use_dataset(&d);
        }
        let _ = data::idx_from_bytes("fuzz", &labels, images);
    });
}

#[test]
fn cifar_reader_survives_mutants() {
    let dir = scratch("cifar");
    fuzz("cifar", corpus("cifar"), |batch| {
        std::fs::write(dir.join("test_batch.bin"), batch).unwrap();
        if let Ok(d) = data::cifar_bin(&dir, false) {
            use_dataset(&d);
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_folder_scan_survives_mutants() {
    let dir = scratch("images");
    let mut seeds = corpus("images");
    let mut png = Vec::new();
    image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut jpg = Vec::new();
    image::RgbImage::from_fn(9, 8, |x, y| image::Rgb([x as u8 * 20, 50, y as u8 * 25]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    seeds.extend([png.clone(), jpg]);
    let class = dir.join("class");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("good.png"), &png).unwrap();
    fuzz("images", seeds, |bytes| {
        for ext in ["png", "jpg"] {
            std::fs::write(class.join(format!("mutant.{ext}")), bytes).unwrap();
            for budget in [usize::MAX, 0] {
                if let Ok(d) = data::image_folder(&dir, budget) {
                    use_dataset(&d);
                }
            }
            std::fs::remove_file(class.join(format!("mutant.{ext}"))).unwrap();
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn checkpoint_loader_survives_mutants() {
    let dir = scratch("checkpoint");
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "backbone": {"arch": "resnet18", "stem": "small", "in_channels": 1, "width": 2},
        "projector": [8, 8],
        "lambda": 0.0051
    }))
    .unwrap();
    let mut model = BarlowTwins::new(cfg.clone(), &mut Rng::new(1)).unwrap();
    let good = dir.join("good.safetensors");
    let state = serde_json::json!({"model": cfg, "step": 3});
    checkpoint::save(&good, &mut model, &Lars::new(LarsConfig::default()), &state).unwrap();
    let mut seeds = corpus("checkpoint");
    seeds.push(std::fs::read(&good).unwrap());
    let path = dir.join("mutant.safetensors");
    fuzz("checkpoint", seeds, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let Ok(l) = checkpoint::load(&path) else {
            return;
        };
        let _ = l.restore_model(&mut model);
        let mut opt = Lars::new(LarsConfig::default());
        let _ = l.restore_optimizer(&mut model, &mut opt);
        // A model sized from the metadata is checked before it is built.
        if let Ok(c) = serde_json::from_value::<ModelConfig>(l.state["model"].clone()) {
            if c.check().is_ok() && c.backbone.width <= 8 && c.projector.iter().all(|&p| p <= 64) {
                let _ = BarlowTwins::new(c, &mut Rng::new(2));
            }
        }
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
