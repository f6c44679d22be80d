//! What the command line does when a user gets things wrong or things go wrong around it: a
//! resume never touches another run, a diverged model never gives an accuracy, nothing hangs or
//! panics. Each test drives the `barlow` binary as a user would, on the built-in sample.
#![cfg(all(feature = "cli", unix))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: [&str; 10] = [
    "--width",
    "4",
    "--projector",
    "64,64,64",
    "--batch-size",
    "64",
    "--max-train",
    "640",
    "--device",
    "cpu",
];

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barlow-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn barlow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_barlow"))
}

/// Runs `barlow` with `args`, returning its output, after checking that it did not panic.
fn run(args: &[&std::ffi::OsStr]) -> Output {
    let out = barlow().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "{args:?} panicked: {err}"
    );
    out
}

fn os<'a>(v: &'a [&'a str]) -> Vec<&'a std::ffi::OsStr> {
    v.iter().map(std::ffi::OsStr::new).collect()
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = os(&["train"]);
    args.extend(os(&TINY));
    args.extend(os(extra));
    args.push("--out".as_ref());
    args.push(out.as_os_str());
    run(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file of a folder with its bytes.
fn snapshot(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

fn resume(ckpt: &Path, extra: &[&str]) -> Output {
    let mut args = os(&["train", "--resume"]);
    args.push(ckpt.as_os_str());
    args.extend(os(extra));
    run(&args)
}

#[test]
fn a_resume_writes_only_into_its_own_run_from_its_latest_checkpoint() {
    let root = tmpdir("identity");
    let (a, b) = (root.join("a"), root.join("b"));
    assert!(train(&a, &["--epochs", "1"]).status.success());
    assert!(train(&b, &["--epochs", "1", "--seed", "3"])
        .status
        .success());

    // Another run's checkpoint dropped into a's folder: refused, a untouched.
    std::fs::copy(
        b.join("checkpoint.safetensors"),
        a.join("other.safetensors"),
    )
    .unwrap();
    let before = snapshot(&a);
    let o = resume(&a.join("other.safetensors"), &["--epochs", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--out NEW"), "{}", stderr(&o));
    assert_eq!(
        snapshot(&a),
        before,
        "a foreign checkpoint changed the run's folder"
    );

    // An older snapshot of a's own run, once the run went on: refused, a untouched.
    std::fs::copy(a.join("checkpoint.safetensors"), a.join("snap.safetensors")).unwrap();
    let o = resume(&a.join("checkpoint.safetensors"), &["--epochs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&a);
    let o = resume(&a.join("snap.safetensors"), &["--epochs", "3"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("older snapshot"), "{}", stderr(&o));
    assert_eq!(
        snapshot(&a),
        before,
        "an older snapshot changed the run's folder"
    );

    // The snapshot starts a new run in a new folder, as the message says; a stays as it was.
    let c = root.join("c");
    let mut args = os(&["--epochs", "3", "--device", "cpu"]).to_vec();
    args.push("--out".as_ref());
    args.push(c.as_os_str());
    let snap = a.join("snap.safetensors");
    let mut full = os(&["train", "--resume"]);
    full.push(snap.as_os_str());
    full.extend(args);
    let o = run(&full);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(snapshot(&a), before);
    assert_eq!(steps(&c), (11..=30).collect::<Vec<_>>());
    let id = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap()
    };
    assert_ne!(id(&a)["id"], id(&c)["id"]);
    assert_eq!(id(&c)["parent"]["id"], id(&a)["id"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_resume_keeps_the_saved_settings_and_names_any_option_it_cannot_take() {
    let root = tmpdir("settings");
    let a = root.join("a");
    assert!(train(&a, &["--epochs", "1"]).status.success());
    let ckpt = a.join("checkpoint.safetensors");
    let before = snapshot(&a);

    // Without --epochs the saved count stands: a finished run has nothing left to do.
    let o = resume(&ckpt, &["--device", "cpu"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already finished its 1 epoch"),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&o).contains("wrote"), "{}", stdout(&o));
    for (option, value) in [
        ("--width", "8"),
        ("--batch-size", "128"),
        ("--lr-weights", "0.1"),
        ("--seed", "7"),
        ("--projector", "32,32"),
    ] {
        let o = resume(&ckpt, &["--epochs", "2", option, value]);
        assert_eq!(o.status.code(), Some(2), "{option}: {}", stderr(&o));
        assert!(stderr(&o).contains(option), "{option}: {}", stderr(&o));
    }
    assert_eq!(snapshot(&a), before);

    // From inside the run's folder, by the checkpoint's bare name.
    let o = barlow()
        .current_dir(&a)
        .args([
            "train",
            "--resume",
            "checkpoint.safetensors",
            "--epochs",
            "2",
        ])
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&a), (1..=20).collect::<Vec<_>>());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_moved_dataset_is_followed_and_relative_paths_survive_another_working_directory() {
    let root = tmpdir("moved");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-sample");
    let ds = root.join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    for e in std::fs::read_dir(&sample).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ds.join(e.file_name())).unwrap();
    }
    // A relative --data, from the folder that holds it.
    let o = barlow()
        .current_dir(&root)
        .arg("train")
        .args(TINY)
        .args(["--epochs", "1", "--data", "ds", "--out", "run"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = root.join("run/checkpoint.safetensors");
    // Resumed from elsewhere: the stored path is absolute.
    let o = barlow()
        .current_dir("/")
        .arg("train")
        .arg("--resume")
        .arg(&ckpt)
        .args(["--epochs", "2", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Moved: found again through --data.
    std::fs::rename(&ds, root.join("moved")).unwrap();
    let o = resume(&ckpt, &["--epochs", "3", "--device", "cpu"]);
    assert!(!o.status.success());
    let mut args = os(&["train", "--epochs", "3", "--device", "cpu", "--data"]);
    let moved = root.join("moved");
    args.push(moved.as_os_str());
    args.push("--resume".as_ref());
    args.push(ckpt.as_os_str());
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps(&root.join("run")), (1..=30).collect::<Vec<_>>());
    // Another dataset is not taken for the moved one: the sample's test split as training images.
    let other = root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for (from, to) in [("t10k", "train"), ("t10k", "t10k")] {
        for kind in ["images-idx3", "labels-idx1"] {
            std::fs::copy(
                moved.join(format!("{from}-{kind}-ubyte.gz")),
                other.join(format!("{to}-{kind}-ubyte.gz")),
            )
            .unwrap();
        }
    }
    let mut args = os(&["train", "--epochs", "4", "--device", "cpu", "--data"]);
    args.push(other.as_os_str());
    args.push("--resume".as_ref());
    args.push(ckpt.as_os_str());
    let o = run(&args);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not hold the dataset"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_diverged_model_never_gives_an_accuracy() {
    let root = tmpdir("diverged");
    let a = root.join("a");
    assert!(train(&a, &["--epochs", "1"]).status.success());
    let ckpt = a.join("checkpoint.safetensors");
    let mut args = os(&[
        "eval", "linear", "--lr", "1e30", "--epochs", "2", "--device", "cpu",
    ]);
    args.push("--checkpoint".as_ref());
    args.push(ckpt.as_os_str());
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("diverged"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("top-1"), "{}", stdout(&o));

    let b = root.join("b");
    let o = train(
        &b,
        &[
            "--epochs",
            "1",
            "--lr-weights",
            "1e30",
            "--lr-biases",
            "1e30",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("diverged"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("done"), "{}", stdout(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sigterm_stops_a_run_like_ctrl_c_and_a_stop_before_the_first_epoch_leaves_nothing() {
    let root = tmpdir("sigterm");
    let a = root.join("a");
    let child = barlow()
        .args([
            "train",
            "--width",
            "4",
            "--projector",
            "64,64,64",
            "--batch-size",
            "64",
        ])
        .args(["--device", "cpu", "--epochs", "50", "--out"])
        .arg(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped within its first epoch (157 steps of 64 on 10,000 images).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    // SAFETY: sends SIGTERM to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("no checkpoint to resume from"), "{err}");
    assert!(!a.exists() || std::fs::read_dir(&a).unwrap().next().is_none());
    // The folder can be used again at once.
    assert!(train(&a, &["--epochs", "1"]).status.success());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_lock_left_by_another_pid_namespace_is_recognised_as_stale() {
    let root = tmpdir("lock");
    let a = root.join("a");
    std::fs::create_dir_all(&a).unwrap();
    // What a killed barlow that ran as PID 1 of an earlier container leaves: pid 1, whose start
    // time now is another process's.
    std::fs::write(
        a.join(".barlow.lock"),
        "1 00000000-0000-0000-0000-000000000000:1\n",
    )
    .unwrap();
    let o = train(&a, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A live holder is named with its lock file.
    let me = std::process::id();
    let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let start = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let b = root.join("b");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(
        b.join(".barlow.lock"),
        format!("{me} {}:{start}\n", boot.trim()),
    )
    .unwrap();
    let o = train(&b, &["--epochs", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(".barlow.lock"), "{}", stderr(&o));
    std::fs::remove_dir_all(&root).unwrap();
}

/// Compiles `source` into `dir/libcuda.so`; `None` (and a SKIP line) without a C compiler.
fn fake_libcuda(dir: &Path, source: &str) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let c = dir.join("fake.c");
    std::fs::write(&c, source).unwrap();
    let so = dir.join("libcuda.so");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .status();
    match built {
        Ok(s) if s.success() => Some(dir.to_path_buf()),
        _ => {
            println!("SKIP: no C compiler (cc) to build a fake libcuda.so");
            None
        }
    }
}

#[test]
fn a_library_named_libcuda_that_is_no_driver_is_no_driver_not_a_panic() {
    let root = tmpdir("libcuda");
    let fakes = [
        ("empty", "int not_cuda(void) { return 0; }\n"),
        // Has cuInit, which fails, and none of the rest.
        (
            "failing",
            "int cuInit(unsigned int f) { (void)f; return 999; }\n",
        ),
    ];
    for (name, source) in fakes {
        let Some(dir) = fake_libcuda(&root.join(name), source) else {
            return;
        };
        let with_fake = |args: &[&str]| {
            let o = barlow()
                .env("LD_LIBRARY_PATH", &dir)
                .args(args)
                .output()
                .unwrap();
            let err = stderr(&o);
            assert!(
                !err.contains("panicked") && o.status.code() != Some(101),
                "{name} {args:?}: {err}"
            );
            o
        };
        let o = with_fake(&["info"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("no CUDA driver"),
            "{name}: {}",
            stdout(&o)
        );
        let out = root.join(format!("{name}-run"));
        let mut args = vec!["train"];
        args.extend(
            TINY.iter()
                .copied()
                .filter(|a| *a != "cpu" && *a != "--device"),
        );
        args.extend(["--epochs", "1", "--device", "auto", "--out"]);
        args.push(out.to_str().unwrap());
        let o = with_fake(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("running on the CPU"),
            "{name}: {}",
            stderr(&o)
        );
        let o = with_fake(&["bench", "loss", "--device", "cuda", "--n", "8", "--d", "8"]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("no CUDA driver"),
            "{name}: {}",
            stderr(&o)
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn memory_far_beyond_an_address_space_limit_is_an_error_naming_what_to_lower() {
    let root = tmpdir("memory");
    let mut cmd = barlow();
    cmd.arg("train")
        .args(["--projector", "30000,30000", "--device", "cpu", "--out"])
        .arg(root.join("a"));
    // SAFETY: setrlimit is async-signal-safe and touches only the child about to exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 6 << 30,
                rlim_max: 6 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--projector"), "{}", stderr(&o));
    assert!(!root.join("a").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_options_exit_with_status_2_before_any_work_and_ctrl_c_ends_a_benchmark() {
    let root = tmpdir("options");
    let missing = root.join("no/such/folder/rows.json");
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            {
                let mut a = os(&["bench", "loss", "--device", "cpu", "--json"]);
                a.push(missing.as_os_str());
                a
            },
            "--json",
        ),
        (
            os(&["bench", "loss", "--device", "cpu", "--math", "foo"]),
            "--math",
        ),
        (
            os(&["bench", "loss", "--device", "cpu", "--math", "bf16"]),
            "--math",
        ),
        (os(&["bench", "train", "--batch", "1"]), "--batch"),
        (os(&["bench", "train", "--steps", "0"]), "--steps"),
    ];
    for (args, option) in cases {
        let started = std::time::Instant::now();
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(option), "{args:?}: {}", stderr(&o));
        assert!(
            started.elapsed().as_secs() < 20,
            "{args:?} ran before failing"
        );
    }
    // Launcher variables with --device cpu are named.
    let o = barlow()
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .args(["train", "--device", "cpu", "--out"])
        .arg(root.join("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("WORLD_SIZE"), "{}", stderr(&o));

    // The first Ctrl-C ends a benchmark at once.
    let mut child = barlow()
        .args([
            "bench", "loss", "--device", "cpu", "--n", "4096", "--d", "4096",
        ])
        .args(["--repeats", "1000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: sends SIGINT to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed().as_secs() > 20 {
            let _ = child.kill();
            panic!("bench loss went on after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!status.success());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_launched_rank_says_it_waits_for_rank_0() {
    use std::io::{BufRead, BufReader};
    // A port nothing listens on: the rank waits for rank 0 and says so at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = tmpdir("rank");
    let mut child = barlow()
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .args(["train", "--device", "cuda", "--out"])
        .arg(root.join("x"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let first = BufReader::new(err).lines().next();
        let _ = tx.send(first);
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("no line within 30 s").unwrap().unwrap();
    assert!(line.contains("waiting for rank 0 at 127.0.0.1"), "{line}");
    std::fs::remove_dir_all(&root).unwrap();
}
