//! NCCL communicators (feature `nccl`): one rank per GPU, collectives queued on the rank's
//! stream without a host wait. NCCL is loaded at run time; without it every entry point returns
//! [`Error::NoNccl`].
//!
//! Two ways to make a group: [`Nccl::init_rank`] in each process (or thread) with the
//! [`NcclId`] that rank 0 made and sent to the others (the trainer sends it over its TCP
//! rendezvous), or [`Nccl::init_all`] for every GPU of one process on one thread, whose calls
//! then go inside [`group`] so that NCCL sees each collective's ranks together.
//!
//! ```no_run
//! use barlow::cuda::nccl::{Nccl, NcclId};
//! # fn main() -> barlow::Result<()> {
//! let id = NcclId::new()?; // on rank 0; the others get its bytes
//! let stream = barlow::cuda::open_stream(0)?;
//! let comm = Nccl::init_rank(&stream, 0, 1, &id)?;
//! let mut grads = stream.clone_htod(&[1.0f32, 2.0])?;
//! comm.all_reduce_sum_f32(&mut grads)?;
//! # Ok(())
//! # }
//! ```

use super::drv;
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
pub use cudarc::nccl::NcclType;
use cudarc::nccl::{result::NcclError, Comm, Id, ReduceOp};
use std::sync::Arc;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn check_nccl() -> Result<()> {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    // The first name cudarc's loader tries, so the probe holds exactly when loading would.
    let name = format!("{DLL_PREFIX}nccl{DLL_SUFFIX}");
    // SAFETY: opening the library runs only its initializers, which have no preconditions; the
    // handle is closed at once and no symbol is looked up.
    if unsafe { libloading::Library::new(&name) }.is_err() {
        return Err(Error::NoNccl);
    }
    Ok(())
}

fn nccl(during: &'static str) -> impl Fn(NcclError) -> Error {
    move |e| Error::Collective {
        during: during.into(),
        message: format!("NCCL: {e:?}"),
    }
}

/// The id a group's ranks share, made by one rank and sent to the others.
#[derive(Clone, Copy)]
pub struct NcclId(Id);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new id (on the rank that starts the group).
    pub fn new() -> Result<Self> {
        check_nccl()?;
        Ok(Self(Id::new().map_err(nccl("making an NCCL id"))?))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; ID_BYTES] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id from the bytes another rank sent ([`NcclId::to_bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let b: [u8; ID_BYTES] = bytes.try_into().map_err(|_| Error::Collective {
            during: "reading an NCCL id".into(),
            message: format!("{} bytes, an id has {ID_BYTES}", bytes.len()),
        })?;
        Ok(Self(Id::uninit(b.map(|c| c as std::ffi::c_char))))
    }
}

/// One rank of an NCCL group, bound to the stream its collectives are queued on.
#[derive(Debug)]
pub struct Nccl {
    comm: Comm,
}

impl Nccl {
    /// Joins the group `id` as `rank` of `world`; returns when every rank has joined.
    pub fn init_rank(
        stream: &Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self> {
        check_nccl()?;
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} of a group of {world}"
            )));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(drv("binding the rank's context"))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id.0)
            .map_err(nccl("joining an NCCL group"))?;
        Ok(Self { comm })
    }

    /// A group of one rank per stream (each on its own device), made on this thread; rank i is
    /// `streams[i]`. Issue each collective for all ranks inside one [`group`] call.
    pub fn init_all(streams: &[Arc<CudaStream>]) -> Result<Vec<Self>> {
        check_nccl()?;
        if streams.is_empty() {
            return Err(Error::InvalidConfig("an NCCL group of no streams".into()));
        }
        let comms = Comm::from_devices(streams.to_vec()).map_err(nccl("making an NCCL group"))?;
        Ok(comms.into_iter().map(|comm| Self { comm }).collect())
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The stream the collectives are queued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// Sums `buf` over the ranks, in place.
    pub fn all_reduce_sum_f32(&self, buf: &mut impl DevicePtrMut<f32>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(drop)
            .map_err(nccl("an NCCL all-reduce"))
    }

    /// Sums `buf` over the ranks, in place (f64).
    pub fn all_reduce_sum_f64(&self, buf: &mut impl DevicePtrMut<f64>) -> Result<()> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map(drop)
            .map_err(nccl("an NCCL all-reduce"))
    }

    /// Every rank's `send`, in rank order, into `recv` (`world_size()` times as long).
    pub fn all_gather<T: NcclType>(
        &self,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let need = send.len() * self.world_size();
        if recv.len() != need {
            return Err(Error::BufferTooSmall {
                name: "all-gather receive buffer",
                len: recv.len(),
                needed: need,
            });
        }
        self.comm
            .all_gather(send, recv)
            .map(drop)
            .map_err(nccl("an NCCL all-gather"))
    }

    /// Rank `root`'s `buf` into every rank's `buf`.
    pub fn broadcast_f32(&self, buf: &mut impl DevicePtrMut<f32>, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::InvalidConfig(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size()
            )));
        }
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map(drop)
            .map_err(nccl("an NCCL broadcast"))
    }

    /// Runs `f`, which issues collectives on this communicator's stream, after the work queued
    /// on `work` so far, and orders `work`'s later work after it (events both ways): how a rank
    /// whose compute runs on another stream than its communicator's uses it. On the same stream
    /// there is nothing to order.
    pub fn ordered<R>(&self, work: &CudaStream, f: impl FnOnce(&Self) -> Result<R>) -> Result<R> {
        let own = self.comm.stream();
        if own.cu_stream() == work.cu_stream() {
            return f(self);
        }
        let before = work
            .record_event(None)
            .map_err(drv("marking the work before a collective"))?;
        own.wait(&before)
            .map_err(drv("ordering a collective after the compute stream"))?;
        let result = f(self);
        let after = own
            .record_event(None)
            .map_err(drv("marking the end of a collective"))?;
        work.wait(&after)
            .map_err(drv("ordering the compute stream after a collective"))?;
        result
    }
}

/// Runs `f` as one NCCL group: the collectives it issues (for several ranks of this thread) are
/// launched together when it returns.
pub fn group<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    check_nccl()?;
    cudarc::nccl::group_start().map_err(nccl("starting an NCCL group call"))?;
    let r = f();
    let end = cudarc::nccl::group_end().map_err(nccl("ending an NCCL group call"));
    let r = r?;
    end?;
    Ok(r)
}
