//! `barlow info`.

pub(crate) fn info() {
    println!("barlow {}", env!("CARGO_PKG_VERSION"));
    let kernels = if barlow::cuda::fatbin::built() {
        let modules: Vec<String> = barlow::cuda::fatbin::MODULES
            .iter()
            .map(|m| {
                let bytes = m.image.map_or(0, <[u8]>::len);
                format!("{} ({} kernels, {bytes} bytes)", m.name, m.kernels.len())
            })
            .collect();
        format!("embedded: {}", modules.join(", "))
    } else {
        "not built (no nvcc at build time)".to_string()
    };
    println!("CUDA kernels: {kernels}");
    match barlow::cuda::device_count() {
        Ok(n) => {
            println!("CUDA devices: {n}");
            for i in 0..n {
                let name = match barlow::cuda::open_stream(i) {
                    Ok(s) => s
                        .context()
                        .name()
                        .unwrap_or_else(|e| format!("unnamed ({e})")),
                    Err(e) => format!("unusable: {e}"),
                };
                let note = if name.starts_with(barlow::cuda::VIRTUAL_DEVICE) {
                    " — virtual: runs on the host to check launches, library calls and stream \
                     order; nothing timed on it is a GPU figure"
                } else {
                    ""
                };
                println!("  {i}: {name}{note}");
            }
        }
        Err(e) => println!("CUDA devices: none ({e})"),
    }
    match barlow::cuda::cudnn::check_cudnn() {
        Ok(()) => println!("cuDNN: found (the CUDA trainer can run)"),
        Err(e) => println!("cuDNN: none ({e})"),
    }
    println!("CPU threads: {}", rayon::current_num_threads());
}
