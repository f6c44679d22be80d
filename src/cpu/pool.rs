//! Large f32 buffers recycled across calls. A training step asks for the same sizes as the step
//! before, so once the first step has run, its activations, gradients and scratch come from here
//! instead of the allocator (whose fresh pages the kernel would fault in and zero every step).
//!
//! The pool holds at most twice the bytes that were ever out at once (or a floor): a step's
//! buffers, all back at its end, are more than its peak, as some were freed before others were
//! asked for. When full it lets go of the sizes asked for least recently first, so memory stays
//! bounded by the largest working set seen, and a change of working set (evaluation's batch
//! sizes, then training again) replaces the old buffers instead of piling them up.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Buffers shorter than this (in f32s) go straight to the allocator, which serves them well.
const MIN_LEN: usize = 4096;
/// The pool may always hold this many bytes, however small the working set.
const FLOOR_BYTES: usize = 64 << 20;

#[derive(Default)]
struct State {
    free: HashMap<usize, Vec<Vec<f32>>>,
    /// When each size was last asked for (a counter of requests).
    asked: HashMap<usize, u64>,
    ticks: u64,
    held: usize,
    out: usize,
    peak_out: usize,
    fresh: u64,
    reused: u64,
}

/// What a pool has done since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests the allocator served (nothing of that size was free).
    pub fresh: u64,
    /// Requests served from the pool.
    pub reused: u64,
    /// Bytes held for reuse now.
    pub held_bytes: usize,
}

/// A pool of buffers (the process has one, behind [`take`] and [`give`]).
pub(crate) struct Pool {
    state: Mutex<Option<State>>,
    floor: usize,
}

impl Pool {
    pub(crate) const fn new(floor: usize) -> Self {
        Self {
            state: Mutex::new(None),
            floor,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        // Every update completes under the lock, so a panic elsewhere leaves nothing half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, len: usize) -> Vec<f32> {
        if len < MIN_LEN {
            return vec![0.0; len];
        }
        let bytes = len * 4;
        let reused = {
            let mut g = self.lock();
            let p = g.get_or_insert_with(State::default);
            p.ticks += 1;
            p.asked.insert(len, p.ticks);
            p.out += bytes;
            p.peak_out = p.peak_out.max(p.out);
            let v = p.free.get_mut(&len).and_then(Vec::pop);
            match v {
                Some(_) => {
                    p.held -= bytes;
                    p.reused += 1;
                }
                None => p.fresh += 1,
            }
            v
        };
        match reused {
            // A write that misses part of the buffer shows up as NaN in debug builds and tests.
            Some(mut v) if poison() => {
                v.fill(f32::NAN);
                v
            }
            Some(v) => v,
            None => vec![0.0; len],
        }
    }

    fn give(&self, v: Vec<f32>) {
        let len = v.len();
        if len < MIN_LEN || v.capacity() != len {
            return;
        }
        let bytes = len * 4;
        let mut g = self.lock();
        let p = g.get_or_insert_with(State::default);
        p.out = p.out.saturating_sub(bytes);
        let limit = (2 * p.peak_out).max(self.floor);
        while p.held + bytes > limit {
            // Let go of a buffer of the size asked for least recently (never this one's).
            let stale = p
                .free
                .keys()
                .filter(|&&l| l != len)
                .min_by_key(|l| p.asked.get(l).copied().unwrap_or(0))
                .copied();
            let Some(l) = stale else {
                return;
            };
            let list = p.free.get_mut(&l).expect("listed");
            list.pop();
            if list.is_empty() {
                p.free.remove(&l);
            }
            p.held -= l * 4;
        }
        p.held += bytes;
        p.free.entry(len).or_default().push(v);
    }

    fn stats(&self) -> PoolStats {
        self.lock()
            .as_ref()
            .map_or(PoolStats::default(), |p| PoolStats {
                fresh: p.fresh,
                reused: p.reused,
                held_bytes: p.held,
            })
    }
}

/// Whether reused buffers are filled with NaN first: in debug builds, and wherever
/// `BARLOW_POISON_BUFFERS=1` (the test suite sets it).
fn poison() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(debug_assertions) || std::env::var("BARLOW_POISON_BUFFERS").is_ok_and(|v| v == "1")
    })
}

static GLOBAL: Pool = Pool::new(FLOOR_BYTES);

/// A buffer of `len` f32s whose contents are unspecified (left from an earlier use): for outputs
/// that are written in full.
pub fn take(len: usize) -> Vec<f32> {
    GLOBAL.take(len)
}

/// A buffer of `len` zeros.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// Hands a buffer back for reuse (any f32 buffer: one from [`take`] or not).
pub fn give(v: Vec<f32>) {
    GLOBAL.give(v)
}

/// What the process's pool has done so far.
pub fn stats() -> PoolStats {
    GLOBAL.stats()
}

/// A pooled buffer for scratch space that goes back to the pool when dropped.
#[derive(Debug, Default)]
pub struct Scratch(Vec<f32>);

impl Clone for Scratch {
    fn clone(&self) -> Self {
        let mut s = Self::take(self.len());
        s.copy_from_slice(self);
        s
    }
}

impl Scratch {
    /// `len` f32s whose contents are unspecified, for space written before it is read.
    pub fn take(len: usize) -> Self {
        Self(take(len))
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        Self(zeroed(len))
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_stale_sizes_make_room() {
        let floor = 1 << 20;
        let pool = Pool::new(floor);
        let len = MIN_LEN * 3 + 1;
        pool.give(pool.take(len));
        assert_eq!(
            pool.stats(),
            PoolStats {
                fresh: 1,
                reused: 0,
                held_bytes: len * 4
            }
        );
        let b = pool.take(len);
        assert_eq!((b.len(), pool.stats().reused), (len, 1));
        pool.give(b);
        // Small buffers bypass the pool.
        pool.give(pool.take(MIN_LEN - 1));
        assert_eq!(pool.stats().fresh, 1);
        // Held bytes stay within twice the largest working set (here one buffer of just over
        // the floor): past that, the size asked for least recently makes room, and then nothing
        // more is kept.
        let big = floor / 4 + 1;
        pool.give(pool.take(big));
        pool.give(vec![1.0; big]);
        assert_eq!(
            pool.stats().held_bytes,
            2 * big * 4,
            "the stale size made room"
        );
        pool.give(vec![1.0; big]);
        assert_eq!(pool.stats().held_bytes, 2 * big * 4, "over the limit");
        let again = pool.take(big);
        assert_eq!((again.len(), pool.stats().reused), (big, 2));
        assert_eq!(pool.stats().fresh, 2);
    }
}
