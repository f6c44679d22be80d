//! Loads the embedded fatbin once per CUDA context and hands out its kernels by name.

use super::{drv, fatbin};
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels of one context.
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    pub(crate) fn get(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Cuda {
            during: "looking up a kernel".into(),
            message: format!("kernel `{name}` is not in the fatbin's kernel list"),
        })
    }
}

/// Contexts are identified by their raw handle; the cache keeps each module loaded for the life of
/// the process, so repeated calls never reload it.
type Cache = Mutex<HashMap<usize, Arc<Kernels>>>;

pub(crate) fn kernels(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = ctx.cu_ctx() as usize;
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&key) {
        return Ok(k.clone());
    }
    let image = fatbin::FATBIN.ok_or(Error::NoKernels)?;
    let module = ctx
        .load_module(Ptx::from_binary(image.to_vec()))
        .map_err(drv(
            "loading the kernel fatbin (does the driver support this GPU?)",
        ))?;
    let mut functions = HashMap::new();
    for &name in fatbin::KERNEL_NAMES {
        let f = module
            .load_function(name)
            .map_err(drv(format!("loading kernel `{name}` from the fatbin")))?;
        functions.insert(name, f);
    }
    let k = Arc::new(Kernels { functions });
    map.insert(key, k.clone());
    Ok(k)
}
