//! The embedded fatbins hold every kernel their module defines, for every target architecture, and
//! the module lists that build.rs generates from the sources match what the preprocessor sees.
#![cfg(feature = "cuda")]

use barlow::cuda::fatbin::MODULES;
use std::path::Path;
use std::process::Command;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn fatbin_holds_every_listed_kernel() {
    for m in MODULES {
        let Some(fatbin) = m.image else {
            println!("SKIP: fatbin_holds_every_listed_kernel: built without CUDA kernels");
            return;
        };
        assert!(!m.kernels.is_empty(), "module {} lists no kernels", m.name);
        for k in m.kernels {
            let name = k.name;
            // ELF symbol tables store names NUL-terminated; a prefix of a longer name does not
            // match.
            let mut sym = name.as_bytes().to_vec();
            sym.push(0);
            assert!(
                contains(fatbin, &sym),
                "kernel `{name}` is missing from the `{}` fatbin",
                m.name
            );
        }
        // PTX for the newest target, so newer GPUs can JIT the kernels.
        assert!(
            contains(fatbin, b".target sm_"),
            "no PTX in the {} fatbin",
            m.name
        );
    }
}

/// A parameter list's C types with the names and `__restrict__` dropped: `(const float* __restrict__
/// x, int64_t n)` → ["const float*", "int64_t"].
fn param_types(list: &str) -> Vec<String> {
    let list = list.trim();
    if list.is_empty() {
        return Vec::new();
    }
    list.split(',')
        .map(|p| {
            let spaced = p.replace('*', " * ");
            let mut words: Vec<&str> = spaced
                .split_whitespace()
                .filter(|w| !w.starts_with("__restrict"))
                .collect();
            words.pop(); // the parameter's name
            let stars = words.iter().filter(|w| **w == "*").count();
            let base: Vec<&str> = words.into_iter().filter(|w| *w != "*").collect();
            format!("{}{}", base.join(" "), "*".repeat(stars))
        })
        .collect()
}

/// The kernels the C preprocessor finds in `kernels/<folder>/*.cu` (macros expanded), compiled as
/// host code the way the emulators do, with their parameter types: an extraction independent of
/// build.rs's source reading.
fn preprocessed_kernels(cxx: &str, folder: &str) -> Vec<(String, Vec<String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("kernels").join(folder);
    let mut unit = String::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    for f in files {
        unit.push_str(&format!("#include \"{}\"\n", f.display()));
    }
    let src = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernels_{folder}.cpp"));
    std::fs::write(&src, unit).unwrap();
    let out = Command::new(cxx)
        .args(["-std=c++20", "-E", "-P", "-DBARLOW_HOST_EMULATION"])
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emulated"))
        .arg(&src)
        .output()
        .expect("running the preprocessor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).replace(['\n', '\t'], " ");
    let mut names: Vec<(String, Vec<String>)> = text
        .split("extern \"C\"")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix("void")?.trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let list = rest[name.len()..].trim_start().strip_prefix('(')?;
            let list = &list[..list.find(')')?];
            Some((name, param_types(list)))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn generated_signatures_match_the_preprocessed_sources() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        println!("SKIP: generated_signatures_match_the_preprocessed_sources: no C++ compiler");
        return;
    }
    // A test binary carried to another machine (the GPU bundle) has no sources beside it.
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    if !sources.is_dir() {
        println!(
            "SKIP: generated_signatures_match_the_preprocessed_sources: the kernel sources ({}) \
             are not on this machine",
            sources.display()
        );
        return;
    }
    for m in MODULES {
        let mut listed: Vec<(String, Vec<String>)> = m
            .kernels
            .iter()
            .map(|k| {
                let params = k.params.iter().map(|p| p.to_string()).collect();
                (k.name.to_string(), params)
            })
            .collect();
        listed.sort();
        assert_eq!(
            preprocessed_kernels(&cxx, m.name),
            listed,
            "kernels/{}/*.cu vs the generated list",
            m.name
        );
    }
}
