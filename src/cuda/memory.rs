//! Peak device memory of stream-ordered allocations, read from the device's default memory pool
//! (every buffer this crate allocates comes from it when the driver supports async allocation).

use super::drv;
use crate::error::Result;
use cudarc::driver::sys::{self, CUmemPool_attribute};
use cudarc::driver::CudaContext;

fn pool(ctx: &CudaContext) -> Result<Option<sys::CUmemoryPool>> {
    if !ctx.has_async_alloc() {
        return Ok(None);
    }
    ctx.bind_to_thread().map_err(drv("binding the context"))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(drv("querying the default memory pool"))?;
    Ok(Some(pool))
}

/// Resets the pool's high-water mark to the memory in use now.
pub fn reset_peak(ctx: &CudaContext) -> Result<()> {
    if let Some(p) = pool(ctx)? {
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH takes a cuuint64_t; setting it (to 0) resets the watermark.
        unsafe {
            sys::cuMemPoolSetAttribute(
                p,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero) as *mut u64 as *mut _,
            )
        }
        .result()
        .map_err(drv("resetting the memory high-water mark"))?;
    }
    Ok(())
}

/// Highest pool memory in use since the last [`reset_peak`], or `None` without async allocation.
pub fn peak_bytes(ctx: &CudaContext) -> Result<Option<u64>> {
    let Some(p) = pool(ctx)? else { return Ok(None) };
    let mut v: u64 = 0;
    // SAFETY: USED_MEM_HIGH writes one cuuint64_t into `v`.
    unsafe {
        sys::cuMemPoolGetAttribute(
            p,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v) as *mut u64 as *mut _,
        )
    }
    .result()
    .map_err(drv("reading the memory high-water mark"))?;
    Ok(Some(v))
}
