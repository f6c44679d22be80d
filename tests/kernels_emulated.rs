//! Every CUDA kernel of the project run on the CPU: `tests/emulated/cuda_host.h` supplies just
//! enough of CUDA (threads of a block as OS threads, `__syncthreads` as a barrier, software bf16)
//! for the `.cu` files to compile as C++, and `tests/emulated/kernels.cpp` checks each kernel
//! against a double-precision reference with poisoned outputs and odd shapes. This runs the
//! kernels' own index arithmetic and maths where no GPU is at hand; cuDNN, cuBLAS and the launch
//! path from Rust are left to the GPU tests.

use std::path::Path;
use std::process::Command;

#[test]
fn every_kernel_matches_its_double_reference_on_the_cpu_emulator() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        println!(
            "SKIP: every_kernel_matches_its_double_reference_on_the_cpu_emulator: no C++ compiler ({cxx})"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernels_emulated");
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-DBARLOW_HOST_EMULATION"])
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emulated"))
        .arg(root.join("tests/emulated/kernels.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "the kernels do not compile for the CPU emulator:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the emulated kernels");
    let text = String::from_utf8_lossy(&run.stdout);
    for line in text.lines().filter(|l| !l.starts_with("ok ")) {
        println!("{line}");
    }
    assert!(
        run.status.success(),
        "emulated kernel checks failed:\n{text}"
    );
    assert!(
        text.contains(" checks, 0 failed"),
        "the check summary is missing:\n{text}"
    );
}
