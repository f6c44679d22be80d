//! NCCL collectives across the devices of one process: one thread per rank (ids shared as bytes,
//! as between processes) and one thread driving every rank through group calls. On the virtual
//! device (VGPU_DEVICES=2) the collectives run through its NCCL stand-in.
#![cfg(feature = "nccl")]

mod common;

use barlow::cuda::nccl::{group, Nccl, NcclId};
use common::gpus;

fn rank_data(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (rank * 1000 + i) as f32 * 0.25 - 3.0)
        .collect()
}

#[test]
fn one_thread_per_rank_sums_gathers_and_broadcasts() {
    let Some(streams) = gpus("one_thread_per_rank_sums_gathers_and_broadcasts", 2) else {
        return;
    };
    let world = streams.len();
    let id = NcclId::new().unwrap().to_bytes();
    let len = 37;
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(rank, stream)| {
                s.spawn(move || {
                    let id = NcclId::from_bytes(&id).unwrap();
                    let comm = Nccl::init_rank(stream, rank, world, &id).unwrap();
                    assert_eq!((comm.rank(), comm.world_size()), (rank, world));
                    let mut x = stream.clone_htod(&rank_data(rank, len)).unwrap();
                    comm.all_reduce_sum_f32(&mut x).unwrap();
                    let wide: Vec<f64> = (0..5).map(|i| 1e-17 * i as f64 + rank as f64).collect();
                    let mut y = stream.clone_htod(&wide).unwrap();
                    comm.all_reduce_sum_f64(&mut y).unwrap();
                    let send = stream.clone_htod(&rank_data(rank, 3)).unwrap();
                    let mut all = stream.alloc_zeros::<f32>(3 * world).unwrap();
                    comm.all_gather_f32(&send, &mut all).unwrap();
                    let mut b = stream.clone_htod(&rank_data(rank, 4)).unwrap();
                    comm.broadcast_f32(&mut b, 1).unwrap();
                    let mut short = stream.alloc_zeros::<f32>(2).unwrap();
                    assert!(comm.all_gather_f32(&send, &mut short).is_err());
                    (
                        stream.clone_dtoh(&x).unwrap(),
                        stream.clone_dtoh(&y).unwrap(),
                        stream.clone_dtoh(&all).unwrap(),
                        stream.clone_dtoh(&b).unwrap(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sum: Vec<f32> = (0..len)
        .map(|i| (0..world).map(|r| rank_data(r, len)[i]).sum())
        .collect();
    let gathered: Vec<f32> = (0..world).flat_map(|r| rank_data(r, 3)).collect();
    for (x, y, all, b) in &results {
        assert_eq!(x, &sum);
        assert_eq!(y[0], (0..world).sum::<usize>() as f64);
        assert_eq!(all, &gathered);
        assert_eq!(b, &rank_data(1, 4));
    }
}

#[test]
fn one_thread_drives_every_rank_in_group_calls() {
    let Some(streams) = gpus("one_thread_drives_every_rank_in_group_calls", 2) else {
        return;
    };
    let comms = Nccl::init_all(&streams).unwrap();
    let mut bufs: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(r, s)| s.clone_htod(&rank_data(r, 9)).unwrap())
        .collect();
    group(|| {
        for (c, b) in comms.iter().zip(&mut bufs) {
            c.all_reduce_sum_f32(b)?;
        }
        Ok(())
    })
    .unwrap();
    let want: Vec<f32> = (0..9)
        .map(|i| (0..streams.len()).map(|r| rank_data(r, 9)[i]).sum())
        .collect();
    for (s, b) in streams.iter().zip(bufs) {
        assert_eq!(s.clone_dtoh(&b).unwrap(), want);
        // A buffer is freed on its stream in the current context: make it the buffer's own.
        s.context().bind_to_thread().unwrap();
        drop(b);
    }
    assert!(NcclId::from_bytes(&[0u8; 5]).is_err());
    assert!(Nccl::init_rank(&streams[0], 2, 2, &NcclId::new().unwrap()).is_err());
}
