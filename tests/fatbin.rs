//! The embedded fatbin holds every kernel the Rust side launches, for every target architecture.

use barlow::cuda::fatbin::{FATBIN, KERNEL_NAMES};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn fatbin_holds_every_launched_kernel() {
    let Some(fatbin) = FATBIN else {
        println!("SKIP: fatbin_holds_every_launched_kernel: built without CUDA kernels");
        return;
    };
    for name in KERNEL_NAMES {
        // ELF symbol tables store names NUL-terminated; a prefix of a longer name does not match.
        let mut sym = name.as_bytes().to_vec();
        sym.push(0);
        assert!(
            contains(fatbin, &sym),
            "kernel `{name}` is missing from the fatbin"
        );
    }
    // PTX for the newest target, so newer GPUs can JIT the kernels.
    assert!(contains(fatbin, b".target sm_"), "no PTX in the fatbin");
}

#[test]
fn every_kernel_in_the_sources_is_listed() {
    // The opposite direction: a kernel added to kernels/*.cu must be added to KERNEL_NAMES, so
    // that loading checks it and this test covers it.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
    let Ok(entries) = std::fs::read_dir(dir) else {
        println!("SKIP: every_kernel_in_the_sources_is_listed: sources not at {dir}");
        return;
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let line = line.trim_start();
                // Kernels are declared `extern "C" __global__ void NAME(` or by a macro
                // `BARLOW_..(NAME, ...)` that expands to one.
                if let Some(rest) = line.split("__global__ void ").nth(1) {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && !name.starts_with("__launch_bounds__") {
                        found.push(name);
                    }
                } else if line.starts_with("BARLOW_STD_")
                    && !line.starts_with("BARLOW_STD_FWD(NAME")
                    && !line.starts_with("BARLOW_STD_BWD(NAME")
                {
                    let name: String = line
                        .split('(')
                        .nth(1)
                        .unwrap()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    found.push(name);
                } else if line.starts_with("loss_reduce_") && line.contains('(') {
                    found.push(line.split('(').next().unwrap().to_string());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    let mut listed: Vec<String> = KERNEL_NAMES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed, "kernels in kernels/*.cu vs KERNEL_NAMES");
}
