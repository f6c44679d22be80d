//! The command line rejects bad options while parsing them: exit status 2 and a message naming
//! the option, before anything is loaded or created — never a panic (101), an abort or a hang.

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
