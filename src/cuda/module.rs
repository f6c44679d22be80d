//! Loads a kernel module once per CUDA context, on first use, and hands out its kernels by name.

use super::drv;
use super::fatbin::Module;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels of one module in one context.
pub(crate) struct Kernels {
    module: &'static str,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    pub(crate) fn get(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Cuda {
            during: "looking up a kernel".into(),
            message: format!("kernel `{name}` is not in the `{}` module", self.module),
        })
    }
}

/// Modules are keyed by their context's raw handle and their name; each stays loaded for the life
/// of the process, so repeated calls never reload it.
type Cache = Mutex<HashMap<(usize, &'static str), Arc<Kernels>>>;

pub(crate) fn kernels(ctx: &Arc<CudaContext>, module: &Module) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = (ctx.cu_ctx() as usize, module.name);
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&key) {
        return Ok(k.clone());
    }
    let image = module.image.ok_or(Error::NoKernels)?;
    let loaded = ctx
        .load_module(Ptx::from_binary(image.to_vec()))
        .map_err(drv(format!(
            "loading the `{}` kernels (does the driver support this GPU?)",
            module.name
        )))?;
    let mut functions = HashMap::new();
    for &super::fatbin::Kernel { name, .. } in module.kernels {
        let f = loaded
            .load_function(name)
            .map_err(drv(format!("loading kernel `{name}` from the fatbin")))?;
        functions.insert(name, f);
    }
    let k = Arc::new(Kernels {
        module: module.name,
        functions,
    });
    map.insert(key, k.clone());
    Ok(k)
}
