//! NCCL collectives across the devices of one process: one thread per rank (ids shared as bytes,
//! as between processes) and one thread driving every rank through group calls. On the virtual
//! device (VGPU_DEVICES=2) the collectives run through its NCCL stand-in. Then the loss split
//! across the devices against one run on all rows (the float64 reference), on both paths.
#![cfg(feature = "nccl")]

mod common;

use barlow::cpu::reference;
use barlow::cuda::nccl::{group, Nccl, NcclId};
use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig, LossPath, LossValue, Math};
use common::*;

const LAMBDA: f64 = 0.0051;
const EPS: f64 = 1e-5;

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
                    comm.all_gather(&send, &mut all).unwrap();
                    let mut b = stream.clone_htod(&rank_data(rank, 4)).unwrap();
                    comm.broadcast_f32(&mut b, 1).unwrap();
                    let mut short = stream.alloc_zeros::<f32>(2).unwrap();
                    assert!(comm.all_gather(&send, &mut short).is_err());
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

/// One rank's loss and gradients.
type RankResult = (LossValue, Vec<f32>, Vec<f32>);

/// Each rank's loss and gradients (downloaded) for its block of rows of `za`, `zb` (the whole
/// batch, on the host), one thread per device.
fn split_loss(
    streams: &[std::sync::Arc<barlow::cuda::cudarc::driver::CudaStream>],
    config: LossConfig,
    za: &[f32],
    zb: &[f32],
    rows_per_rank: &[usize],
    d: usize,
) -> Vec<barlow::Result<RankResult>> {
    let world = streams.len();
    let id = NcclId::new().unwrap().to_bytes();
    let loss = BarlowTwinsLoss::new(config).unwrap();
    let starts: Vec<usize> = rows_per_rank
        .iter()
        .scan(0, |at, &n| {
            *at += n;
            Some(*at - n)
        })
        .collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(rank, stream)| {
                let (loss, starts) = (&loss, &starts);
                s.spawn(move || {
                    let comm = Nccl::init_rank(stream, rank, world, &NcclId::from_bytes(&id)?)?;
                    let n = rows_per_rank[rank];
                    let rows = starts[rank] * d..(starts[rank] + n) * d;
                    let a = stream.clone_htod(&za[rows.clone()])?;
                    let b = stream.clone_htod(&zb[rows])?;
                    let mut da = stream.clone_htod(&vec![f32::NAN; n * d])?;
                    let mut db = stream.clone_htod(&vec![f32::NAN; n * d])?;
                    let dims = Dims::new(n, d);
                    let v = loss.forward_backward_across(&comm, &a, &b, dims, &mut da, &mut db)?;
                    let f = loss.forward_across(&comm, &a, &b, dims)?;
                    assert_eq!(f.total, v.total, "forward alone disagrees");
                    Ok((v, stream.clone_dtoh(&da)?, stream.clone_dtoh(&db)?))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn split_loss_equals_one_run_on_all_rows() {
    let Some(streams) = gpus("split_loss_equals_one_run_on_all_rows", 2) else {
        return;
    };
    let world = streams.len();
    let mut rng = Rng::new(71);
    for path in [LossPath::Direct, LossPath::Gram] {
        for math in [Math::F32, Math::Tf32, Math::Bf16] {
            let config = LossConfig::default().path(path).math(math);
            let shapes: &[(usize, usize)] = if math == Math::F32 {
                &[(1, 5), (3, 7), (9, 33), (17, 70)]
            } else {
                &[(9, 33)]
            };
            for &(n, d) in shapes {
                let total = n * world;
                let mut za = rng.matrix(total, d);
                let zb = rng.correlated(&za, 0.5);
                for row in za.chunks_exact_mut(d) {
                    row[0] = 1000.0 + 0.01 * row[0];
                }
                let all = Dims::new(total, d);
                let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), all, LAMBDA, EPS)
                    .unwrap();
                let ranks = split_loss(&streams, config, &za, &zb, &vec![n; world], d);
                let what = format!("{path:?} {math:?} W={world} N={n}/rank D={d}");
                let (mut ga, mut gb) = (Vec::new(), Vec::new());
                let first = ranks[0].as_ref().unwrap().0;
                for res in ranks {
                    let (v, a, b) = res.unwrap();
                    assert_eq!(v, first, "{what}: the ranks disagree");
                    assert_eq!(v.path, path, "{what}");
                    ga.extend(a);
                    gb.extend(b);
                }
                let tol = match math {
                    Math::F32 => 1e-5,
                    Math::Tf32 => 1e-3,
                    _ => 1e-2,
                };
                assert_loss_close(&what, first, &r, LAMBDA, tol);
                let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
                let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
                assert_close_grad(&format!("{what} dza"), &ga, &r.grad_za, sa, tol);
                assert_close_grad(&format!("{what} dzb"), &gb, &r.grad_zb, sb, tol);
            }
        }
    }
}

#[test]
fn split_loss_refusals_end_the_call_on_every_rank() {
    let Some(streams) = gpus("split_loss_refusals_end_the_call_on_every_rank", 2) else {
        return;
    };
    let mut rng = Rng::new(72);
    let d = 6;
    let za = rng.matrix(9, d);
    let zb = rng.matrix(9, d);
    // Different batch sizes per rank.
    let out = split_loss(&streams, LossConfig::default(), &za, &zb, &[4, 5], d);
    for r in &out {
        let msg = r.as_ref().unwrap_err().to_string();
        assert!(msg.contains("different shapes"), "{msg}");
    }
    // Non-finite input on one rank: every rank reports it.
    let mut bad = za.clone();
    bad[5 * d + 1] = f32::INFINITY;
    let out = split_loss(&streams, LossConfig::default(), &bad, &zb, &[4, 4], d);
    for r in &out {
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    }
}

/// What one trainer's steps leave: losses, gradients per step, and the final parameters and
/// buffers.
#[cfg(feature = "train")]
type Trace = (
    Vec<f64>,
    Vec<Vec<(String, Vec<f32>)>>,
    Vec<(String, Vec<f32>)>,
);

/// How a rank reaches its group in [`device_steps`]: rank, world, the NCCL id, and `Some(bytes)`
/// for a communicator on a stream of its own with gradient buckets of `bytes` (overlapped with
/// the backward), `None` for one on the trainer's stream.
#[cfg(feature = "train")]
type Member = (usize, usize, [u8; 128], Option<usize>);

/// Two steps of a DeviceTrainer on `streams[rank]` with `batch` images per rank, as a rank of a
/// group when given.
#[cfg(feature = "train")]
fn device_steps(
    stream: &std::sync::Arc<barlow::cuda::cudarc::driver::CudaStream>,
    group: Option<Member>,
    views: &[(barlow::nn::Tensor, barlow::nn::Tensor)],
    from: usize,
    batch: usize,
) -> Trace {
    use barlow::nn::resnet::{Arch, ResNetConfig, Stem};
    use barlow::nn::{Tensor, Visit};
    use barlow::train::cuda::{DeviceOptions, DeviceTrainer};
    use barlow::train::{BarlowTwins, Lars, LarsConfig, ModelConfig};
    let cfg = ModelConfig::new(
        ResNetConfig::new(Arch::Resnet18, Stem::Small, 3, 4),
        vec![16, 12, 8],
    );
    // Ranks other than 0 start from another initialization: joining the group gives them rank 0's.
    let seed = group.map_or(5, |(rank, ..)| 5 + 100 * rank as u64);
    let mut model = BarlowTwins::new(cfg, &mut Rng::new(seed)).unwrap();
    let mut opt = Lars::new(LarsConfig::default());
    let mut options = DeviceOptions::default().fma_only(true);
    if let Some((.., Some(bytes))) = group {
        options = options.bucket_bytes(bytes);
    }
    let side = views[0].0.shape[2];
    let mut t =
        DeviceTrainer::<f32>::new(stream, &mut model, &opt, batch, (3, side, side), options)
            .unwrap();
    if let Some((rank, world, id, buckets)) = group {
        let id = NcclId::from_bytes(&id).unwrap();
        let on = match buckets {
            Some(_) => stream.context().new_stream().unwrap(),
            None => stream.clone(),
        };
        t.join(Nccl::init_rank(&on, rank, world, &id).unwrap())
            .unwrap();
        if buckets.is_some() {
            assert!(t.gradient_buckets() > 3, "{} buckets", t.gradient_buckets());
        }
    }
    let rows = |x: &Tensor| {
        let item = x.item_len();
        let mut shape = x.shape.clone();
        shape[0] = batch;
        Tensor::from_vec(&shape, x.data[from * item..(from + batch) * item].to_vec())
    };
    let (mut losses, mut grads) = (Vec::new(), Vec::new());
    for (a, b) in views {
        t.stage(&rows(a), &rows(b)).unwrap();
        losses.push(t.forward_backward().unwrap().total);
        t.gradients_to_host(&mut model).unwrap();
        let mut g = Vec::new();
        model.params_mut(&mut |p| g.push((p.name.clone(), p.grad.clone())));
        grads.push(g);
        t.optimizer_step(0.5, 0.01).unwrap();
    }
    t.sync_to_host(&mut model, &mut opt).unwrap();
    let mut end = Vec::new();
    model.params_mut(&mut |p| end.push((p.name.clone(), p.value.clone())));
    model.buffers_mut(&mut |b| end.push((b.name.clone(), b.value.clone())));
    (losses, grads, end)
}

#[cfg(feature = "train")]
#[test]
fn two_devices_take_the_step_of_one_device_on_both_halves() {
    let Some(streams) = gpus("two_devices_take_the_step_of_one_device_on_both_halves", 2) else {
        return;
    };
    let (world, n, side) = (2, 3, 8);
    let mut rng = Rng::new(17);
    let mut image = |count: usize| {
        let data = (0..count * 3 * side * side)
            .map(|_| rng.uniform() as f32 - 0.5)
            .collect();
        barlow::nn::Tensor::from_vec(&[count, 3, side, side], data)
    };
    let views: Vec<_> = (0..2)
        .map(|_| (image(world * n), image(world * n)))
        .collect();
    // As the training engine runs: no per-buffer event tracking, so the virtual device sees
    // (and checks) exactly the ordering the trainer sets up between its streams.
    for s in &streams {
        // SAFETY: these context objects are this test's own and hold no buffers yet.
        unsafe { s.context().disable_event_tracking() };
    }
    let one = device_steps(&streams[0], None, &views, 0, world * n);
    // The communicator on the trainer's stream (gradients summed in line), then on a stream of
    // its own with small buckets summed while the backward goes on.
    for buckets in [None, Some(256)] {
        let id = NcclId::new().unwrap().to_bytes();
        let ranks: Vec<Trace> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let (stream, views) = (&streams[r], &views);
                    s.spawn(move || {
                        device_steps(stream, Some((r, world, id, buckets)), views, r * n, n)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Per tensor, normwise, floored at 1% of the largest entry of its kind anywhere: sums over
        // another split of the batch round differently.
        let close = |what: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]| {
            let top = want
                .iter()
                .flat_map(|(_, v)| v.iter())
                .fold(0f32, |m, v| m.max(v.abs()));
            for ((name, g), (name2, w)) in got.iter().zip(want) {
                assert_eq!(name, name2);
                if name.ends_with("num_batches_tracked") {
                    assert_eq!(g, w, "{what} {name}");
                    continue;
                }
                let e = rel_err_scaled(g, &to_f64(w), 0.01 * f64::from(top));
                assert!(e <= 1e-4, "{what} {name}: error {e:.3e}");
            }
        };
        for (rank, (losses, grads, end)) in ranks.iter().enumerate() {
            assert_eq!(
                (losses, grads, end),
                (&ranks[0].0, &ranks[0].1, &ranks[0].2),
                "rank {rank} differs from rank 0"
            );
            for step in 0..views.len() {
                let what = format!("rank {rank} step {step}");
                assert_close_scalar(&format!("{what} loss"), losses[step], one.0[step], 1e-5);
                close(&format!("{what} gradient"), &grads[step], &one.1[step]);
            }
            close(&format!("rank {rank} after two steps"), end, &one.2);
        }
    }
}

/// The step losses a run wrote.
#[cfg(feature = "train")]
fn run_losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// `barlow train --gpus 2` and two launched processes (here threads, with the launcher's
/// variables and the rendezvous) take the steps of one device on the whole batch; rank 0 alone
/// writes the run folder.
#[test]
#[cfg(feature = "train")]
fn a_run_on_two_devices_takes_the_steps_of_one() {
    if gpus("a_run_on_two_devices_takes_the_steps_of_one", 2).is_none() {
        return;
    }
    use barlow::collective::Launch;
    use barlow::cuda::cudnn::AlgoSearch;
    use barlow::nn::resnet::{Arch, Stem};
    use barlow::train::ranks::Ranks;
    use barlow::train::run::{self, DeviceChoice, Precision, Quiet, TrainConfig};
    let cfg = TrainConfig::default()
        .arch(Arch::Resnet18)
        .stem(Some(Stem::Small))
        .width(4)
        .projector(vec![16, 16, 16])
        .batch_size(8)
        .epochs(2)
        .max_train(24)
        .knn_every(0)
        .knn_bank(32)
        .knn_test(16)
        .seed(3)
        .device(DeviceChoice::Cuda)
        .precision(Precision::F32)
        .cudnn(AlgoSearch::Heuristic);
    let dir = |name: &str| {
        let d = std::env::temp_dir().join(format!("barlow-dp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let (one, two) = (dir("one"), dir("two"));
    run::train(&cfg, &one, None, &mut Quiet).unwrap();
    let s = run::train_with(&cfg, &Ranks::Gpus(2), &two, None, &mut Quiet).unwrap();
    assert_eq!(s.steps, 6);
    let (l1, l2) = (run_losses(&one), run_losses(&two));
    assert_eq!((l1.len(), l2.len()), (6, 6));
    for (i, (a, b)) in l1.iter().zip(&l2).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {}: one device {a}, two {b}",
            i + 1
        );
    }
    let state = barlow::train::checkpoint::load(&two.join("checkpoint.safetensors"))
        .unwrap()
        .state;
    assert_eq!(state["world"], 2);

    // Launched: the variables of each rank, the rendezvous on a free port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let (lead, other) = (dir("launched"), dir("launched-rank1"));
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (cfg, port) = (&cfg, &port);
                let out = if rank == 0 {
                    lead.clone()
                } else {
                    other.clone()
                };
                s.spawn(move || {
                    let rank = rank.to_string();
                    let vars = [
                        ("WORLD_SIZE", "2"),
                        ("RANK", rank.as_str()),
                        ("MASTER_PORT", port.as_str()),
                    ];
                    let l = Launch::from_vars(|k| {
                        vars.iter()
                            .find(|(n, _)| *n == k)
                            .map(|(_, v)| v.to_string())
                    })
                    .unwrap()
                    .unwrap();
                    run::train_with(cfg, &Ranks::Launched(l), &out, None, &mut Quiet)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.as_ref().unwrap().steps, 6);
    }
    assert_eq!(run_losses(&lead), l2, "launched ranks differ from --gpus 2");
    assert!(!other.exists(), "rank 1 wrote into its folder");
    for d in [one, two, lead] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
