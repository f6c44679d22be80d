//! Who trains: one engine, a worker thread per GPU of this machine, one process of a launched
//! group, or CPU ranks as threads (the data-parallel run's CPU twin). Each rank runs
//! the run loop on its share of every batch; rank 0 reports and writes.
//!
//! Ranks in one process share one copy of the data and report through rank 0; a rank that fails
//! ends the run at once with its error (a rank left waiting on the others stays blocked in its
//! collective, so a program should exit after an error here, as `barlow train` does). Ranks of a
//! launched group get rank 0's configuration, start step and NCCL id over the rendezvous, so
//! only rank 0 needs the checkpoint of a resumed run.

use super::run::{run_rank, DeviceChoice, Progress, Quiet, Resume, Setup, Summary, TrainConfig};
use crate::collective::{Collective, Launch, LocalGroup, DEFAULT_TIMEOUT};
use crate::cuda::nccl::NcclId;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How many ranks train together and how they reach one another.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Ranks {
    /// One engine: the CPU or one GPU.
    #[default]
    One,
    /// A worker thread per GPU of this machine (devices `0..n`), NCCL between them.
    Gpus(usize),
    /// This process is one rank of a group started by a launcher (see [`Launch::from_vars`]),
    /// on GPU `LOCAL_RANK`; rank 0 hands the others its configuration and the NCCL id.
    Launched(Launch),
    /// `n` CPU ranks as threads of this process, summing through a [`LocalGroup`]: the CPU
    /// twin of a data-parallel run, for checking it (no faster than one rank).
    CpuThreads(usize),
}

impl Ranks {
    /// Number of ranks in the run.
    pub fn world(&self) -> usize {
        match self {
            Ranks::One => 1,
            Ranks::Gpus(n) | Ranks::CpuThreads(n) => *n,
            Ranks::Launched(l) => l.world_size,
        }
    }
}

/// How a rank reaches the others.
pub enum Link {
    /// A member of an in-process CPU group.
    Cpu(Box<dyn Collective>),
    /// A GPU rank of the NCCL group with this id.
    Nccl(NcclId),
}

/// One rank's place in a run.
pub(crate) struct Member {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    /// The CUDA device this rank opens.
    pub(crate) ordinal: usize,
    /// `None`: the only rank.
    pub(crate) link: Option<Link>,
}

impl Member {
    /// The device this rank asks for: a GPU rank must get a GPU (`auto` does not fall back to
    /// the CPU inside a group).
    pub(crate) fn device(&self, asked: DeviceChoice) -> DeviceChoice {
        match self.link {
            Some(Link::Nccl(_)) => DeviceChoice::Cuda,
            _ => asked,
        }
    }
}

pub(crate) fn run(
    cfg: &TrainConfig,
    ranks: &Ranks,
    out: &Path,
    resume: Option<&Resume>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let world = ranks.world();
    if world == 0 {
        return Err(Error::InvalidConfig("a run needs at least one rank".into()));
    }
    let gpu = !matches!(ranks, Ranks::One | Ranks::CpuThreads(_));
    if gpu && cfg.device == DeviceChoice::Cpu {
        return Err(Error::InvalidConfig(format!(
            "{world} GPU rank(s) asked for with --device cpu; data-parallel ranks run on GPUs \
             (--device cuda)"
        )));
    }
    if let Ranks::Gpus(n) = ranks {
        let found = crate::cuda::device_count()?;
        if *n > found {
            return Err(Error::NoDevice(format!(
                "{n} GPUs asked for, {found} CUDA device(s) found"
            )));
        }
    }
    match ranks {
        Ranks::One => {
            let setup = Setup::new(cfg, out, resume)?;
            check_split(&setup.cfg, 1)?;
            let solo = Member {
                rank: 0,
                world: 1,
                ordinal: 0,
                link: None,
            };
            run_rank(&setup, solo, out, progress)
        }
        Ranks::Gpus(n) => {
            let setup = Setup::new(cfg, out, resume)?;
            check_split(&setup.cfg, *n)?;
            let id = NcclId::new()?;
            let links = (0..*n).map(|_| Link::Nccl(id)).collect();
            threads(setup, links, out, progress)
        }
        Ranks::CpuThreads(n) => {
            let setup = Setup::new(cfg, out, resume)?;
            check_split(&setup.cfg, *n)?;
            let links = LocalGroup::new(*n)?
                .into_iter()
                .map(|g| Link::Cpu(Box::new(g)))
                .collect();
            threads(setup, links, out, progress)
        }
        Ranks::Launched(l) => launched(cfg, l, out, resume, progress),
    }
}

fn check_split(cfg: &TrainConfig, world: usize) -> Result<()> {
    if !cfg.batch_size.is_multiple_of(world) {
        return Err(Error::InvalidConfig(format!(
            "a batch of {} images does not split evenly over {world} ranks; choose a multiple \
             of {world}",
            cfg.batch_size
        )));
    }
    Ok(())
}

/// What rank 0 hands the other processes: its NCCL id and its run state.
#[derive(serde::Serialize, serde::Deserialize)]
struct Handout {
    nccl_id: Vec<u8>,
    state: serde_json::Value,
}

fn launched(
    cfg: &TrainConfig,
    l: &Launch,
    out: &Path,
    resume: Option<&Resume>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let member = |id: NcclId| Member {
        rank: l.rank,
        world: l.world_size,
        ordinal: l.local_rank,
        link: Some(Link::Nccl(id)),
    };
    if l.rank == 0 {
        let setup = Setup::new(cfg, out, resume)?;
        check_split(&setup.cfg, l.world_size)?;
        let id = NcclId::new()?;
        let handout = Handout {
            nccl_id: id.to_bytes().to_vec(),
            state: setup.shared_state(),
        };
        let payload = serde_json::to_vec(&handout).map_err(|e| Error::Collective {
            during: "writing the run state for the other ranks".into(),
            message: e.to_string(),
        })?;
        l.share(|| Ok(payload), DEFAULT_TIMEOUT)?;
        run_rank(&setup, member(id), out, progress)
    } else {
        progress.message(&format!(
            "rank {} of {}: waiting for rank 0 at {}:{} (at most {} s)",
            l.rank,
            l.world_size,
            l.master_addr,
            l.master_port,
            DEFAULT_TIMEOUT.as_secs()
        ));
        let bytes = l.share(|| Ok(Vec::new()), DEFAULT_TIMEOUT)?;
        let handout: Handout = serde_json::from_slice(&bytes).map_err(|e| Error::Collective {
            during: format!("reading rank 0's run state on rank {}", l.rank),
            message: e.to_string(),
        })?;
        let setup = Setup::from_shared(cfg, &handout.state)?;
        check_split(&setup.cfg, l.world_size)?;
        let id = NcclId::from_bytes(&handout.nccl_id)?;
        run_rank(&setup, member(id), out, &mut Quiet)
    }
}

/// What rank threads tell the calling thread.
enum Event {
    Start(usize, usize),
    Step(usize, f64, f64),
    Message(String),
    Finish,
    Done(usize, Result<Summary>),
}

/// Rank 0's progress, forwarded to the calling thread (which owns the caller's `Progress`).
struct Forward {
    tx: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
}

impl Progress for Forward {
    fn start(&mut self, total: usize, first: usize) {
        let _ = self.tx.send(Event::Start(total, first));
    }
    fn step(&mut self, step: usize, loss: f64, rate: f64) {
        let _ = self.tx.send(Event::Step(step, loss, rate));
    }
    fn message(&mut self, text: &str) {
        let _ = self.tx.send(Event::Message(text.to_string()));
    }
    fn finish(&mut self) {
        let _ = self.tx.send(Event::Finish);
    }
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Runs rank r of `links` on a thread of its own; returns rank 0's summary, or the first error
/// (rank 0's when it has one).
fn threads(
    setup: Setup,
    links: Vec<Link>,
    out: &Path,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let world = links.len();
    let setup = Arc::new(setup);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Event>();
    for (rank, link) in links.into_iter().enumerate() {
        let (setup, tx, flag) = (setup.clone(), tx.clone(), stop.clone());
        let out: PathBuf = out.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name(format!("barlow-rank-{rank}"))
            .spawn(move || {
                let member = Member {
                    rank,
                    world,
                    ordinal: rank,
                    link: Some(link),
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut forward = Forward {
                        tx: tx.clone(),
                        stop: flag,
                    };
                    let mut quiet = Quiet;
                    let p: &mut dyn Progress = if rank == 0 { &mut forward } else { &mut quiet };
                    run_rank(&setup, member, &out, p)
                }))
                .unwrap_or_else(|_| {
                    Err(Error::Collective {
                        during: format!("rank {rank} of {world}"),
                        message: "the rank's thread panicked".into(),
                    })
                });
                let _ = tx.send(Event::Done(rank, result));
            });
        if let Err(e) = spawned {
            stop.store(true, Ordering::Relaxed);
            return Err(Error::Collective {
                during: format!("starting rank {rank} of {world}"),
                message: e.to_string(),
            });
        }
    }
    drop(tx);
    let mut lead: Option<Summary> = None;
    let mut done = 0;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Start(total, first)) => progress.start(total, first),
            Ok(Event::Step(s, loss, rate)) => progress.step(s, loss, rate),
            Ok(Event::Message(m)) => progress.message(&m),
            Ok(Event::Finish) => progress.finish(),
            Ok(Event::Done(rank, Ok(s))) => {
                done += 1;
                if rank == 0 {
                    lead = Some(s);
                }
                if done == world {
                    break;
                }
            }
            Ok(Event::Done(0, Err(e))) => return Err(e),
            Ok(Event::Done(_, Err(e))) => {
                // A rank whose peer left fails too; rank 0's own error, when it has one, says
                // what happened.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                    match rx.recv_timeout(left) {
                        Ok(Event::Done(0, Err(first))) => return Err(first),
                        Ok(Event::Message(m)) => progress.message(&m),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                return Err(e);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if progress.stop_requested() {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    lead.ok_or_else(|| Error::Collective {
        during: format!("a run of {world} ranks"),
        message: "rank 0 ended without a result".into(),
    })
}
