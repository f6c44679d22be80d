//! The loss split across ranks (threads of one process, `LocalGroup`): W ranks of N rows each
//! give the loss and every gradient of one run on the concatenated W·N rows, on both paths,
//! against that run and the float64 reference.

mod common;

use barlow::collective::{Collective, LocalGroup};
use barlow::cpu::reference;
use barlow::{BarlowTwinsLoss, Dims, Error, LossConfig, LossPath, LossValue};
use common::*;
use std::time::Duration;

const LAMBDA: f64 = 0.0051;
const EPS: f64 = 1e-5;
const F32_TOL: f64 = 1e-5;

/// Runs `f` on every rank of a fresh group of `world`, each on its own thread.
fn on_ranks<R: Send>(world: usize, f: impl Fn(&LocalGroup) -> R + Sync) -> Vec<R> {
    let ranks = LocalGroup::with_timeout(world, Duration::from_secs(60)).unwrap();
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = ranks.into_iter().map(|c| s.spawn(move || f(&c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

type RankResult = barlow::Result<(LossValue, Vec<f32>, Vec<f32>)>;

/// Each rank's loss and gradients for its block of rows of `za`, `zb` (whole batch).
fn split(
    loss: &BarlowTwinsLoss,
    world: usize,
    za: &[f32],
    zb: &[f32],
    d: usize,
) -> Vec<RankResult> {
    let n = za.len() / d / world;
    on_ranks(world, |g| {
        let rows = g.rank() * n * d..(g.rank() + 1) * n * d;
        let mut dza = vec![f32::NAN; n * d];
        let mut dzb = vec![f32::NAN; n * d];
        let dims = Dims::new(n, d);
        let v = loss.forward_backward_cpu_across(
            g,
            &za[rows.clone()],
            &zb[rows],
            dims,
            &mut dza,
            &mut dzb,
        )?;
        Ok((v, dza, dzb))
    })
}

#[test]
fn ranks_together_equal_one_run_on_all_rows() {
    let mut rng = Rng::new(13);
    for path in [LossPath::Direct, LossPath::Gram, LossPath::Auto] {
        let loss = BarlowTwinsLoss::new(LossConfig::default().path(path)).unwrap();
        for world in [2usize, 3] {
            for &(n, d) in &[(1usize, 5usize), (3, 7), (5, 33), (17, 70), (40, 9)] {
                let total = n * world;
                let mut za = rng.matrix(total, d);
                let zb = rng.correlated(&za, 0.5);
                // One column far from zero: the split standardization must stay exact there.
                for row in za.chunks_exact_mut(d) {
                    row[0] = 1000.0 + 0.01 * row[0];
                }
                let all = Dims::new(total, d);
                let r = reference::forward_backward(&to_f64(&za), &to_f64(&zb), all, LAMBDA, EPS)
                    .unwrap();
                let mut whole_a = vec![f32::NAN; total * d];
                let mut whole_b = vec![f32::NAN; total * d];
                let whole = loss
                    .forward_backward_cpu(&za, &zb, all, &mut whole_a, &mut whole_b)
                    .unwrap();
                let ranks = split(&loss, world, &za, &zb, d);
                let mut got_a = Vec::new();
                let mut got_b = Vec::new();
                let first = ranks[0].as_ref().unwrap().0;
                for (rank, res) in ranks.into_iter().enumerate() {
                    let (v, da, db) = res.unwrap();
                    let what = format!("{path:?} W={world} N={n}/rank D={d} rank {rank}");
                    assert_eq!(v, first, "{what}: the ranks disagree on the loss");
                    let expected = path.resolve_across(all, world);
                    assert_eq!(v.path, expected, "{what}");
                    assert_loss_close(&what, v, &r, LAMBDA, F32_TOL);
                    assert_close_scalar(
                        &format!("{what} vs one run"),
                        v.total,
                        whole.total,
                        F32_TOL,
                    );
                    got_a.extend(da);
                    got_b.extend(db);
                }
                let what = format!("{path:?} W={world} N={n}/rank D={d}");
                let sa = grad_scale(&r.a.rstd, &r.grad_za_hat);
                let sb = grad_scale(&r.b.rstd, &r.grad_zb_hat);
                assert_close_grad(&format!("{what} dza"), &got_a, &r.grad_za, sa, F32_TOL);
                assert_close_grad(&format!("{what} dzb"), &got_b, &r.grad_zb, sb, F32_TOL);
                assert_close_grad(
                    &format!("{what} dza vs one run"),
                    &got_a,
                    &to_f64(&whole_a),
                    sa,
                    F32_TOL,
                );
                assert_close_grad(
                    &format!("{what} dzb vs one run"),
                    &got_b,
                    &to_f64(&whole_b),
                    sb,
                    F32_TOL,
                );
            }
        }
    }
}

#[test]
fn forward_alone_agrees_and_one_rank_is_the_plain_loss() {
    let mut rng = Rng::new(5);
    let loss = BarlowTwinsLoss::new(LossConfig::default()).unwrap();
    let (n, d) = (6, 11);
    let za = rng.matrix(3 * n, d);
    let zb = rng.correlated(&za, 0.3);
    let full = split(&loss, 3, &za, &zb, d);
    let fwd = on_ranks(3, |g| {
        let rows = g.rank() * n * d..(g.rank() + 1) * n * d;
        loss.forward_cpu_across(g, &za[rows.clone()], &zb[rows], Dims::new(n, d))
    });
    for (a, b) in full.iter().zip(&fwd) {
        assert_eq!(a.as_ref().unwrap().0, *b.as_ref().unwrap());
    }
    // A group of one is the ordinary call, bit for bit.
    let alone = on_ranks(1, |g| {
        let mut da = vec![0f32; 3 * n * d];
        let mut db = vec![0f32; 3 * n * d];
        let v =
            loss.forward_backward_cpu_across(g, &za, &zb, Dims::new(3 * n, d), &mut da, &mut db);
        (v.unwrap(), da, db)
    });
    let mut da = vec![0f32; 3 * n * d];
    let mut db = vec![0f32; 3 * n * d];
    let v = loss
        .forward_backward_cpu(&za, &zb, Dims::new(3 * n, d), &mut da, &mut db)
        .unwrap();
    assert_eq!(alone[0], (v, da, db));
}

#[test]
fn a_refusal_on_one_rank_ends_the_call_on_every_rank() {
    let loss = BarlowTwinsLoss::new(LossConfig::default()).unwrap();
    let mut rng = Rng::new(8);
    let (n, d) = (4, 6);
    let za = rng.matrix(2 * n, d);
    let zb = rng.matrix(2 * n, d);
    // Rank 1 passes a short gradient buffer.
    let out = on_ranks(2, |g| {
        let rows = g.rank() * n * d..(g.rank() + 1) * n * d;
        let mut da = vec![0f32; n * d - g.rank()];
        let mut db = vec![0f32; n * d];
        loss.forward_backward_cpu_across(
            g,
            &za[rows.clone()],
            &zb[rows],
            Dims::new(n, d),
            &mut da,
            &mut db,
        )
    });
    assert!(
        matches!(out[0], Err(Error::Collective { .. })),
        "{:?}",
        out[0]
    );
    assert!(
        matches!(out[1], Err(Error::BufferTooSmall { .. })),
        "{:?}",
        out[1]
    );
    // Different batch sizes per rank.
    let out = on_ranks(2, |g| {
        let m = n + g.rank();
        loss.forward_cpu_across(g, &za[..m * d], &zb[..m * d], Dims::new(m, d))
    });
    for r in &out {
        let msg = r.as_ref().unwrap_err().to_string();
        assert!(msg.contains("different shapes"), "{msg}");
    }
    // Non-finite input on one rank: every rank reports it.
    let mut bad = za.clone();
    bad[n * d + 3] = f32::NAN;
    let out = split(&loss, 2, &bad, &zb, d);
    for r in &out {
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    }
    // One row per rank is enough when the whole batch has two.
    let out = split(&loss, 2, &za[..2 * d], &zb[..2 * d], d);
    assert!(out.iter().all(Result::is_ok));
    let out = split(&loss, 1, &za[..d], &zb[..d], d);
    assert!(matches!(out[0], Err(Error::BatchTooSmall { n: 1 })));
}

#[test]
fn auto_path_picks_by_bytes_moved() {
    // 2·N·D < D²: gather; else reduce C.
    assert_eq!(
        LossPath::Auto.resolve_across(Dims::new(2048, 8192), 8),
        LossPath::Gram
    );
    assert_eq!(
        LossPath::Auto.resolve_across(Dims::new(2048, 2048), 8),
        LossPath::Direct
    );
    assert_eq!(
        LossPath::Direct.resolve_across(Dims::new(16, 8192), 2),
        LossPath::Direct
    );
    let one = Dims::new(2048, 2000);
    assert_eq!(
        LossPath::Auto.resolve_across(one, 1),
        LossPath::Auto.resolve(one)
    );
}
