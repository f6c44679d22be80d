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
    let ident = |t: &str| -> String {
        t.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    // The kernel names after each `__global__ void [__launch_bounds__(…)]` in `text`, with
    // what follows each name (to spot `PREFIX##PARAM` pasting).
    let kernels = |text: &str| -> Vec<(String, String)> {
        let mut out = Vec::new();
        for rest in text.split("__global__ void").skip(1) {
            let mut t = rest.trim_start();
            if let Some(after) = t.strip_prefix("__launch_bounds__(") {
                let mut depth = 1;
                let end = after
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map(|(i, _)| i)
                    .unwrap();
                t = after[end + 1..].trim_start();
            }
            let name = ident(t);
            let tail = t[name.len()..].to_string();
            out.push((name, tail));
        }
        out
    };
    // A macro's arguments: `MACRO(a, b, T)` → ["a", "b", "T"].
    let args = |t: &str| -> Vec<String> {
        t.split(')')
            .next()
            .unwrap_or("")
            .split(',')
            .map(|a| a.trim().to_string())
            .collect()
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Macros that define kernels, as (macro, [(prefix, index of the argument that completes
        // the name)]): a kernel named by a parameter is that argument; `PREFIX##PARAM` is the
        // prefix followed by it.
        let mut macros: Vec<(String, Vec<(String, usize)>)> = Vec::new();
        let mut plain = String::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(def) = line.trim_start().strip_prefix("#define ") else {
                plain.push_str(line);
                plain.push('\n');
                continue;
            };
            // Join the continued lines without their backslashes.
            let strip = |l: &str| format!("{} ", l.trim_end().trim_end_matches('\\'));
            let mut body = strip(line);
            let mut last = line;
            while last.trim_end().ends_with('\\') {
                match lines.next() {
                    Some(l) => {
                        body.push_str(&strip(l));
                        last = l;
                    }
                    None => break,
                }
            }
            let name = ident(def);
            let params = args(def[name.len()..].trim_start_matches('('));
            let mut names = Vec::new();
            for (k, tail) in kernels(&body) {
                if let Some(pasted) = tail.strip_prefix("##") {
                    let param = ident(pasted);
                    let i = params.iter().position(|p| *p == param).unwrap();
                    names.push((k, i));
                } else if let Some(i) = params.iter().position(|p| *p == k) {
                    names.push((String::new(), i));
                } else {
                    panic!(
                        "{}: kernel {k} in macro {name} is not named by a parameter",
                        path.display()
                    );
                }
            }
            if !names.is_empty() {
                macros.push((name, names));
            }
        }
        for (name, _) in kernels(&plain) {
            found.push(name);
        }
        for line in plain.lines().map(str::trim_start) {
            for (m, names) in &macros {
                if let Some(rest) = line
                    .strip_prefix(m.as_str())
                    .and_then(|r| r.strip_prefix('('))
                {
                    let a = args(rest);
                    for (prefix, i) in names {
                        found.push(format!("{prefix}{}", a[*i]));
                    }
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
