//! How the processes of a group find one another: the launcher's variables, and a TCP rendezvous
//! on rank 0 that hands every other rank a payload (the NCCL id). Multi-node runs use the same
//! variables with `MASTER_ADDR` set to rank 0's host; NCCL then does the transport.
//!
//! The exchange, little-endian: a joining rank sends `BTRV`, the protocol version, the world size
//! and its rank; rank 0 answers `BTRV`, a status (0 accepted, 1 refused), a length and the payload
//! (or, refused, a message saying why). Rank 0 accepts each of ranks 1..W once and refuses a wrong
//! world size, a rank out of range or a rank that already joined.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"BTRV";
const VERSION: u32 = 1;
/// Largest payload either side accepts.
const MAX_PAYLOAD: usize = 1 << 16;

fn fail(during: &str, message: impl Into<String>) -> Error {
    Error::Collective {
        during: format!("rendezvous: {during}"),
        message: message.into(),
    }
}

/// Where this process stands in a group, as a launcher (`torchrun`, a batch system, or
/// `barlow train --gpus N`) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Launch {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this machine: the GPU to use.
    pub local_rank: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// The port rank 0 listens on.
    pub master_port: u16,
}

impl Launch {
    /// From the launcher's variables, read through `var` (the caller passes `std::env::var` or a
    /// map): `WORLD_SIZE` and `RANK` (required together; `None` when `WORLD_SIZE` is absent),
    /// `LOCAL_RANK` (default `RANK`), `MASTER_ADDR` (default `127.0.0.1`), `MASTER_PORT` (default
    /// 29500). A malformed or inconsistent value is an error naming it.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, v: String| -> Result<usize> {
            v.trim().parse::<usize>().map_err(|_| {
                Error::InvalidConfig(format!("{name}={v:?} is not a non-negative integer"))
            })
        };
        let world_size = num("WORLD_SIZE", world)?;
        let rank = match var("RANK") {
            Some(v) => num("RANK", v)?,
            None => {
                return Err(Error::InvalidConfig(
                    "WORLD_SIZE is set but RANK is not".into(),
                ))
            }
        };
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", v)?,
            None => rank,
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidConfig(format!(
                "RANK={rank} with WORLD_SIZE={world_size}: a rank must be below the world size"
            )));
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| {
                Error::InvalidConfig(format!("MASTER_PORT={v:?} is not a port number"))
            })?,
            None => 29500,
        };
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// Rank 0 makes the payload (`make` runs there only) and hands it to every other rank; every
    /// rank returns it. Waits at most `timeout` for the others (rank 0) or for rank 0 (the rest).
    pub fn share(
        &self,
        make: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let addr = format!("{}:{}", self.master_addr, self.master_port);
        if self.rank == 0 {
            let host = Host::bind(&addr)?;
            let payload = make()?;
            host.serve(&payload, self.world_size, timeout)?;
            Ok(payload)
        } else {
            join(&addr, self.rank, self.world_size, timeout)
        }
    }
}

/// Rank 0's side of the rendezvous.
#[derive(Debug)]
pub struct Host {
    listener: TcpListener,
}

impl Host {
    /// Listens on `addr` (`host:port`; port 0 picks a free one, see [`Host::port`]).
    pub fn bind(addr: &str) -> Result<Host> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| fail("listening", format!("cannot listen on {addr}: {e}")))?;
        Ok(Host { listener })
    }

    /// The port it listens on.
    pub fn port(&self) -> Result<u16> {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| fail("listening", e.to_string()))
    }

    /// Hands `payload` to each of ranks 1..world once; returns when all have it, or fails after
    /// `timeout` naming the ranks that never came.
    pub fn serve(&self, payload: &[u8], world: usize, timeout: Duration) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(fail(
                "serving",
                format!("a payload of {} bytes", payload.len()),
            ));
        }
        let deadline = Instant::now() + timeout;
        let mut joined = vec![false; world];
        if let Some(j) = joined.first_mut() {
            *j = true;
        }
        self.listener
            .set_nonblocking(true)
            .map_err(|e| fail("serving", e.to_string()))?;
        while joined.iter().any(|j| !j) {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    // A client that misbehaves is refused; the others keep coming.
                    let _ = admit(stream, peer, payload, world, &mut joined, deadline);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (0..world).filter(|&r| !joined[r]).collect();
                        return Err(fail(
                            "waiting for the other ranks",
                            format!(
                                "ranks {missing:?} did not join within {timeout:?} (are they \
                                 started, with MASTER_ADDR and MASTER_PORT pointing here?)"
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(fail("accepting a rank", e.to_string())),
            }
        }
        Ok(())
    }
}

fn admit(
    mut stream: TcpStream,
    peer: SocketAddr,
    payload: &[u8],
    world: usize,
    joined: &mut [bool],
    deadline: Instant,
) -> Result<()> {
    let io = |e: std::io::Error| fail("talking to a rank", format!("{peer}: {e}"));
    stream.set_nonblocking(false).map_err(io)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream.set_read_timeout(Some(left)).map_err(io)?;
    stream.set_write_timeout(Some(left)).map_err(io)?;
    let mut hello = [0u8; 16];
    stream.read_exact(&mut hello).map_err(io)?;
    let word = |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    let (version, their_world, rank) = (word(4), word(8) as usize, word(12) as usize);
    let refusal = if &hello[..4] != MAGIC || version != VERSION {
        Some("not a barlow rendezvous client of this version".to_string())
    } else if their_world != world {
        Some(format!(
            "WORLD_SIZE={their_world} on rank {rank}, but rank 0 has WORLD_SIZE={world}"
        ))
    } else if rank == 0 || rank >= world {
        Some(format!("rank {rank} is not one of 1..{world}"))
    } else if joined[rank] {
        Some(format!(
            "rank {rank} joined twice (two processes with RANK={rank}?)"
        ))
    } else {
        None
    };
    let (status, body) = match &refusal {
        Some(m) => (1u32, m.as_bytes()),
        None => (0u32, payload),
    };
    let mut reply = Vec::with_capacity(12 + body.len());
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&status.to_le_bytes());
    reply.extend_from_slice(&(body.len() as u32).to_le_bytes());
    reply.extend_from_slice(body);
    stream.write_all(&reply).map_err(io)?;
    match refusal {
        Some(m) => Err(fail("admitting a rank", m)),
        None => {
            joined[rank] = true;
            Ok(())
        }
    }
}

/// A non-zero rank's side: connects to rank 0 at `addr` (retrying until it listens), says who it
/// is and returns the payload; fails after `timeout`, or at once when rank 0 refuses it (its
/// message says why).
pub fn join(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Vec<u8>> {
    if rank == 0 || rank >= world || world > u32::MAX as usize {
        return Err(Error::InvalidConfig(format!(
            "rank {rank} of {world} cannot join a rendezvous (rank 0 hosts it)"
        )));
    }
    let deadline = Instant::now() + timeout;
    let target = addr
        .to_socket_addrs()
        .map_err(|e| fail("resolving rank 0's address", format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| fail("resolving rank 0's address", format!("{addr}: no address")))?;
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&target, left.max(Duration::from_millis(10))) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(fail(
                    "reaching rank 0",
                    format!("{addr} did not answer within {timeout:?}: {e}"),
                ))
            }
        }
    };
    let io = |e: std::io::Error| fail("talking to rank 0", format!("{addr}: {e}"));
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream.set_read_timeout(Some(left)).map_err(io)?;
    stream.set_write_timeout(Some(left)).map_err(io)?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(io)?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if &head[..4] != MAGIC {
        return Err(fail(
            "talking to rank 0",
            format!("{addr} is not a barlow rendezvous"),
        ));
    }
    let (status, len) = (word(4), word(8) as usize);
    if len > MAX_PAYLOAD {
        return Err(fail("talking to rank 0", format!("a reply of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(io)?;
    if status != 0 {
        return Err(fail(
            "joining",
            format!(
                "rank 0 refused rank {rank}: {}",
                String::from_utf8_lossy(&body)
            ),
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launch_variables_are_read_and_checked() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let l = Launch::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "2")]))
            .unwrap()
            .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (2, 4, 2));
        assert_eq!(
            (l.master_addr.as_str(), l.master_port),
            ("127.0.0.1", 29500)
        );
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "16"),
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "23456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.local_rank, l.master_addr.as_str(), l.master_port),
            (1, "node0", 23456)
        );
        for (bad, name) in [
            (vec![("WORLD_SIZE", "two"), ("RANK", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK=2"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
                "MASTER_PORT",
            ),
        ] {
            let e = Launch::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn rank_zero_hands_the_payload_to_every_rank() {
        let host = Host::bind("127.0.0.1:0").unwrap();
        let addr = format!("127.0.0.1:{}", host.port().unwrap());
        let payload: Vec<u8> = (0..128).map(|i| i as u8 ^ 0x5a).collect();
        let world = 4;
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let server = s.spawn(|| host.serve(&payload, world, t));
            let clients: Vec<_> = (1..world)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || join(&addr, r, world, t))
                })
                .collect();
            for c in clients {
                assert_eq!(c.join().unwrap().unwrap(), payload);
            }
            server.join().unwrap().unwrap();
        });
    }

    #[test]
    fn wrong_world_sizes_duplicates_and_absent_ranks_are_errors() {
        let host = Host::bind("127.0.0.1:0").unwrap();
        let addr = format!("127.0.0.1:{}", host.port().unwrap());
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let server = s.spawn(|| host.serve(b"id", 3, Duration::from_millis(1500)));
            let wrong = join(&addr, 1, 4, t).unwrap_err().to_string();
            assert!(
                wrong.contains("WORLD_SIZE=4") && wrong.contains("WORLD_SIZE=3"),
                "{wrong}"
            );
            assert_eq!(join(&addr, 1, 3, t).unwrap(), b"id");
            let twice = join(&addr, 1, 3, t).unwrap_err().to_string();
            assert!(twice.contains("joined twice"), "{twice}");
            // Rank 2 never comes.
            let e = server.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("[2]"), "{e}");
        });
        // Nobody listens.
        let free = Host::bind("127.0.0.1:0").unwrap();
        let port = free.port().unwrap();
        drop(free);
        let e = join(
            &format!("127.0.0.1:{port}"),
            1,
            2,
            Duration::from_millis(200),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did not answer"), "{e}");
        assert!(join("127.0.0.1:1", 0, 2, t).is_err());
    }

    #[test]
    fn launch_share_runs_the_whole_exchange() {
        let port = {
            let h = Host::bind("127.0.0.1:0").unwrap();
            h.port().unwrap()
        };
        let launch = |rank: usize| {
            let port = port.to_string();
            Launch::from_vars(vars(&[
                ("WORLD_SIZE", "2"),
                ("RANK", &rank.to_string()),
                ("MASTER_PORT", &port),
            ]))
            .unwrap()
            .unwrap()
        };
        let t = Duration::from_secs(20);
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let l = launch(r);
                    s.spawn(move || l.share(|| Ok(b"nccl-id".to_vec()), t).unwrap())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == b"nccl-id"));
    }
}
