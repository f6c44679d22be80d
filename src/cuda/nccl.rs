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
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, OnceLock};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

type NcclComm = *mut c_void;

/// `ncclUniqueId`: a C struct of 128 bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; ID_BYTES],
}
type Status = c_int;

/// The NCCL entry points barlow calls, from the library loaded at run time.
struct Lib {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank: unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> Status,
    comm_init_all: unsafe extern "C" fn(*mut NcclComm, c_int, *const c_int) -> Status,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    group_start: unsafe extern "C" fn() -> Status,
    group_end: unsafe extern "C" fn() -> Status,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        NcclComm,
        *mut c_void,
    ) -> Status,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        NcclComm,
        *mut c_void,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        NcclComm,
        *mut c_void,
    ) -> Status,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

/// The names NCCL ships under, the versioned one first: the NCCL wheel and Debian's libnccl2
/// have only `libnccl.so.2`; a development install adds `libnccl.so`.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

fn load() -> Option<Lib> {
    NAMES.iter().find_map(|name| {
        // SAFETY: opening NCCL runs only its initializers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(*name) }.ok()?;
        // SAFETY: each symbol is NCCL's public C function of that name, whose signature (NCCL 2,
        // nccl.h) is the field's type; the library stays loaded with them in `_lib`.
        unsafe {
            Some(Lib {
                get_unique_id: *lib.get(b"ncclGetUniqueId").ok()?,
                comm_init_rank: *lib.get(b"ncclCommInitRank").ok()?,
                comm_init_all: *lib.get(b"ncclCommInitAll").ok()?,
                comm_destroy: *lib.get(b"ncclCommDestroy").ok()?,
                get_error_string: *lib.get(b"ncclGetErrorString").ok()?,
                group_start: *lib.get(b"ncclGroupStart").ok()?,
                group_end: *lib.get(b"ncclGroupEnd").ok()?,
                all_reduce: *lib.get(b"ncclAllReduce").ok()?,
                all_gather: *lib.get(b"ncclAllGather").ok()?,
                broadcast: *lib.get(b"ncclBroadcast").ok()?,
                _lib: lib,
            })
        }
    })
}

/// NCCL, loaded once per process; [`Error::NoNccl`] when no library with its entry points is
/// found under the names it ships as.
fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().ok_or(Error::NoNccl)
}

/// An error for NCCL status `s` during `during`, with NCCL's own words for it.
fn check(lib: &Lib, during: &str, s: Status) -> Result<()> {
    if s == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any status.
    let text = unsafe {
        let p = (lib.get_error_string)(s);
        if p.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(Error::Collective {
        during: during.into(),
        message: format!("NCCL error {s}: {text}"),
    })
}

/// Element types NCCL reduces and moves, with its code for each (`ncclDataType_t`).
pub trait NcclType: DeviceRepr {
    /// NCCL's code for the type.
    const NCCL: c_int;
}
impl NcclType for f32 {
    const NCCL: c_int = 7;
}
impl NcclType for f64 {
    const NCCL: c_int = 8;
}
impl NcclType for half::f16 {
    const NCCL: c_int = 6;
}
impl NcclType for half::bf16 {
    const NCCL: c_int = 9;
}
impl NcclType for i32 {
    const NCCL: c_int = 2;
}

/// `ncclSum`.
const SUM: c_int = 0;

/// The id a group's ranks share, made by one rank and sent to the others.
#[derive(Clone, Copy)]
pub struct NcclId(UniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new id (on the rank that starts the group).
    pub fn new() -> Result<Self> {
        let lib = lib()?;
        let mut id = UniqueId {
            internal: [0; ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId fills the id it is given.
        check(lib, "making an NCCL id", unsafe {
            (lib.get_unique_id)(&mut id)
        })?;
        Ok(Self(id))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn to_bytes(&self) -> [u8; ID_BYTES] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id from the bytes another rank sent ([`NcclId::to_bytes`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let b: [u8; ID_BYTES] = bytes.try_into().map_err(|_| Error::Collective {
            during: "reading an NCCL id".into(),
            message: format!("{} bytes, an id has {ID_BYTES}", bytes.len()),
        })?;
        Ok(Self(UniqueId {
            internal: b.map(|c| c as c_char),
        }))
    }
}

/// One rank of an NCCL group, bound to the stream its collectives are queued on.
pub struct Nccl {
    comm: NcclComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    lib: &'static Lib,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl(rank {} of {})", self.rank, self.world)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        // SAFETY: the communicator is this value's own, made by ncclCommInitRank/All, and is
        // destroyed once.
        unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

impl Nccl {
    /// Joins the group `id` as `rank` of `world`; returns when every rank has joined.
    pub fn init_rank(
        stream: &Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &NcclId,
    ) -> Result<Self> {
        let lib = lib()?;
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(Error::InvalidConfig(format!(
                "rank {rank} of a group of {world}"
            )));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(drv("binding the rank's context"))?;
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; world and rank were checked to fit.
        let s = unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id.0, rank as c_int) };
        check(lib, "joining an NCCL group", s)?;
        Ok(Self {
            comm,
            stream: stream.clone(),
            rank,
            world,
            lib,
        })
    }

    /// A group of one rank per stream (each on its own device), made on this thread; rank i is
    /// `streams[i]`. Issue each collective for all ranks inside one [`group`] call.
    pub fn init_all(streams: &[Arc<CudaStream>]) -> Result<Vec<Self>> {
        let lib = lib()?;
        if streams.is_empty() || streams.len() > i32::MAX as usize {
            return Err(Error::InvalidConfig(format!(
                "an NCCL group of {} streams",
                streams.len()
            )));
        }
        let devices: Vec<c_int> = streams
            .iter()
            .map(|s| s.context().ordinal() as c_int)
            .collect();
        let mut comms: Vec<NcclComm> = vec![std::ptr::null_mut(); streams.len()];
        // SAFETY: `comms` has room for one communicator per device listed in `devices`.
        let s = unsafe {
            (lib.comm_init_all)(comms.as_mut_ptr(), streams.len() as c_int, devices.as_ptr())
        };
        check(lib, "making an NCCL group", s)?;
        let world = streams.len();
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| Self {
                comm,
                stream: stream.clone(),
                rank,
                world,
                lib,
            })
            .collect())
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The stream the collectives are queued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    /// Sums `buf` over the ranks, in place.
    pub fn all_reduce_sum_f32(&self, buf: &mut impl DevicePtrMut<f32>) -> Result<()> {
        self.all_reduce_sum(buf)
    }

    /// Sums `buf` over the ranks, in place (f64).
    pub fn all_reduce_sum_f64(&self, buf: &mut impl DevicePtrMut<f64>) -> Result<()> {
        self.all_reduce_sum(buf)
    }

    fn all_reduce_sum<T: NcclType>(&self, buf: &mut impl DevicePtrMut<T>) -> Result<()> {
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` is a live device buffer of `count` elements of T on this rank's device
        // (the guard records its use on the stream); NCCL reads and writes it in place, in
        // stream order.
        let s = unsafe {
            (self.lib.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::NCCL,
                SUM,
                self.comm,
                self.stream.cu_stream() as *mut c_void,
            )
        };
        check(self.lib, "an NCCL all-reduce", s)
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
        let count = send.len();
        let (src, _rs) = send.device_ptr(&self.stream);
        let (dst, _rd) = recv.device_ptr_mut(&self.stream);
        // SAFETY: `src` holds `count` elements and `dst` `count × world` (checked above), both
        // live on this rank's device and used in stream order.
        let s = unsafe {
            (self.lib.all_gather)(
                src as *const c_void,
                dst as *mut c_void,
                count,
                T::NCCL,
                self.comm,
                self.stream.cu_stream() as *mut c_void,
            )
        };
        check(self.lib, "an NCCL all-gather", s)
    }

    /// Rank `root`'s `buf` into every rank's `buf`.
    pub fn broadcast_f32(&self, buf: &mut impl DevicePtrMut<f32>, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::InvalidConfig(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size()
            )));
        }
        let count = buf.len();
        let (ptr, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` is a live device buffer of `count` f32 on this rank's device, used in
        // stream order; `root` is a rank of the group.
        let s = unsafe {
            (self.lib.broadcast)(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                f32::NCCL,
                root as c_int,
                self.comm,
                self.stream.cu_stream() as *mut c_void,
            )
        };
        check(self.lib, "an NCCL broadcast", s)
    }

    /// Runs `f`, which issues collectives on this communicator's stream, after the work queued
    /// on `work` so far, and orders `work`'s later work after it (events both ways): how a rank
    /// whose compute runs on another stream than its communicator's uses it. On the same stream
    /// there is nothing to order.
    pub fn ordered<R>(&self, work: &CudaStream, f: impl FnOnce(&Self) -> Result<R>) -> Result<R> {
        let own = &self.stream;
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
    let lib = lib()?;
    // SAFETY: ncclGroupStart/End take no arguments; they bracket the calls `f` makes.
    check(lib, "starting an NCCL group call", unsafe {
        (lib.group_start)()
    })?;
    let r = f();
    // SAFETY: as above, closing the group opened here.
    let end = check(lib, "ending an NCCL group call", unsafe {
        (lib.group_end)()
    });
    let r = r?;
    end?;
    Ok(r)
}
