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
    // The kernel names after each `__global__ void [__launch_bounds__(…)]` in `text`.
    let kernels = |text: &str| -> Vec<(String, bool)> {
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
            // `PREFIX##SUF(`: a name pasted from a macro argument.
            let pasted = t[name.len()..].starts_with("##");
            out.push((name, pasted));
        }
        out
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Macros that define kernels: each maps its first argument to names (a whole name when
        // the macro's kernel is called NAME, else PREFIX + argument).
        let mut macros: Vec<(String, Vec<String>)> = Vec::new();
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
            let prefixes: Vec<String> = kernels(&body)
                .into_iter()
                .map(|(n, pasted)| if pasted { n } else { String::new() })
                .collect();
            if !prefixes.is_empty() {
                macros.push((ident(def), prefixes));
            }
        }
        for (name, _) in kernels(&plain) {
            found.push(name);
        }
        for line in plain.lines().map(str::trim_start) {
            for (m, prefixes) in &macros {
                if let Some(args) = line
                    .strip_prefix(m.as_str())
                    .and_then(|r| r.strip_prefix('('))
                {
                    let arg = ident(args.trim_start());
                    for p in prefixes {
                        found.push(format!("{p}{arg}"));
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
