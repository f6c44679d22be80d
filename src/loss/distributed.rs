//! The loss over a batch split across the ranks of a data-parallel group, exactly: W ranks of
//! N rows each get the loss of one run on the concatenated W·N rows, and each rank the gradient
//! of that loss with respect to its own rows.
//!
//! * Standardization: the column sums are summed over the ranks (the global mean), then the
//!   centered squares (the global variance): the same two passes as on one rank, in f64.
//! * Cross-correlation, one of two ways, chosen by the bytes each rank sends:
//!   - Direct: each rank's share Ẑaᵣᵀ·Ẑbᵣ / N, summed over the ranks (D² floats). Every rank then
//!     holds C and dL/dC and back-propagates its own rows.
//!   - Gram: the standardized batches gathered (2·N·D floats in all). Each rank computes its
//!     rows of Ga and Gb, their part of ⟨Ga, Gb⟩ (summed over the ranks, one float), the
//!     diagonal of C from the gathered batches, and its rows' gradient.
//!
//!   Auto gathers when 2·N·D < D². At the paper's N = 2048, D = 8192 the gathered batches are
//!   half of C's elements, and a ring all-reduce sends about twice its buffer per rank where an
//!   all-gather sends its output once: about 4× fewer bytes.
//! * Backward through the standardization: the column sums of g and g·x̂ over all rows (2·D).

use super::{BarlowTwinsLoss, CpuWorkspace, LossPath, LossValue};
use crate::collective::Collective;
use crate::cpu;
#[cfg(feature = "nccl")]
use crate::cuda::{fused::across, nccl::Nccl, Element};
use crate::error::{Error, Result};
use crate::shape::{check_input, check_output, Dims};
#[cfg(feature = "nccl")]
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::sync::TryLockError;

impl LossPath {
    /// The concrete path for a batch of `dims` (all ranks' rows) split over `world` ranks:
    /// `Auto` picks by bytes moved between ranks (Gram when 2·N·D < D², or when C would not
    /// fit), or by flops on one rank ([`LossPath::resolve`]).
    pub fn resolve_across(self, dims: Dims, world: usize) -> LossPath {
        match (self, world) {
            (LossPath::Auto, 0 | 1) => self.resolve(dims),
            (LossPath::Auto, _) => {
                let (n, d) = (dims.n as f64, dims.d as f64);
                if 2.0 * n * d < d * d || d * d > (1u64 << 30) as f64 {
                    LossPath::Gram
                } else {
                    LossPath::Direct
                }
            }
            (p, _) => p,
        }
    }
}

impl BarlowTwinsLoss {
    /// The loss of a batch split across the ranks of `group`: this rank holds `dims.n` rows of
    /// each view (every rank the same N and D, the rows of rank r after those of rank r − 1).
    /// Every rank returns the same value: that of one run on all ranks' rows.
    ///
    /// Every rank of the group must make the same call; a rank whose input is refused makes
    /// every rank fail. The ranks may share one loss object across threads (a rank that finds
    /// its buffers in use takes new ones for the call).
    pub fn forward_cpu_across(
        &self,
        group: &dyn Collective,
        za: &[f32],
        zb: &[f32],
        dims: Dims,
    ) -> Result<LossValue> {
        self.run_cpu_across(group, za, zb, dims, None)
    }

    /// [`BarlowTwinsLoss::forward_cpu_across`] with the gradient of the whole batch's loss with
    /// respect to this rank's rows written into `dza` and `dzb` (N×D each).
    ///
    /// ```
    /// use barlow::collective::LocalGroup;
    /// use barlow::{BarlowTwinsLoss, Dims, LossConfig};
    ///
    /// let (n, d) = (4, 3); // rows per rank, features
    /// let row = |i: usize| (0..d).map(move |j| ((i * 7 + j * 3) % 5) as f32 - 2.0 + 0.1 * j as f32);
    /// let za: Vec<f32> = (0..2 * n).flat_map(row).collect(); // the whole batch, 2 ranks' rows
    /// let zb: Vec<f32> = (0..2 * n).flat_map(|i| row(i + 3)).collect();
    /// let loss = BarlowTwinsLoss::new(LossConfig::default())?;
    /// let whole = loss.forward_cpu(&za, &zb, Dims::new(2 * n, d))?;
    /// let split: Vec<f64> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = LocalGroup::new(2)?
    ///         .into_iter()
    ///         .map(|rank| {
    ///             let (loss, za, zb) = (&loss, &za, &zb);
    ///             s.spawn(move || {
    ///                 use barlow::collective::Collective;
    ///                 let mine = rank.rank() * n * d..(rank.rank() + 1) * n * d;
    ///                 let (mut dza, mut dzb) = (vec![0.0; n * d], vec![0.0; n * d]);
    ///                 let (a, b) = (&za[mine.clone()], &zb[mine]);
    ///                 loss.forward_backward_cpu_across(&rank, a, b, Dims::new(n, d), &mut dza, &mut dzb)
    ///                     .map(|v| v.total)
    ///             })
    ///         })
    ///         .collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect::<barlow::Result<_>>()
    /// })?;
    /// assert!(split.iter().all(|v| (v - whole.total).abs() < 1e-6 * whole.total));
    /// # Ok::<(), barlow::Error>(())
    /// ```
    pub fn forward_backward_cpu_across(
        &self,
        group: &dyn Collective,
        za: &[f32],
        zb: &[f32],
        dims: Dims,
        dza: &mut [f32],
        dzb: &mut [f32],
    ) -> Result<LossValue> {
        self.run_cpu_across(group, za, zb, dims, Some((dza, dzb)))
    }

    fn run_cpu_across(
        &self,
        group: &dyn Collective,
        za: &[f32],
        zb: &[f32],
        dims: Dims,
        mut grads: Option<(&mut [f32], &mut [f32])>,
    ) -> Result<LossValue> {
        let world = group.world_size();
        if world <= 1 {
            return self.run_cpu(za, zb, dims, grads);
        }
        let total = dims.n.saturating_mul(world);
        let all = Dims::new(total, dims.d);
        let path = self.config.path.resolve_across(all, world);
        // The ranks of one group may share this object from several threads: a rank holding the
        // buffers while it waits for the others would deadlock them, so a rank that finds them
        // taken works in buffers of its own.
        let mut own = CpuWorkspace::default();
        let mut guard = match self.cpu.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let ws = match guard.as_deref_mut() {
            Some(w) => w,
            None => &mut own,
        };
        // Every rank checks its own input and memory, then all agree on whether to go on and on
        // the shape, so that a refusal on one rank ends the call on all of them.
        let local = check_local(za, zb, dims, all, grads.as_mut())
            .and_then(|()| ws.fit_rows(dims.n, total, dims.d, path));
        let mut header = agreement_header(local.is_ok(), dims);
        group.all_reduce_sum_f64(&mut header)?;
        local?;
        check_agreement(&header, dims, group.rank(), world)?;
        let (n, d) = (dims.n, dims.d);
        let (eps, lambda) = (self.config.eps, self.config.lambda);

        // Standardization with the whole batch's statistics: Σx, then Σ(x − mean)².
        let mut sums = cpu::column_sums(za, dims);
        sums.extend(cpu::column_sums(zb, dims));
        group.all_reduce_sum_f64(&mut sums)?;
        let mean: Vec<f64> = sums.iter().map(|s| s / total as f64).collect();
        let (mean_a, mean_b) = mean.split_at(d);
        let mut sq = cpu::centered_squares(za, dims, mean_a);
        sq.extend(cpu::centered_squares(zb, dims, mean_b));
        group.all_reduce_sum_f64(&mut sq)?;
        cpu::write_stats(mean_a, &sq[..d], total, eps, &mut ws.stats_a);
        cpu::write_stats(mean_b, &sq[d..], total, eps, &mut ws.stats_b);
        cpu::apply_standardize(za, dims, &ws.stats_a, &mut ws.zhat_a);
        cpu::apply_standardize(zb, dims, &ws.stats_b, &mut ws.zhat_b);

        let want = grads.is_some();
        let value = if path == LossPath::Gram {
            let local = n * d;
            group.all_gather_f32(&ws.zhat_a[..local], &mut ws.all_a[..total * d])?;
            group.all_gather_f32(&ws.zhat_b[..local], &mut ws.all_b[..total * d])?;
            let block = cpu::gram::Rows {
                za: &ws.all_a,
                zb: &ws.all_b,
                dims: all,
                rows: group.rank() * n..(group.rank() + 1) * n,
            };
            let mut sq = [block.forward(&mut ws.ga, &mut ws.gb)?];
            group.all_reduce_sum_f64(&mut sq)?;
            let c = cpu::gram::diagonal(&ws.all_a, &ws.all_b, all)?;
            let v = cpu::gram::value(&c, sq[0] / (total as f64 * total as f64), d, lambda);
            if want && v.total.is_finite() {
                block.backward(&c, lambda, &ws.ga, &ws.gb, &mut ws.dhat_a, &mut ws.dhat_b)?;
            }
            v.via(LossPath::Gram)
        } else {
            let s = 1.0 / total as f32;
            cpu::cross_correlation_scaled(&ws.zhat_a, &ws.zhat_b, dims, s, &mut ws.c)?;
            group.all_reduce_sum_f32(&mut ws.c[..d * d])?;
            let v = cpu::loss_reduce(&mut ws.c, d, lambda, want)?;
            if want {
                cpu::correlation_backward_scaled(
                    &ws.c,
                    &ws.zhat_a,
                    &ws.zhat_b,
                    dims,
                    s,
                    &mut ws.dhat_a,
                    &mut ws.dhat_b,
                )?;
            }
            v.via(LossPath::Direct)
        };
        // Every rank holds the same value, so every rank stops here together.
        if !value.total.is_finite() {
            return Err(Error::NonFinite { total: value.total });
        }
        if let Some((dza, dzb)) = grads {
            // Column means of g and g·x̂ over the whole batch.
            let (mut sg, sgx_a) = cpu::grad_sums(&ws.dhat_a, za, &ws.stats_a, dims);
            let (sg_b, sgx_b) = cpu::grad_sums(&ws.dhat_b, zb, &ws.stats_b, dims);
            sg.extend(sgx_a);
            sg.extend(sg_b);
            sg.extend(sgx_b);
            group.all_reduce_sum_f64(&mut sg)?;
            let m: Vec<f64> = sg.iter().map(|v| v / total as f64).collect();
            let (a, b) = m.split_at(2 * d);
            let (hat, z, stats) = (&ws.dhat_a, za, &ws.stats_a);
            cpu::apply_standardize_backward(hat, z, stats, dims, &a[..d], &a[d..], dza);
            let (hat, z, stats) = (&ws.dhat_b, zb, &ws.stats_b);
            cpu::apply_standardize_backward(hat, z, stats, dims, &b[..d], &b[d..], dzb);
        }
        Ok(value)
    }
}

#[cfg(feature = "nccl")]
impl BarlowTwinsLoss {
    /// The loss of a batch split across GPUs, one rank of `comm` each: this rank holds `dims.n`
    /// rows of each view on `comm`'s device (every rank the same N and D, rank r's rows after
    /// rank r − 1's), and every rank gets the loss of all ranks' rows, with the gradient of that
    /// loss with respect to its own rows in `dza`, `dzb`. Queued on `comm`'s stream; waits for
    /// the value (and once before, for the ranks to agree on going on: a refusal on one rank
    /// ends the call on every rank). The path follows [`LossPath::resolve_across`]; the
    /// collectives move 2·D + 2·D + 4·D f64 for the statistics and either D² floats (Direct) or
    /// 2·N·D (Gram, N all ranks' rows).
    ///
    /// ```no_run
    /// use barlow::cuda::nccl::{Nccl, NcclId};
    /// use barlow::{BarlowTwinsLoss, Dims, LossConfig};
    /// # fn main() -> barlow::Result<()> {
    /// # let (rank, world, id) = (0, 1, NcclId::new()?);
    /// let stream = barlow::cuda::open_stream(rank)?;
    /// let comm = Nccl::init_rank(&stream, rank, world, &id)?;
    /// let (n, d) = (256, 8192); // this rank's rows
    /// let za = stream.alloc_zeros::<f32>(n * d)?; // the projector's outputs
    /// # let zb = stream.alloc_zeros::<f32>(n * d)?;
    /// let (mut dza, mut dzb) = (stream.alloc_zeros::<f32>(n * d)?, stream.alloc_zeros::<f32>(n * d)?);
    /// let loss = BarlowTwinsLoss::new(LossConfig::default())?;
    /// let v = loss.forward_backward_across(&comm, &za, &zb, Dims::new(n, d), &mut dza, &mut dzb)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_backward_across<T: Element, Dz: DevicePtrMut<T>>(
        &self,
        comm: &Nccl,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        dza: &mut Dz,
        dzb: &mut Dz,
    ) -> Result<LossValue> {
        self.run_device_across(comm, za, zb, dims, Some((dza, dzb)))
    }

    /// [`BarlowTwinsLoss::forward_backward_across`] without the gradients.
    pub fn forward_across<T: Element>(
        &self,
        comm: &Nccl,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
    ) -> Result<LossValue> {
        self.run_device_across::<T, CudaSlice<T>>(comm, za, zb, dims, None)
    }

    fn run_device_across<T: Element, Dz: DevicePtrMut<T>>(
        &self,
        comm: &Nccl,
        za: &impl DevicePtr<T>,
        zb: &impl DevicePtr<T>,
        dims: Dims,
        grads: Option<(&mut Dz, &mut Dz)>,
    ) -> Result<LossValue> {
        // As on the CPU: ranks sharing this object from several threads must not wait on one
        // another's buffers while the collectives wait on them.
        let mut own = None;
        let mut guard = match self.gpu.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let slot = match guard.as_deref_mut() {
            Some(s) => s,
            None => &mut own,
        };
        across::run(slot, &self.config, comm, za, zb, dims, grads)
    }
}

/// This rank's own checks: the whole batch's shape `all` (N ≥ 2 counts every rank's rows, so one
/// row per rank is enough), at least one row here, and the buffer lengths.
/// What each rank adds to the agreement before a split loss: whether its own checks passed, and
/// its shape as n, d, n², d² (summed over the ranks; see [`check_agreement`]).
pub(crate) fn agreement_header(ok: bool, dims: Dims) -> [f64; 5] {
    let (n, d) = (dims.n as f64, dims.d as f64);
    [f64::from(u8::from(ok)), n, d, n * n, d * d]
}

/// Reads the summed [`agreement_header`]: another rank's refusal, or ranks of different shapes,
/// is an error on this rank too.
pub(crate) fn check_agreement(sum: &[f64], dims: Dims, rank: usize, world: usize) -> Result<()> {
    let fail = |message: String| Error::Collective {
        during: format!("the distributed loss on rank {rank}"),
        message,
    };
    let (w, n, d) = (world as f64, dims.n as f64, dims.d as f64);
    if sum.len() != 5 || sum[0] != w {
        return Err(fail(
            "another rank's input was refused (its error says why)".into(),
        ));
    }
    // Σ nᵣ = W·n and Σ nᵣ² = W·n² together hold only when every nᵣ = n (likewise D).
    if sum[1] != w * n || sum[3] != w * n * n || sum[2] != w * d || sum[4] != w * d * d {
        return Err(fail(format!(
            "the ranks hold batches of different shapes (this rank {}×{}); every rank needs the \
             same N and D",
            dims.n, dims.d
        )));
    }
    Ok(())
}

fn check_local(
    za: &[f32],
    zb: &[f32],
    dims: Dims,
    all: Dims,
    grads: Option<&mut (&mut [f32], &mut [f32])>,
) -> Result<()> {
    all.checked()?;
    if dims.n == 0 {
        return Err(Error::BatchTooSmall { n: 0 });
    }
    check_input("za", za.len(), dims)?;
    check_input("zb", zb.len(), dims)?;
    if let Some((dza, dzb)) = grads {
        let len = dims.n * dims.d;
        check_output("dza", dza.len(), len)?;
        check_output("dzb", dzb.len(), len)?;
    }
    Ok(())
}
