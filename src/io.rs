//! File output that never leaves a half-written file: write a temporary beside the target, flush
//! it to disk, then rename it over the target.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Memory the system can give this process now, if known: the least of the machine's
/// `MemAvailable`, what the cgroup's `memory.max` leaves (containers), and what the
/// address-space limit (`ulimit -v`) leaves of this process's address space.
pub fn available_memory() -> Option<u64> {
    let field = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut free = field(&meminfo, "MemAvailable:")?.saturating_mul(1024);
    let read_u64 =
        |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(max), Some(used)) = (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        free = free.min(max.saturating_sub(used));
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        // "Max address space   <soft>   <hard>   bytes"
        let soft = field(&limits, "Max address space");
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let (Some(limit), Some(size_kib)) = (soft, field(&status, "VmSize:")) {
            free = free.min(limit.saturating_sub(size_kib.saturating_mul(1024)));
        }
    }
    Some(free)
}

/// Serde for paths that may not be UTF-8: a string when they are, else `{"unix": [bytes]}`.
#[cfg(feature = "train")]
pub mod os_path {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::path::{Path, PathBuf};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes { unix: Vec<u8> },
    }

    /// Writes `p`.
    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        match p.to_str() {
            Some(t) => Repr::Text(t.to_string()),
            None => Repr::Bytes {
                unix: bytes_of(p).map_err(serde::ser::Error::custom)?,
            },
        }
        .serialize(s)
    }

    /// Reads a path written by [`serialize`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(t) => Ok(PathBuf::from(t)),
            Repr::Bytes { unix } => from_bytes(unix).map_err(serde::de::Error::custom),
        }
    }

    #[cfg(unix)]
    fn bytes_of(p: &Path) -> Result<Vec<u8>, &'static str> {
        use std::os::unix::ffi::OsStrExt;
        Ok(p.as_os_str().as_bytes().to_vec())
    }

    #[cfg(not(unix))]
    fn bytes_of(_: &Path) -> Result<Vec<u8>, &'static str> {
        Err("a path that is not valid Unicode cannot be saved on this system")
    }

    #[cfg(unix)]
    fn from_bytes(b: Vec<u8>) -> Result<PathBuf, &'static str> {
        use std::os::unix::ffi::OsStringExt;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(b)))
    }

    #[cfg(not(unix))]
    fn from_bytes(_: Vec<u8>) -> Result<PathBuf, &'static str> {
        Err("a path saved as Unix bytes cannot be used on this system")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("barlow-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.txt");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary left behind: {names:?}");
        assert!(write_atomic(&dir.join("missing-dir/x"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
