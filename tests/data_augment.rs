//! Dataset readers (built-in sample, IDX, CIFAR-10 binary, ImageFolder with corrupt files) and
//! the augmentations' geometry.
#![cfg(feature = "cli")]

mod common;

use barlow::train::augment::{self, crop_params, resize_crop, AugmentConfig, Crop, VIEW_A};
use barlow::train::data::{self, Image};
use barlow::Error;
use common::{within, Rng};
use std::path::PathBuf;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barlow-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn builtin_sample_is_balanced_fashion_mnist() {
    let s = data::open("builtin", data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (10_000, 2_000));
    let img = s.train.image(0);
    assert_eq!((img.h, img.w, img.c), (28, 28, 1));
    for c in 0..10u32 {
        assert_eq!(s.train.labels.iter().filter(|&&l| l == c).count(), 1000);
        assert_eq!(s.test.labels.iter().filter(|&&l| l == c).count(), 200);
    }
    assert_eq!(s.train.classes[9], "boot");
    let (mean, std) = s.train.pixel_stats();
    // Fashion-MNIST: mean ≈ 0.286, std ≈ 0.353.
    assert!(
        (mean[0] - 0.286).abs() < 0.02 && (std[0] - 0.353).abs() < 0.02,
        "{mean:?} {std:?}"
    );
}

fn idx(magic_dims: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, magic_dims];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

#[test]
fn idx_reader_accepts_plain_files_and_rejects_bad_ones() {
    let imgs = idx(3, &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let labels = idx(1, &[2], &[7, 3]);
    let d = data::idx_from_bytes("t", &imgs, &labels).unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d.image(1).data, vec![7, 8, 9, 10, 11, 12]);
    assert_eq!(d.dims(1), (2, 3));
    assert_eq!(d.labels, vec![7, 3]);

    let bad = |i: &[u8], l: &[u8]| match data::idx_from_bytes("t", i, l) {
        Err(Error::Dataset { reason, .. }) => reason,
        other => panic!("expected a dataset error, got {other:?}"),
    };
    assert!(bad(&[1, 2, 3], &labels).contains("magic"));
    assert!(bad(&imgs[..15], &labels).contains("truncated"));
    assert!(bad(&imgs, &idx(1, &[3], &[1, 2, 3])).contains("do not match"));
    assert!(bad(&idx(3, &[0, 2, 2], &[]), &idx(1, &[0], &[])).contains("no images"));
}

#[test]
fn cifar_binary_batches_are_read_channel_planar() {
    let dir = tmpdir("cifar");
    let mut rec = vec![4u8];
    rec.extend((0..3072).map(|i| (i / 1024) as u8 * 100 + (i % 1024 % 7) as u8));
    std::fs::write(
        dir.join("data_batch_1.bin"),
        [rec.clone(), rec.clone()].concat(),
    )
    .unwrap();
    std::fs::write(dir.join("test_batch.bin"), &rec).unwrap();
    let s = data::open(dir.to_str().unwrap(), data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (2, 1));
    let px = s.train.image(0).data.clone();
    // Pixel 0: R from plane 0, G from plane 1, B from plane 2.
    assert_eq!(&px[..3], &[0, 100, 200]);
    assert_eq!(s.train.labels, vec![4, 4]);
    std::fs::write(dir.join("test_batch.bin"), &rec[..100]).unwrap();
    assert!(matches!(
        data::open(dir.to_str().unwrap(), data::DEFAULT_IMAGE_MEMORY),
        Err(Error::Dataset { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_folder_skips_corrupt_files_and_reports_empty_sets() {
    let dir = tmpdir("folder");
    for (ci, class) in ["cat", "ant", "bee"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for k in 0..4 {
            let img = image::RgbImage::from_fn(6, 5, |x, y| {
                image::Rgb([x as u8 * 10, y as u8 * 20, (ci * 50 + k) as u8])
            });
            img.save(dir.join(class).join(format!("{k}.png"))).unwrap();
        }
    }
    std::fs::write(dir.join("bee").join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::write(dir.join("bee").join("notes.txt"), b"ignored").unwrap();
    let d = data::image_folder(&dir, data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!(d.classes, vec!["ant", "bee", "cat"]);
    assert_eq!((d.len(), d.skipped), (12, 1));
    let i0 = d.image(0);
    assert_eq!((i0.h, i0.w, i0.c), (5, 6, 3));
    // A single folder of classes: every 10th image is held out.
    let s = data::open(dir.to_str().unwrap(), data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (11, 1));

    let empty = tmpdir("empty");
    assert!(matches!(
        data::image_folder(&empty, data::DEFAULT_IMAGE_MEMORY),
        Err(Error::Dataset { .. })
    ));
    std::fs::create_dir_all(empty.join("only-class")).unwrap();
    let e = data::image_folder(&empty, data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("no .jpg"), "{e}");
    assert!(matches!(
        data::open("/no/such/dataset", data::DEFAULT_IMAGE_MEMORY),
        Err(Error::Dataset { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&empty).unwrap();
}

#[test]
fn large_image_folders_stream_from_disk_with_the_same_pixels_and_views() {
    let dir = tmpdir("streamed");
    for (ci, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for k in 0..5 {
            let img = image::RgbImage::from_fn(9 + k, 7, |x, y| {
                image::Rgb([
                    (x * 20) as u8,
                    (y * 30) as u8,
                    (ci * 90 + k as usize * 7) as u8,
                ])
            });
            img.save(dir.join(class).join(format!("{k}.png"))).unwrap();
        }
        // A grayscale file among RGB ones is converted, as in memory.
        image::GrayImage::from_fn(8, 8, |x, _| image::Luma([x as u8 * 9]))
            .save(dir.join(class).join("gray.png"))
            .unwrap();
    }
    std::fs::write(dir.join("b").join("broken.jpg"), b"not a jpeg").unwrap();
    let mem = data::image_folder(&dir, usize::MAX).unwrap();
    let disk = data::image_folder(&dir, 0).unwrap();
    assert!(!mem.is_streamed() && disk.is_streamed());
    assert_eq!((disk.len(), disk.skipped), (mem.len(), mem.skipped));
    assert_eq!((disk.len(), disk.skipped), (12, 1));
    assert_eq!(disk.labels, mem.labels);
    assert_eq!(disk.channels(), 3);
    for i in 0..mem.len() {
        assert_eq!(disk.dims(i), mem.dims(i));
        assert_eq!(*disk.image(i), *mem.image(i), "image {i}");
    }
    assert_eq!(disk.pixel_stats(), mem.pixel_stats());
    let cfg = AugmentConfig::for_dataset(&mem, Some(6));
    let idx = [0, 3, 7, 11];
    let (a1, b1) = augment::two_views(&mem, &idx, &cfg, 4, 1);
    let (a2, b2) = augment::two_views(&disk, &idx, &cfg, 4, 1);
    assert_eq!((a1, b1), (a2, b2), "views differ between memory and disk");
    let sub = disk.clone().subsample(5);
    assert!(sub.is_streamed() && sub.len() == 5);

    // A file that stops decoding after opening: a gray stand-in, counted once per file, no
    // panic; a selection of the dataset keeps its own count.
    std::fs::write(dir.join("a").join("0.png"), b"truncated").unwrap();
    let gone = disk.image(0);
    assert_eq!((gone.h, gone.w, gone.c), (7, 9, 3));
    assert!(gone.data.iter().all(|&v| v == 128));
    let _ = disk.image(0);
    assert_eq!(disk.decode_failures(), 1);
    assert_eq!(sub.decode_failures(), 0);
    // A body that is corrupt behind a readable header is found on use, the same way.
    let mut png = std::fs::read(dir.join("a").join("1.png")).unwrap();
    let cut = png.len() - 20;
    png[cut..].iter_mut().for_each(|b| *b ^= 0x5a);
    let late = tmpdir("streamed-late");
    std::fs::create_dir_all(late.join("x")).unwrap();
    std::fs::write(late.join("x").join("bad.png"), &png).unwrap();
    std::fs::copy(dir.join("b").join("1.png"), late.join("x").join("good.png")).unwrap();
    let streamed = data::image_folder(&late, 0).unwrap();
    let in_memory = data::image_folder(&late, usize::MAX).unwrap();
    assert_eq!(streamed.len(), 2, "the header reads, so the file is listed");
    let _ = streamed.image(0);
    assert_eq!(streamed.decode_failures(), 1);
    assert_eq!((in_memory.len(), in_memory.skipped), (1, 1));
    std::fs::remove_dir_all(&late).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shared_cifar10_jpegs_load_as_an_image_folder() {
    let tarball = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/cifar10-jpg.tar.gz"
    );
    if !std::path::Path::new(tarball).is_file() {
        println!("SKIP: shared_cifar10_jpegs_load_as_an_image_folder: {tarball} not present");
        return;
    }
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-data"));
    if !dir.join("cifar10/test").is_dir() {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = std::process::Command::new("tar")
            .args(["xzf", tarball, "-C"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar failed");
    }
    let s = data::open(
        dir.join("cifar10").to_str().unwrap(),
        data::DEFAULT_IMAGE_MEMORY,
    )
    .unwrap();
    assert_eq!(
        (s.train.len(), s.test.len(), s.train.skipped),
        (50_000, 10_000, 0)
    );
    assert_eq!(s.train.classes.len(), 10);
    assert_eq!((s.train.dims(0).0, s.train.channels()), (32, 3));
}

#[test]
fn crops_stay_inside_the_image_with_area_and_ratio_in_range() {
    let mut rng = Rng::new(1);
    for &(h, w) in &[(28, 28), (32, 32), (224, 300), (500, 375), (10, 90)] {
        for _ in 0..500 {
            let c = crop_params(&mut rng, h, w, (0.08, 1.0));
            assert!(
                c.h > 0 && c.w > 0 && c.top + c.h <= h && c.left + c.w <= w,
                "{c:?} in {h}x{w}"
            );
            let frac = (c.h * c.w) as f64 / (h * w) as f64;
            let ratio = c.w as f64 / c.h as f64;
            // Rounding to whole pixels moves small crops a little outside the ranges.
            let slack = 2.0 / (h.min(w) as f64);
            let fallback = c.top == (h - c.h) / 2 && c.left == (w - c.w) / 2;
            if !fallback {
                assert!(
                    frac > 0.08 - 3.0 * slack && frac <= 1.0,
                    "area {frac} for {c:?}"
                );
                assert!(
                    ratio > 0.75 * (1.0 - slack) - 0.1 && ratio < 4.0 / 3.0 * (1.0 + slack) + 0.1,
                    "ratio {ratio}"
                );
            }
        }
    }
    // A very wide image: the fallback crop keeps the 4:3 limit, centred.
    let mut stuck = Rng::new(2);
    let c = crop_params(&mut stuck, 10, 1000, (0.99, 1.0));
    assert_eq!((c.h, c.w), (10, 13));
    assert_eq!(c.left, (1000 - 13) / 2);
}

#[test]
fn bicubic_resize_is_exact_on_identity_and_constants_and_antialiases() {
    let mut rng = Rng::new(3);
    let (h, w, c) = (9, 7, 3);
    let img: Vec<f32> = (0..h * w * c).map(|_| rng.uniform() as f32).collect();
    // Identity: a crop of the whole image to its own size (square here).
    let sq: Vec<f32> = img[..7 * 7 * c].to_vec();
    let out = resize_crop(
        &sq,
        7,
        c,
        Crop {
            top: 0,
            left: 0,
            h: 7,
            w: 7,
        },
        7,
    );
    assert!(out.iter().zip(&sq).all(|(a, b)| (a - b).abs() < 1e-6));
    // Constant images stay constant at any scale.
    let flat = vec![0.3f32; h * w * c];
    for size in [3, 7, 20] {
        let out = resize_crop(
            &flat,
            w,
            c,
            Crop {
                top: 1,
                left: 2,
                h: 6,
                w: 5,
            },
            size,
        );
        assert_eq!(out.len(), size * size * c);
        assert!(out.iter().all(|v| (v - 0.3).abs() < 1e-5), "size {size}");
    }
    // Shrinking a fine checkerboard 8× averages it (no aliasing to 0 or 1).
    let n = 64;
    let board: Vec<f32> = (0..n * n).map(|i| ((i / n + i % n) % 2) as f32).collect();
    let out = resize_crop(
        &board,
        n,
        1,
        Crop {
            top: 0,
            left: 0,
            h: n,
            w: n,
        },
        8,
    );
    assert!(out.iter().all(|v| (v - 0.5).abs() < 0.05), "{out:?}");
}

#[test]
fn flip_blur_and_solarize_do_what_they_say() {
    let mut img: Vec<f32> = (0..2 * 3 * 2).map(|i| i as f32).collect();
    let orig = img.clone();
    augment::hflip(&mut img, 3, 2);
    assert_eq!(&img[..6], &[4.0, 5.0, 2.0, 3.0, 0.0, 1.0]);
    augment::hflip(&mut img, 3, 2);
    assert_eq!(img, orig);

    let mut flat = vec![0.7f32; 10 * 10];
    augment::gaussian_blur(&mut flat, 10, 10, 1, 1.5, 5);
    assert!(flat.iter().all(|v| (v - 0.7).abs() < 1e-6));
    let mut dot = vec![0f32; 11 * 11];
    dot[5 * 11 + 5] = 1.0;
    augment::gaussian_blur(&mut dot, 11, 11, 1, 1.0, 5);
    assert!(
        (dot.iter().sum::<f32>() - 1.0).abs() < 1e-5,
        "blur keeps the mass away from borders"
    );
    assert!(dot[5 * 11 + 5] < 0.2 && dot[5 * 11 + 6] > 0.05);

    let mut s = vec![0.2f32, 0.5, 0.51, 0.9];
    augment::solarize(&mut s);
    assert_eq!(s, vec![0.2, 0.5, 1.0 - 0.51, 1.0 - 0.9]);
}

#[test]
fn views_are_seeded_normalized_and_the_right_shape() {
    let s = data::open("builtin", data::DEFAULT_IMAGE_MEMORY).unwrap();
    let cfg = AugmentConfig::for_dataset(&s.train, None);
    assert_eq!((cfg.size, cfg.scale, cfg.blur_kernel), (28, (0.2, 1.0), 3));
    let idx = [0usize, 5, 9, 1234];
    let (a1, b1) = augment::two_views(&s.train, &idx, &cfg, 7, 0);
    let (a2, b2) = augment::two_views(&s.train, &idx, &cfg, 7, 0);
    assert_eq!(a1.shape, vec![4, 1, 28, 28]);
    assert_eq!((a1.clone(), b1.clone()), (a2, b2), "same seed, same views");
    let (a3, _) = augment::two_views(&s.train, &idx, &cfg, 7, 1);
    assert_ne!(a1, a3, "another epoch, other views");
    assert_ne!(a1, b1, "the two views differ");
    // Evaluation views: deterministic, and normalized with the dataset's statistics.
    let e = augment::eval_batch(&s.train, &(0..500).collect::<Vec<_>>(), &cfg);
    let mean = e.data.iter().map(|&v| f64::from(v)).sum::<f64>() / e.len() as f64;
    assert!(mean.abs() < 0.1, "normalized mean {mean}");
    // Grayscale and RGB images both go through every step.
    let rgb = Image {
        h: 32,
        w: 32,
        c: 3,
        data: (0..32 * 32 * 3).map(|i| (i % 251) as u8).collect(),
    };
    let cfg3 = AugmentConfig::new(16, (0.2, 1.0), 3, vec![0.5; 3], vec![0.25; 3]);
    let mut out = vec![f32::NAN; 3 * 16 * 16];
    for seed in 0..50 {
        augment::view(&rgb, &cfg3, VIEW_A, &mut Rng::new(seed), &mut out);
        assert!(out.iter().all(|v| v.is_finite() && v.abs() <= 2.0 + 1e-5));
    }
}

#[test]
fn idx_images_of_no_pixels_are_rejected() {
    let labels = idx(1, &[2], &[0, 1]);
    for dims in [[2, 0, 0], [2, 0, 5], [2, 5, 0]] {
        match data::idx_from_bytes("t", &idx(3, &dims, &[]), &labels) {
            Err(Error::Dataset { reason, .. }) => assert!(reason.contains("empty"), "{reason}"),
            other => panic!("{dims:?}: expected a dataset error, got {other:?}"),
        }
    }
}

/// A PNG whose header claims `w`×`h` pixels and holds no image data.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut crc = flate2::Crc::new();
    crc.update(&ihdr);
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&ihdr);
    v.extend_from_slice(&crc.sum().to_be_bytes());
    v
}

#[test]
fn image_folder_splits_share_labels_and_channels_and_refuse_giant_headers() {
    let dir = tmpdir("splits");
    let put = |split: &str, class: &str, k: usize, rgb: bool| {
        let d = dir.join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("{k}.png"));
        if rgb {
            image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, k as u8]))
                .save(p)
                .unwrap();
        } else {
            image::GrayImage::from_fn(6, 5, |x, y| image::Luma([(x + y) as u8 * 11]))
                .save(p)
                .unwrap();
        }
    };
    // Train: the first file (class "a") is gray, a later one RGB; test: gray only, no class "b".
    for k in 0..3 {
        put("train", "a", k, false);
        put("train", "b", k, k == 2);
        put("train", "c", k, false);
        put("test", "a", k, false);
        put("test", "c", k, false);
    }
    // A tiny file claiming a gigapixel image is skipped, not decoded.
    std::fs::write(
        dir.join("train").join("c").join("giant.png"),
        png_header_only(100_000, 100_000),
    )
    .unwrap();
    let s = data::open(dir.to_str().unwrap(), data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!(s.train.channels(), 3, "one RGB file makes the dataset RGB");
    assert_eq!(
        s.test.channels(),
        3,
        "the test split follows the training split"
    );
    assert_eq!(s.test.image(0).c, 3);
    assert_eq!(s.train.skipped, 1);
    assert_eq!(s.test.classes, s.train.classes);
    // Class "c" is label 2 in both splits although the test split has no "b".
    assert_eq!(s.test.labels, vec![0, 0, 0, 2, 2, 2]);

    // A test class the training split never saw is an error naming it.
    put("test", "zebra", 0, false);
    let e = data::open(dir.to_str().unwrap(), data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("zebra"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resizing_bytes_gives_the_values_of_resizing_their_floats() {
    let mut rng = Rng::new(9);
    let (h, w, c) = (11, 13, 3);
    let bytes: Vec<u8> = (0..h * w * c)
        .map(|_| (rng.uniform() * 256.0) as u8)
        .collect();
    let floats: Vec<f32> = bytes.iter().map(|&v| f32::from(v) / 255.0).collect();
    let crop = Crop {
        top: 2,
        left: 3,
        h: 7,
        w: 9,
    };
    for size in [4, 9, 16] {
        let a = resize_crop(&bytes, w, c, crop, size);
        let b = resize_crop(&floats, w, c, crop, size);
        assert_eq!(a, b, "size {size}");
        assert!(a.iter().any(|&v| v > 0.0 && v < 1.0));
    }
}

fn png(path: &std::path::Path, w: u32, h: u32, shade: u8) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 7, y as u8 * 5, shade]))
        .save(path)
        .unwrap();
}

#[test]
#[cfg(unix)]
fn only_regular_files_are_opened_and_hidden_folders_are_ignored() {
    let dir = tmpdir("fifo");
    for class in ["a", "b"] {
        std::fs::create_dir_all(dir.join("train").join(class)).unwrap();
        std::fs::create_dir_all(dir.join("test").join(class)).unwrap();
        for k in 0..3 {
            png(
                &dir.join("train").join(class).join(format!("{k}.png")),
                6,
                5,
                k,
            );
            png(
                &dir.join("test").join(class).join(format!("{k}.png")),
                6,
                5,
                k,
            );
        }
    }
    // A named pipe with an image's name: opening it would wait for a writer forever.
    let fifo = dir.join("train/a/pipe.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // An empty hidden folder beside the classes (left by a notebook) and a hidden file.
    std::fs::create_dir_all(dir.join("test/.ipynb_checkpoints")).unwrap();
    std::fs::write(dir.join("train/b/._0.png"), b"resource fork").unwrap();
    let d = dir.clone();
    let s = within(60, move || data::open(&d, data::DEFAULT_IMAGE_MEMORY)).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (6, 6));
    assert_eq!(s.train.skipped, 1, "the pipe is counted as skipped");
    assert_eq!(s.test.classes, vec!["a", "b"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg(unix)]
fn names_that_are_not_utf8_are_kept_as_the_os_gives_them() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tmpdir("utf8");
    let root = dir.join(std::ffi::OsStr::from_bytes(b"data-\xff"));
    let class = std::ffi::OsStr::from_bytes(b"caf\xe9");
    for split in ["train", "test"] {
        for c in [class, std::ffi::OsStr::new("plain")] {
            let d = root.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for k in 0..2 {
                png(&d.join(format!("{k}.png")), 4, 4, k);
            }
        }
    }
    let s = data::open(&root, data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (4, 4));
    assert_eq!(s.train.skipped, 0);
    assert_eq!(s.train.classes, vec!["caf\u{fffd}", "plain"]);
    // The path survives a run's saved configuration.
    let cfg = barlow::train::run::TrainConfig::default().data(root.clone());
    let json = serde_json::to_string(&cfg).unwrap();
    let back: barlow::train::run::TrainConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.data, root);
    // The command line takes such a path too, and names it when it does not exist.
    let missing = dir.join(std::ffi::OsStr::from_bytes(b"gone-\xfe"));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_barlow"))
        .args(["train", "--device", "cpu", "--data"])
        .arg(&missing)
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no such file or folder"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_layouts_say_which_are_accepted() {
    let dir = tmpdir("layouts");
    // train/ of classes without test/ or val/.
    std::fs::create_dir_all(dir.join("train/a")).unwrap();
    png(&dir.join("train/a/0.png"), 4, 4, 0);
    let e = data::open(&dir, data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("no test/ or val/"), "{e}");
    assert!(e.to_string().contains("accepted layouts"), "{e}");
    // One folder of classes with fewer than ten images: no test split can be held out.
    let few = tmpdir("few");
    std::fs::create_dir_all(few.join("a")).unwrap();
    for k in 0..9 {
        png(&few.join(format!("a/{k}.png")), 4, 4, k);
    }
    let e = data::open(&few, data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("too few"), "{e}");
    // An empty folder.
    let empty = tmpdir("layouts-empty");
    let e = data::open(&empty, data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("accepted layouts"), "{e}");
    for d in [dir, few, empty] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn max_train_limits_what_is_read_and_the_crop_follows_the_common_size() {
    let dir = tmpdir("max-train");
    for class in ["a", "b"] {
        std::fs::create_dir_all(dir.join("test").join(class)).unwrap();
        png(&dir.join("test").join(class).join("0.png"), 8, 8, 0);
        std::fs::create_dir_all(dir.join("train").join(class)).unwrap();
    }
    // 40 training files, of which --max-train 4 keeps every 10th (0, 10, 20, 30): the others
    // are not images at all, so reading any of them would count as skipped.
    for i in 0..40 {
        let p = dir
            .join("train")
            .join(if i < 20 { "a" } else { "b" })
            .join(format!("{i:02}.png"));
        if i % 10 == 0 {
            // The first file alphabetically is an odd size; the rest share 8×8.
            let side = if i == 0 { 30 } else { 8 };
            png(&p, side, side, i as u8);
        } else {
            std::fs::write(&p, b"not decoded").unwrap();
        }
    }
    let s = data::open_with(&dir, data::DEFAULT_IMAGE_MEMORY, 4).unwrap();
    assert_eq!((s.train.len(), s.train.skipped), (4, 0));
    assert_eq!(s.train.labels, vec![0, 0, 1, 1]);
    assert_eq!(AugmentConfig::for_dataset(&s.train, None).size, 8);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn idx_files_of_several_gzip_members_are_read_and_errors_name_the_file() {
    use std::io::Write;
    let dir = tmpdir("idx-members");
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let images = idx(3, &[4, 2, 2], &(0..16).collect::<Vec<u8>>());
    let labels = idx(1, &[4], &[0, 1, 2, 1]);
    // Two members end to end, split mid-payload, as `cat a.gz b.gz` makes them.
    let mut two = gz(&images[..10]);
    two.extend(gz(&images[10..]));
    for split in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte.gz")), &two).unwrap();
        std::fs::write(
            dir.join(format!("{split}-labels-idx1-ubyte.gz")),
            gz(&labels),
        )
        .unwrap();
    }
    let s = data::open(&dir, data::DEFAULT_IMAGE_MEMORY).unwrap();
    assert_eq!(s.train.len(), 4);
    assert_eq!(s.train.image(3).data, vec![12, 13, 14, 15]);
    // A truncated labels file is named in the message.
    std::fs::write(dir.join("t10k-labels-idx1-ubyte.gz"), gz(&labels[..9])).unwrap();
    let e = data::open(&dir, data::DEFAULT_IMAGE_MEMORY).unwrap_err();
    assert!(e.to_string().contains("t10k-labels-idx1-ubyte.gz"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
