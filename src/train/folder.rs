//! A run's folder: its identity (`run.json`, a random id given when the run starts and kept in
//! every checkpoint), the lock that keeps a second process out (`.barlow.lock`), and the
//! JSON-lines metrics. A resume writes only into the folder of the run it continues, and only
//! from that run's latest checkpoint.

use super::checkpoint;
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The files a run writes; a folder holding any of them belongs to a run.
pub(crate) const RUN_FILES: [&str; 4] = [
    IDENTITY,
    "checkpoint.safetensors",
    "metrics.jsonl",
    "curves.png",
];
/// The lock file of a folder in use.
pub const LOCK: &str = ".barlow.lock";
/// The run's identity in its folder.
pub const IDENTITY: &str = "run.json";

/// A new run id: 128 random bits in hex (from the standard library's per-process random keys,
/// the time and the process id).
pub(crate) fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(now);
        h.write_u32(std::process::id());
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

/// The run a checkpoint belongs to, read from its run state: `(id, step)`. Checkpoints written
/// before runs had ids give `None` as the id.
pub(crate) fn checkpoint_run(state: &serde_json::Value) -> (Option<String>, u64) {
    (
        state["run"]["id"].as_str().map(str::to_string),
        state["step"].as_u64().unwrap_or(0),
    )
}

/// How a run means to use a folder.
pub(crate) enum Intent<'a> {
    /// A new run.
    New,
    /// Continuing the run of checkpoint `checkpoint` (run `id`, at `step`).
    Resume {
        checkpoint: &'a Path,
        id: Option<&'a str>,
        step: u64,
    },
}

/// What a folder holds, judged against an intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// No run: a new run starts here (from scratch or from a checkpoint).
    Fresh,
    /// The run being resumed, at the resumed checkpoint.
    Continue,
}

fn read_identity(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(IDENTITY)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["id"].as_str().map(str::to_string)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Whether `out` may be used as `intent` says: [`Use::Fresh`] when it holds no run,
/// [`Use::Continue`] when it holds the run being resumed and the resumed checkpoint is that
/// run's latest; anything else is an error that says how to start a new run instead.
pub(crate) fn check(out: &Path, intent: &Intent<'_>) -> Result<Use> {
    let Some(held) = RUN_FILES.iter().find(|f| out.join(f).exists()) else {
        return Ok(Use::Fresh);
    };
    let latest_path = out.join("checkpoint.safetensors");
    let latest = checkpoint::read_state(&latest_path)
        .ok()
        .map(|s| checkpoint_run(&s));
    let (checkpoint, id, step) = match intent {
        Intent::New => {
            let what = if latest.is_some() {
                "resume its checkpoint with --resume to continue it"
            } else {
                "it has no checkpoint to resume (it ended before its first epoch); delete its \
                 files to reuse the folder"
            };
            return Err(Error::InvalidConfig(format!(
                "{} already holds a run ({held}); choose another --out, or {what}",
                out.display()
            )));
        }
        Intent::Resume {
            checkpoint,
            id,
            step,
        } => (*checkpoint, *id, *step),
    };
    let new_run = "to start a new run from it, add --out NEW (a folder that holds no run)";
    let folder_id = read_identity(out).or_else(|| latest.as_ref().and_then(|l| l.0.clone()));
    match id {
        // Written before runs had ids: only the folder's own checkpoint continues it.
        None => {
            if folder_id.is_none() && same_file(checkpoint, &latest_path) {
                return Ok(Use::Continue);
            }
            Err(Error::InvalidConfig(format!(
                "{} is not the latest checkpoint of the run in {} (it carries no run id, and \
                 that run's is {}); {new_run}",
                checkpoint.display(),
                out.display(),
                latest_path.display()
            )))
        }
        Some(id) if folder_id.as_deref() != Some(id) => Err(Error::InvalidConfig(format!(
            "{} belongs to run {id}, but {} holds {}; resuming would write into that run; \
             {new_run}",
            checkpoint.display(),
            out.display(),
            folder_id.map_or("another run".to_string(), |f| format!("run {f}"))
        ))),
        Some(_) => match latest {
            Some((_, latest_step)) if latest_step == step => Ok(Use::Continue),
            Some((_, latest_step)) => Err(Error::InvalidConfig(format!(
                "{} is an older snapshot of the run in {} (step {step}; its latest checkpoint, \
                 {}, is at step {latest_step}); resume that one to continue the run, or, {new_run}",
                checkpoint.display(),
                out.display(),
                latest_path.display()
            ))),
            None => Err(Error::InvalidConfig(format!(
                "{} holds run {} but no readable checkpoint.safetensors to continue from; {new_run}",
                out.display(),
                id.unwrap_or("without an id")
            ))),
        },
    }
}

/// The start token of process `pid`: the boot's id and the process's start time since boot, so
/// a reused pid (PID 1 in every container) is told apart from the process that wrote a lock.
fn start_token(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start = rest.split_whitespace().nth(19)?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    Some(format!("{}:{start}", boot.trim()))
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists and may be signalled; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the lock text `text` (`<pid> <start token>`, or a bare pid from older versions) names
/// a process that still runs.
fn held_by_live_process(text: &str) -> Option<i32> {
    let mut parts = text.split_whitespace();
    let pid: i32 = parts.next()?.parse().ok().filter(|&p| p > 0)?;
    if !process_alive(pid) {
        return None;
    }
    match (parts.next(), start_token(pid)) {
        (Some(saved), Some(now)) if saved != now => None,
        _ => Some(pid),
    }
}

/// A run folder claimed by this process: created if missing; refused while another live process
/// holds it, or when it holds another run's files (unless this run continues that one). Stale
/// temporaries of killed writers are removed. The lock goes when this value is dropped, and so
/// does the folder if this claim created it and it is still empty.
pub(crate) struct RunFolder {
    dir: PathBuf,
    lock: PathBuf,
    created: bool,
    /// How the claim found the folder.
    pub(crate) use_: Use,
}

impl RunFolder {
    pub(crate) fn claim(out: &Path, intent: &Intent<'_>) -> Result<RunFolder> {
        let created = !out.exists();
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let lock = out.join(LOCK);
        let mut claim = RunFolder {
            dir: out.to_path_buf(),
            lock: PathBuf::new(),
            created,
            use_: Use::Fresh,
        };
        let me = std::process::id() as i32;
        let text = format!("{me} {}\n", start_token(me).unwrap_or_default());
        let mut attempts = 0;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    claim.lock = lock.clone();
                    f.write_all(text.as_bytes())
                        .map_err(|e| Error::io(&lock, e))?;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 3 => {
                    attempts += 1;
                    let holder = std::fs::read_to_string(&lock).unwrap_or_default();
                    if let Some(pid) = held_by_live_process(&holder) {
                        return Err(Error::InvalidConfig(format!(
                            "{} is in use by another barlow process (pid {pid}, lock file {}); \
                             choose another --out, or delete the lock file if no barlow process \
                             uses the folder",
                            out.display(),
                            lock.display()
                        )));
                    }
                    // Left by a process that no longer runs.
                    let _ = std::fs::remove_file(&lock);
                }
                Err(e) => return Err(Error::io(&lock, e)),
            }
        }
        claim.use_ = check(out, intent)?;
        // Temporaries (`.<name>.tmp.<pid>`, see io::write_atomic) whose writer is gone.
        if let Ok(rd) = std::fs::read_dir(out) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name
                    .strip_prefix('.')
                    .and_then(|n| n.rsplit_once(".tmp."))
                    .and_then(|(_, p)| p.parse::<i32>().ok());
                if pid.is_some_and(|p| p == me || !process_alive(p)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(claim)
    }

    /// Writes the run's identity into the folder.
    pub(crate) fn write_identity(&self, identity: &serde_json::Value) -> Result<()> {
        let path = self.dir.join(IDENTITY);
        crate::io::write_atomic(&path, format!("{identity:#}\n").as_bytes())
            .map_err(|e| Error::io(&path, e))
    }

    /// Removes what a run that never reached a checkpoint wrote (its identity and metrics): with
    /// no checkpoint there is nothing to resume, and the files would only keep the folder from
    /// being reused.
    pub(crate) fn discard_unfinished(&self) {
        for f in RUN_FILES {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        if !self.lock.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.lock);
        }
        if self.created {
            // Only succeeds while empty: a run that failed before writing anything leaves no
            // folder behind.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Appends one JSON line. A failed write (a full disk) is cut back off, so the file never ends in
/// half a line.
pub(crate) fn append_metric(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let before = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let line = format!("{v}\n");
    f.write_all(line.as_bytes()).map_err(|e| {
        let _ = f.set_len(before);
        Error::io(path, e)
    })
}

/// Drops the lines of steps after `step` (written after the checkpoint a run resumes from), so a
/// resumed run never records a step twice. Rewritten atomically.
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let keep = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s <= step)
    };
    let kept: String = text
        .lines()
        .filter(|l| keep(l))
        .flat_map(|l| [l, "\n"])
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    crate::io::write_atomic(path, kept.as_bytes()).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_metrics_write_on_a_full_disk_is_an_error() {
        // /dev/full fails every write with "no space left on device".
        let e = append_metric(Path::new("/dev/full"), &serde_json::json!({"step": 1})).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_lock_is_live_only_while_its_process_and_start_token_match() {
        let me = std::process::id() as i32;
        let token = start_token(me).unwrap();
        assert_eq!(
            held_by_live_process(&format!("{me} {token}")),
            Some(me),
            "this process's own lock"
        );
        // The same pid started at another time: PID 1 of an earlier container.
        assert_eq!(held_by_live_process(&format!("{me} {token}0")), None);
        assert_eq!(held_by_live_process("1 no-such-boot:0"), None);
        assert_eq!(held_by_live_process("2000000000 x:1"), None);
        assert_eq!(held_by_live_process("garbage"), None);
        // A bare pid (older versions) is live while the process runs.
        assert_eq!(held_by_live_process(&me.to_string()), Some(me));
    }

    #[test]
    fn run_ids_differ() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
