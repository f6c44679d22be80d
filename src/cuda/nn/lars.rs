//! LARS over the flat parameter arrays, in three launches.

use super::{grid, kernel, need, NnOps, LARS_CHUNK, THREADS};
use crate::cuda::{alloc, check_context, drv, Act};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig};
use std::sync::Arc;

/// The LARS tables of a flat parameter array: every tensor split into chunks of at most
/// [`LARS_CHUNK`] elements.
pub struct LarsTables {
    chunk_start: CudaSlice<i64>,
    chunk_len: CudaSlice<i32>,
    chunk_tensor: CudaSlice<i32>,
    tensor_vector: CudaSlice<i32>,
    first_chunk: CudaSlice<i32>,
    n_chunks: CudaSlice<i32>,
    partial: CudaSlice<f32>,
    trust: CudaSlice<f32>,
    chunks: usize,
    tensors: usize,
    total: usize,
}

/// LARS hyper-parameters of one step.
#[derive(Debug, Clone, Copy)]
pub struct LarsStep {
    /// Weight decay added to the gradient of weights (not of one-dimensional parameters).
    pub weight_decay: f32,
    /// Trust coefficient η.
    pub eta: f32,
    /// Momentum coefficient m.
    pub momentum: f32,
    /// Learning rate of weights at this step.
    pub lr_weights: f32,
    /// Learning rate of one-dimensional parameters (biases, norm weights) at this step.
    pub lr_biases: f32,
}

impl LarsTables {
    /// Tables for tensors given as (offset, length, is 1-D) over a flat array; tensors must be
    /// disjoint and inside `0..total`.
    pub fn new(
        stream: &Arc<CudaStream>,
        tensors: &[(usize, usize, bool)],
        total: usize,
    ) -> Result<Self> {
        let (mut cs, mut cl, mut ct) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tv, mut fc, mut nc) = (Vec::new(), Vec::new(), Vec::new());
        for (t, &(off, len, vector)) in tensors.iter().enumerate() {
            if off + len > total || len == 0 {
                return Err(Error::InvalidConfig(format!(
                    "parameter tensor {t} ({off}..{}) lies outside the {total} parameters",
                    off + len
                )));
            }
            fc.push(cs.len() as i32);
            let mut k = 0;
            while k < len {
                let l = LARS_CHUNK.min(len - k);
                cs.push((off + k) as i64);
                cl.push(l as i32);
                ct.push(t as i32);
                k += l;
            }
            nc.push(cs.len() as i32 - fc[t]);
            tv.push(i32::from(vector));
        }
        let up = |v: &[i32]| {
            stream
                .clone_htod(v)
                .map_err(drv("uploading the LARS tables"))
        };
        Ok(Self {
            chunk_start: stream
                .clone_htod(&cs)
                .map_err(drv("uploading the LARS tables"))?,
            chunk_len: up(&cl)?,
            chunk_tensor: up(&ct)?,
            tensor_vector: up(&tv)?,
            first_chunk: up(&fc)?,
            n_chunks: up(&nc)?,
            partial: alloc(stream, 2 * cs.len(), "allocating LARS scratch")?,
            trust: alloc(stream, tensors.len(), "allocating LARS scratch")?,
            chunks: cs.len(),
            tensors: tensors.len(),
            total,
        })
    }

    /// One LARS step over the flat arrays, in three launches; refreshes `work`, the copy of the
    /// parameters in the element type the layers read.
    pub fn step<A: Act>(
        &mut self,
        ops: &NnOps,
        hp: LarsStep,
        w: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        mom: &mut CudaSlice<f32>,
        work: &mut CudaSlice<A>,
    ) -> Result<()> {
        for (name, len) in [("parameters", w.len()), ("gradients", g.len())] {
            if len < self.total {
                return Err(Error::BufferTooSmall {
                    name: if name == "parameters" {
                        "parameters"
                    } else {
                        "gradients"
                    },
                    len,
                    needed: self.total,
                });
            }
        }
        need("momentum", mom, self.total)?;
        need("working weights", work, self.total)?;
        let s = ops.stream().clone();
        check_context("parameters", w, &s)?;
        check_context("gradients", g, &s)?;
        check_context("momentum", mom, &s)?;
        check_context("working weights", work, &s)?;
        if self.chunks == 0 {
            return Ok(());
        }
        let k = ops.kernels();
        let per_chunk = LaunchConfig {
            grid_dim: (self.chunks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every chunk lies inside 0..total (checked in `new`) and w, g hold `total`
        // floats; the partial array 2·chunks floats; one block per chunk.
        unsafe {
            kernel::lars_partial(
                k,
                &s,
                per_chunk,
                w,
                g,
                &self.chunk_start,
                &self.chunk_len,
                &self.chunk_tensor,
                &self.tensor_vector,
                hp.weight_decay,
                &mut self.partial,
            )?;
        }
        // SAFETY: one thread per tensor; its chunks index the partial array of 2·chunks floats,
        // and trust holds one float per tensor.
        unsafe {
            kernel::lars_trust(
                k,
                &s,
                grid(self.tensors),
                &self.partial,
                &self.first_chunk,
                &self.n_chunks,
                &self.tensor_vector,
                self.tensors as i64,
                hp.eta,
                &mut self.trust,
            )?;
        }
        // SAFETY: as lars_partial; momentum and the working copy hold `total` elements.
        unsafe {
            kernel::lars_update::<A>(
                k,
                &s,
                per_chunk,
                w,
                g,
                mom,
                &self.chunk_start,
                &self.chunk_len,
                &self.chunk_tensor,
                &self.tensor_vector,
                &self.trust,
                hp.weight_decay,
                hp.lr_weights,
                hp.lr_biases,
                hp.momentum,
                work,
            )
        }
    }
}
