//! The command line rejects bad options while parsing them: exit status 2 and a message naming
//! the option, before anything is loaded or created — never a panic (101), an abort or a hang.
#![cfg(feature = "cli")]

use std::process::Command;

#[test]
fn bad_options_are_rejected_at_parse_time_naming_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--crop", "0"], "--crop"),
        (&["train", "--crop", "100000"], "--crop"),
        (&["train", "--weight-decay", "nan"], "--weight-decay"),
        (&["train", "--batch-size", "1"], "--batch-size"),
        (&["train", "--epochs", "0"], "--epochs"),
        (&["train", "--width", "0"], "--width"),
        (&["train", "--projector", "512,0,512"], "--projector"),
        (&["train", "--lr-weights", "inf"], "--lr-weights"),
        (&["train", "--lr-biases=-1"], "--lr-biases"),
        (&["train", "--lambda=-0.5"], "--lambda"),
        (&["eval", "knn", "--checkpoint", "none", "--k", "0"], "--k"),
        (&["eval", "knn", "--checkpoint", "none", "--t", "0"], "--t"),
        (
            &["eval", "linear", "--checkpoint", "none", "--lr", "nan"],
            "--lr",
        ),
        (
            &["eval", "linear", "--checkpoint", "none", "--epochs", "0"],
            "--epochs",
        ),
        (
            &[
                "eval",
                "linear",
                "--checkpoint",
                "none",
                "--batch-size",
                "1",
            ],
            "--batch-size",
        ),
    ];
    let out_dir = std::env::temp_dir().join(format!("barlow-cli-{}", std::process::id()));
    for (args, option) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_barlow"));
        cmd.args(*args);
        if args[0] == "train" {
            cmd.arg("--out").arg(&out_dir);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(option), "{args:?} should name {option}: {err}");
        assert!(!out_dir.exists(), "{args:?} created the output folder");
    }
}

#[test]
fn evaluating_a_model_on_images_of_other_channels_is_an_error_naming_both() {
    let dir = std::env::temp_dir().join(format!("barlow-cli-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    // A gray model: the built-in sample is Fashion-MNIST.
    let out = Command::new(env!("CARGO_BIN_EXE_barlow"))
        .args([
            "train",
            "--max-train",
            "128",
            "--batch-size",
            "64",
            "--epochs",
            "1",
        ])
        .args([
            "--width",
            "4",
            "--projector",
            "16,16",
            "--knn-every",
            "0",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = dir.join("rgb").join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            image::RgbImage::from_fn(28, 28, |x, y| image::Rgb([x as u8, y as u8, 7]))
                .save(d.join("0.png"))
                .unwrap();
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_barlow"))
        .args(["eval", "knn", "--device", "cpu", "--checkpoint"])
        .arg(run.join("checkpoint.safetensors"))
        .arg("--data")
        .arg(dir.join("rgb"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gray") && err.contains("RGB"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
