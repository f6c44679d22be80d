//! A failing data thread ends the run with an error instead of hanging it. In its own test binary:
//! the failure is injected through an environment variable, which would reach every run of a
//! shared process.

use barlow::train::run::{self, Quiet, TrainConfig, INJECT_DATA_FAILURE};
use barlow::Error;

#[test]
fn a_data_thread_failure_ends_the_run_with_an_error() {
    std::env::set_var(INJECT_DATA_FAILURE, "3");
    let out = std::env::temp_dir().join(format!("barlow-data-thread-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = TrainConfig {
        width: 4,
        projector: vec![32, 32],
        batch_size: 64,
        epochs: 1,
        max_train: 640,
        knn_bank: 256,
        knn_test: 128,
        ..Default::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let o = out.clone();
    std::thread::spawn(move || {
        let _ = tx.send(run::train(&cfg, &o, None, &mut Quiet));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("the run hung after its data thread failed");
    match r {
        Err(e @ Error::Dataset { .. }) => assert!(e.to_string().contains("data thread"), "{e}"),
        other => panic!("expected a data-thread error, got {other:?}"),
    }
    assert!(!out.join(".barlow.lock").exists());
    let _ = std::fs::remove_dir_all(&out);
}
