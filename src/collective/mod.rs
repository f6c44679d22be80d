//! Collectives between the ranks of a data-parallel group: the few operations the distributed
//! loss and training need (sum all-reduce, all-gather, broadcast), behind one small trait.
//!
//! [`LocalGroup`] runs W ranks as threads of one process, for tests and for CPU training on one
//! machine. Results are summed in rank order, so every rank gets bit-identical values and a run
//! is reproducible. A rank that leaves the group (its handle dropped, e.g. by a panic) or stops
//! answering makes the others' calls fail with [`Error::Collective`] instead of waiting forever.
//!
//! Processes find one another the way PyTorch launchers describe them ([`Launch`]: `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), and rank 0 hands every other rank
//! what a communicator needs (an NCCL id) over a small TCP rendezvous ([`Host`], [`join`]).
//!
//! ```
//! use barlow::collective::{Collective, LocalGroup};
//!
//! let ranks = LocalGroup::new(3)?;
//! let sums: Vec<f64> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .into_iter()
//!         .map(|comm| {
//!             s.spawn(move || {
//!                 let mut x = [comm.rank() as f64 + 1.0];
//!                 comm.all_reduce_sum_f64(&mut x).map(|()| x[0])
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect::<barlow::Result<_>>()
//! })?;
//! assert_eq!(sums, [6.0, 6.0, 6.0]);
//! # Ok::<(), barlow::Error>(())
//! ```

mod rendezvous;

pub use rendezvous::{join, Host, Launch};

use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The operations a data-parallel group offers. Every rank calls the same operations in the same
/// order with buffers of the same length; a call returns when every rank has made it.
pub trait Collective: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks, in place (f64: statistics and scalars).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise sum over the ranks, in place (f32: matrices and gradients).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `send` (all of one length), concatenated in rank order into `recv`, which
    /// holds `world_size() · send.len()` elements.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `buf` on every rank becomes rank `root`'s `buf`.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
}

/// How long a rank waits for the others before its call fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What each rank put in for the current operation.
#[derive(Default)]
struct Round {
    /// Operation name and contribution of each rank present so far.
    slots: Vec<Option<(&'static str, Contribution)>>,
    /// Ranks that have read the result of the current round.
    taken: usize,
    /// Rounds completed (tells a waiting rank that its round finished).
    generation: u64,
    /// A rank that dropped its handle; the group is unusable after that.
    departed: Option<usize>,
}

#[derive(Clone)]
enum Contribution {
    F64(Vec<f64>),
    F32(Vec<f32>),
}

impl Contribution {
    fn len(&self) -> usize {
        match self {
            Contribution::F64(v) => v.len(),
            Contribution::F32(v) => v.len(),
        }
    }
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One rank of an in-process group; move each to its own thread. After a failed call the group
/// is unusable: make a new one.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGroup")
            .field("rank", &self.rank)
            .field("world", &self.shared.world)
            .finish()
    }
}

impl LocalGroup {
    /// `world` ranks (1 or more), in rank order, each waiting at most [`DEFAULT_TIMEOUT`] for
    /// the others.
    pub fn new(world: usize) -> Result<Vec<LocalGroup>> {
        Self::with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// `world` ranks that wait at most `timeout` for one another in each call.
    pub fn with_timeout(world: usize, timeout: Duration) -> Result<Vec<LocalGroup>> {
        if world == 0 {
            return Err(Error::InvalidConfig("a group of 0 ranks".into()));
        }
        let shared = Arc::new(Shared {
            world,
            timeout,
            round: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        Ok((0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // Every field is consistent between statements; a panic elsewhere cannot tear it.
        self.shared.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, during: &str, message: String) -> Error {
        Error::Collective {
            during: format!("{during} on rank {} of {}", self.rank, self.shared.world),
            message,
        }
    }

    /// Deposits this rank's contribution, waits for every rank's, and hands all of them (in rank
    /// order) to `read`. The last rank to read opens the next round.
    fn exchange<R>(
        &self,
        op: &'static str,
        mine: Contribution,
        read: impl FnOnce(&[Contribution]) -> Result<R>,
    ) -> Result<R> {
        let world = self.shared.world;
        let deadline = Instant::now() + self.shared.timeout;
        let mut g = self.lock();
        // Wait until this rank's slot of the current round is free (the previous round drained).
        while g.slots[self.rank].is_some() {
            g = self.wait(g, op, deadline)?;
        }
        if let Some(r) = g.departed {
            return Err(self.fail(op, format!("rank {r} left the group")));
        }
        g.slots[self.rank] = Some((op, mine));
        let generation = g.generation;
        self.shared.changed.notify_all();
        while g.generation == generation && g.slots.iter().any(Option::is_none) {
            g = self.wait(g, op, deadline)?;
        }
        let all: Vec<(&'static str, Contribution)> =
            g.slots.iter().map(|s| s.clone().expect("full")).collect();
        g.taken += 1;
        if g.taken == world {
            g.taken = 0;
            g.generation += 1;
            g.slots.iter_mut().for_each(|s| *s = None);
            self.shared.changed.notify_all();
        }
        drop(g);
        if let Some((r, (other, _))) = all.iter().enumerate().find(|(_, (o, _))| *o != op) {
            return Err(self.fail(op, format!("rank {r} called {other} instead")));
        }
        let len = all[self.rank].1.len();
        if let Some((r, (_, c))) = all.iter().enumerate().find(|(_, (_, c))| c.len() != len) {
            return Err(self.fail(
                op,
                format!("rank {r} sent {} elements, this rank {len}", c.len()),
            ));
        }
        let values: Vec<Contribution> = all.into_iter().map(|(_, c)| c).collect();
        read(&values)
    }

    fn wait<'a>(
        &self,
        g: MutexGuard<'a, Round>,
        op: &str,
        deadline: Instant,
    ) -> Result<MutexGuard<'a, Round>> {
        if let Some(r) = g.departed {
            return Err(self.fail(op, format!("rank {r} left the group")));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // The round cannot complete; later calls on any rank fail at once.
            let mut g = g;
            g.departed.get_or_insert(self.rank);
            self.shared.changed.notify_all();
            return Err(self.fail(
                op,
                format!(
                    "the other ranks did not answer within {:?}",
                    self.shared.timeout
                ),
            ));
        }
        let (g, _) = self
            .shared
            .changed
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner());
        Ok(g)
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let mut g = self.lock();
        g.departed.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

fn sum_into<T: Copy + std::ops::Add<Output = T>>(
    parts: impl Iterator<Item = Vec<T>>,
    buf: &mut [T],
) {
    let mut parts = parts;
    if let Some(first) = parts.next() {
        buf.copy_from_slice(&first);
    }
    for p in parts {
        buf.iter_mut().zip(&p).for_each(|(b, x)| *b = *b + *x);
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.exchange(
            "all_reduce_sum_f64",
            Contribution::F64(buf.to_vec()),
            |all| {
                sum_into(
                    all.iter().map(|c| match c {
                        Contribution::F64(v) => v.clone(),
                        Contribution::F32(_) => unreachable!("checked by operation name"),
                    }),
                    buf,
                );
                Ok(())
            },
        )
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.exchange(
            "all_reduce_sum_f32",
            Contribution::F32(buf.to_vec()),
            |all| {
                sum_into(
                    all.iter().map(|c| match c {
                        Contribution::F32(v) => v.clone(),
                        Contribution::F64(_) => unreachable!("checked by operation name"),
                    }),
                    buf,
                );
                Ok(())
            },
        )
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let need = send.len() * self.shared.world;
        let ok = recv.len() == need;
        // Exchanged even when this rank's buffer is wrong, so the others fail too, not hang.
        let r = self.exchange("all_gather_f32", Contribution::F32(send.to_vec()), |all| {
            if !ok {
                return Ok(false);
            }
            for (dst, c) in recv.chunks_exact_mut(send.len().max(1)).zip(all) {
                if let Contribution::F32(v) = c {
                    dst.copy_from_slice(v);
                }
            }
            Ok(true)
        })?;
        if !r {
            return Err(Error::BufferTooSmall {
                name: "all-gather receive buffer",
                len: recv.len(),
                needed: need,
            });
        }
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(self.fail(
                "broadcast_f32",
                format!("root {root} is not a rank of this group"),
            ));
        }
        self.exchange("broadcast_f32", Contribution::F32(buf.to_vec()), |all| {
            if let Contribution::F32(v) = &all[root] {
                buf.copy_from_slice(v);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<R: Send>(world: usize, f: impl Fn(LocalGroup) -> R + Sync) -> Vec<R> {
        let ranks = LocalGroup::with_timeout(world, Duration::from_secs(20)).unwrap();
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = ranks.into_iter().map(|c| s.spawn(move || f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_the_same_sums_gathers_and_broadcasts() {
        let out = run(3, |c| {
            let r = c.rank() as f32;
            let mut results = Vec::new();
            for round in 0..50 {
                let mut x = vec![r + round as f32, 0.5 * r];
                c.all_reduce_sum_f32(&mut x).unwrap();
                let mut g = vec![0f32; 6];
                c.all_gather_f32(&[r, -r], &mut g).unwrap();
                let mut b = vec![r; 2];
                c.broadcast_f32(&mut b, 1).unwrap();
                let mut d = vec![f64::from(r) * 1e-17, 1.0];
                c.all_reduce_sum_f64(&mut d).unwrap();
                results.push((x, g, b, d));
            }
            results
        });
        for rank in &out {
            for (round, (x, g, b, d)) in rank.iter().enumerate() {
                assert_eq!(x, &vec![3.0 + 3.0 * round as f32, 1.5]);
                assert_eq!(g, &vec![0., -0., 1., -1., 2., -2.]);
                assert_eq!(b, &vec![1.0, 1.0]);
                assert_eq!(d[1], 3.0);
            }
        }
        assert_eq!(out[0], out[2]);
    }

    #[test]
    fn mismatched_calls_fail_on_every_rank() {
        let out = run(2, |c| {
            let mut x = vec![1.0; 2 + c.rank()];
            c.all_reduce_sum_f32(&mut x)
        });
        for r in out {
            assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        }
        let out = run(2, |c| {
            if c.rank() == 0 {
                c.all_reduce_sum_f32(&mut [1.0])
            } else {
                c.broadcast_f32(&mut [1.0], 0)
            }
        });
        for r in out {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("instead"), "{msg}");
        }
        let out = run(2, |c| {
            let mut recv = vec![0f32; 3 + c.rank()];
            c.all_gather_f32(&[1.0, 2.0], &mut recv)
        });
        assert!(matches!(out[0], Err(Error::BufferTooSmall { .. })));
        assert!(out[1].is_ok());
    }

    #[test]
    fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
        let out = run(3, |c| {
            if c.rank() == 1 {
                drop(c);
                return Err(Error::InvalidConfig("left".into()));
            }
            let mut x = [1.0];
            c.all_reduce_sum_f64(&mut x)
        });
        for r in [&out[0], &out[2]] {
            let msg = r.as_ref().unwrap_err().to_string();
            assert!(msg.contains("rank 1 left the group"), "{msg}");
        }
        let ranks = LocalGroup::with_timeout(2, Duration::from_millis(50)).unwrap();
        let err = ranks[0].all_reduce_sum_f64(&mut [1.0]).unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert!(LocalGroup::new(0).is_err());
    }
}
