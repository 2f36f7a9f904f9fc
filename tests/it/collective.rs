//! Collectives: the TCP ring with 2-4 ranks as threads on loopback (results against a reference sum in the
//! ring's own order, bitwise; identical bytes on every rank), tensors, reduce-scatter/all-gather, broadcast,
//! barrier, failures (dead peer, hung peer, wrong generation, disagreeing lengths, nobody listening), ranks as
//! separate processes with one SIGKILLed mid-operation, and NCCL's behaviour on a machine without CUDA.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::ring;
use ddpo::collective::{
    chunk_range, Collective, CollectiveError, LocalCollective, NcclCollective, RingCollective,
};
use tch::{Device, Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(2);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Runs `f(rank, collective)` on every rank in its own thread; results in rank order.
fn on_all<C: Collective, R: Send>(cs: &mut [C], f: impl Fn(usize, &mut C) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = cs
            .iter_mut()
            .enumerate()
            .map(|(r, c)| s.spawn(move || f(r, c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// splitmix64: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1) with a spread of magnitudes, so the summation order matters.
    fn value(&mut self) -> f64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let scale = [1.0, 1e-3, 1e3][(self.next() % 3) as usize];
        (2.0 * u - 1.0) * scale
    }
}

fn data_f32(seed: u64, len: usize) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..len).map(|_| r.value() as f32).collect()
}

fn data_f64(seed: u64, len: usize) -> Vec<f64> {
    let mut r = Rng(seed);
    (0..len).map(|_| r.value()).collect()
}

/// The ring's summation order: chunk c is accumulated starting at rank c+1, each rank adding its own value to
/// the partial sum received: x[c+n] + (… + (x[c+2] + x[c+1])).
fn ring_sum<T: Copy + std::ops::Add<Output = T>>(inputs: &[Vec<T>]) -> Vec<T> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = Vec::with_capacity(len);
    for c in 0..n {
        for i in chunk_range(len, n, c) {
            let mut s = inputs[(c + 1) % n][i];
            for k in 2..=n {
                s = inputs[(c + k) % n][i] + s;
            }
            out.push(s);
        }
    }
    out
}

const WORLDS: [usize; 3] = [2, 3, 4];

fn lengths(world: usize) -> Vec<usize> {
    vec![0, 1, 7, world - 1, 100_000, 3_000_013]
}

#[test]
fn ring_all_reduce_f32_matches_ring_order_sum_bitwise() {
    for world in WORLDS {
        let mut cs = ring(world, Duration::from_secs(20));
        for (li, len) in lengths(world).into_iter().enumerate() {
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|r| data_f32(1000 * r as u64 + li as u64, len))
                .collect();
            let want = ring_sum(&inputs);
            let outs = on_all(&mut cs, |r, c| {
                let mut b = inputs[r].clone();
                c.all_reduce_sum_f32(&mut b).unwrap();
                b
            });
            for (r, out) in outs.iter().enumerate() {
                let same = out
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && out.len() == len,
                    "world {world} len {len} rank {r} differs from the ring-order sum"
                );
            }
            // And close to the plain sum, as a sanity check of the reference itself.
            for i in (0..len).step_by(997) {
                let plain: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                let mag: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
                assert!((want[i] as f64 - plain).abs() <= 1e-6 * (1.0 + mag));
            }
        }
    }
}

#[test]
fn ring_all_reduce_f64_matches_ring_order_sum_bitwise() {
    for world in WORLDS {
        let mut cs = ring(world, Duration::from_secs(20));
        // Segments of different sizes on different ranks, including sizes that are not a multiple of 8 bytes.
        for (r, c) in cs.iter_mut().enumerate() {
            c.set_segment_bytes([1000, 4096, 1 << 20, 777][r]);
        }
        for (li, len) in lengths(world).into_iter().enumerate() {
            let inputs: Vec<Vec<f64>> = (0..world)
                .map(|r| data_f64(7 + 1000 * r as u64 + li as u64, len))
                .collect();
            let want = ring_sum(&inputs);
            let outs = on_all(&mut cs, |r, c| {
                let mut b = inputs[r].clone();
                c.all_reduce_sum_f64(&mut b).unwrap();
                b
            });
            for (r, out) in outs.iter().enumerate() {
                let same = out
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same && out.len() == len,
                    "world {world} len {len} rank {r} differs from the ring-order sum"
                );
            }
        }
    }
}

#[test]
fn ring_reduce_scatter_then_all_gather_equals_all_reduce() {
    for world in WORLDS {
        let mut cs = ring(world, Duration::from_secs(20));
        for len in [0, 1, 5, 100_003] {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data_f32(50 + r as u64, len)).collect();
            let want = ring_sum(&inputs);
            let outs = on_all(&mut cs, |r, c| {
                let mut b = inputs[r].clone();
                let mine = c.reduce_scatter_sum_f32(&mut b).unwrap();
                assert_eq!(mine, chunk_range(len, world, r));
                let chunk_ok = b[mine.clone()]
                    .iter()
                    .zip(&want[mine])
                    .all(|(a, w)| a.to_bits() == w.to_bits());
                c.all_gather_f32(&mut b).unwrap();
                (chunk_ok, b)
            });
            for (r, (chunk_ok, out)) in outs.iter().enumerate() {
                assert!(
                    chunk_ok,
                    "world {world} len {len}: rank {r}'s reduced chunk is wrong"
                );
                assert!(
                    out.iter()
                        .zip(&want)
                        .all(|(a, w)| a.to_bits() == w.to_bits()),
                    "world {world} len {len}: rank {r} after all-gather differs from all-reduce"
                );
            }
        }
        // All-gather alone: each rank contributes only its chunk.
        let len = 10_007;
        let full = data_f32(99, len);
        let outs = on_all(&mut cs, |r, c| {
            let mut b = vec![f32::NAN; len];
            let mine = chunk_range(len, world, r);
            b[mine.clone()].copy_from_slice(&full[mine]);
            c.all_gather_f32(&mut b).unwrap();
            b
        });
        for out in outs {
            assert!(out
                .iter()
                .zip(&full)
                .all(|(a, w)| a.to_bits() == w.to_bits()));
        }
    }
}

#[test]
fn ring_mean_of_tensors_in_small_buckets() {
    for world in WORLDS {
        let mut cs = ring(world, Duration::from_secs(20));
        let shapes: Vec<Vec<i64>> = vec![
            vec![3, 5],
            vec![7],
            vec![0],
            vec![2, 3, 4],
            vec![1],
            vec![4, 6],
        ];
        // Per rank: the tensors' values (the [2,3,4] one is made non-contiguous by a transpose, the last is f64).
        let values: Vec<Vec<Vec<f32>>> = (0..world)
            .map(|r| {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        data_f32(
                            300 + 10 * r as u64 + i as u64,
                            s.iter().product::<i64>() as usize,
                        )
                    })
                    .collect()
            })
            .collect();
        let make = |r: usize| -> Vec<Tensor> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = Tensor::from_slice(&values[r][i]).reshape(s.as_slice());
                    match i {
                        3 => t.transpose(0, 2).contiguous().transpose(0, 2), // same values, non-contiguous
                        5 => t.to_kind(Kind::Double),
                        _ => t,
                    }
                })
                .collect()
        };
        let outs = on_all(&mut cs, |r, c| {
            let ts = make(r);
            assert!(!ts[3].is_contiguous());
            // 20 bytes: 5 values per bucket, so tensors span buckets.
            c.all_reduce_mean_tensors(&ts, 20).unwrap();
            ts.iter()
                .map(|t| {
                    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
                })
                .collect::<Vec<_>>()
        });
        for (i, shape) in shapes.iter().enumerate() {
            for (r, out) in outs.iter().enumerate() {
                // Bucket layout decides the chunk boundaries, so compare with the plain mean within rounding.
                for (k, got) in out[i].iter().enumerate() {
                    let mean =
                        (0..world).map(|q| values[q][i][k] as f64).sum::<f64>() / world as f64;
                    let mag = (0..world)
                        .map(|q| (values[q][i][k] as f64).abs())
                        .sum::<f64>();
                    assert!(
                        (*got as f64 - mean).abs() <= 1e-6 * (1.0 + mag),
                        "world {world} tensor {i} {shape:?} rank {r} elem {k}: {got} vs {mean}"
                    );
                }
                let same = out[i]
                    .iter()
                    .zip(&outs[0][i])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "world {world} tensor {i}: rank {r} differs from rank 0"
                );
            }
        }
    }
}

#[test]
fn ring_broadcast_and_barrier() {
    for world in WORLDS {
        let mut cs = ring(world, Duration::from_secs(20));
        cs[0].set_segment_bytes(1000);
        for root in [0, world - 1] {
            for len in [0usize, 1, 3_000_001] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 31 + root) as u8).collect();
                let outs = on_all(&mut cs, |r, c| {
                    let mut b = if r == root {
                        payload.clone()
                    } else {
                        vec![7u8; 5 + r]
                    };
                    c.broadcast_bytes(&mut b, root).unwrap();
                    b
                });
                for (r, out) in outs.iter().enumerate() {
                    assert!(
                        out == &payload,
                        "world {world} root {root} len {len}: rank {r} differs"
                    );
                }
            }
        }
        // Barrier: rank r arrives after r × 150 ms; nobody leaves before the last arrived.
        let start = Instant::now();
        let left = on_all(&mut cs, |r, c| {
            std::thread::sleep(Duration::from_millis(150 * r as u64));
            c.barrier().unwrap();
            start.elapsed()
        });
        let last = Duration::from_millis(150 * (world as u64 - 1));
        for (r, t) in left.iter().enumerate() {
            assert!(
                *t >= last,
                "world {world}: rank {r} left the barrier after {t:?}, before the last arrival"
            );
        }
        // Still usable afterwards.
        let outs = on_all(&mut cs, |r, c| {
            let mut b = vec![r as f32];
            c.all_reduce_sum_f32(&mut b).unwrap();
            b[0]
        });
        assert!(outs.iter().all(|&x| x == (world * (world - 1) / 2) as f32));
    }
}

#[test]
fn ring_of_one_and_local_are_no_ops() {
    let l = RingCollective::listen(loopback()).unwrap();
    let addr = l.local_addr();
    let mut c = RingCollective::connect(l, 0, &[addr], 3, TIMEOUT).unwrap();
    let mut local = LocalCollective;
    for c in [&mut c as &mut dyn Collective, &mut local] {
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let mut b = vec![1.5f32, 2.5];
        c.all_reduce_sum_f32(&mut b).unwrap();
        assert_eq!(b, vec![1.5, 2.5]);
        assert_eq!(c.reduce_scatter_sum_f32(&mut b).unwrap(), 0..2);
        c.all_gather_f32(&mut b).unwrap();
        let mut bytes = b"x".to_vec();
        c.broadcast_bytes(&mut bytes, 0).unwrap();
        c.barrier().unwrap();
        let t = Tensor::from_slice(&[4.0f32]);
        c.all_reduce_mean_tensors(&[t.shallow_clone()], 1 << 20)
            .unwrap();
        assert_eq!(t.double_value(&[0]), 4.0);
    }
}

fn peer_of(e: &CollectiveError) -> Option<usize> {
    match e {
        CollectiveError::PeerClosed { peer, .. }
        | CollectiveError::Io { peer, .. }
        | CollectiveError::Timeout { peer, .. }
        | CollectiveError::Mismatch { peer, .. }
        | CollectiveError::Connect { peer, .. }
        | CollectiveError::Accept { peer, .. } => Some(*peer),
        _ => None,
    }
}

#[test]
fn dead_peer_is_an_error_naming_it_not_a_hang() {
    let mut cs = ring(3, TIMEOUT);
    let dead = cs.remove(1);
    drop(dead);
    let start = Instant::now();
    let errs = on_all(&mut cs, |r, c| {
        let mut b = data_f32(r as u64, 1_000_000);
        let e = c.all_reduce_sum_f32(&mut b).unwrap_err();
        (e, start.elapsed())
    });
    for (e, t) in &errs {
        assert_eq!(
            peer_of(e),
            Some(1),
            "expected an error naming rank 1, got: {e}"
        );
        assert!(e.to_string().contains("rank 1"), "{e}");
        assert!(*t < TIMEOUT + Duration::from_secs(1), "took {t:?}: {e}");
    }
    // The collective is broken afterwards.
    for c in cs.iter_mut() {
        let mut b = vec![0f32; 4];
        assert!(matches!(
            c.all_reduce_sum_f32(&mut b),
            Err(CollectiveError::Broken(_))
        ));
    }
}

#[test]
fn hung_peer_times_out() {
    let mut cs = ring(3, TIMEOUT);
    let start = Instant::now();
    let errs = on_all(&mut cs, |r, c| {
        if r == 1 {
            // Alive, connected, but never joins the operation.
            std::thread::sleep(TIMEOUT * 2);
            return None;
        }
        // 48 MB: far more than the sockets buffer, so rank 0 blocks sending to rank 1.
        let mut b = vec![r as f32; 12_000_000];
        let e = c.all_reduce_sum_f32(&mut b).unwrap_err();
        Some((e, start.elapsed()))
    });
    for (e, t) in errs.iter().flatten() {
        eprintln!("{t:?}: {e}");
    }
    for (e, t) in errs.into_iter().flatten() {
        assert!(
            matches!(e, CollectiveError::Timeout { .. }),
            "expected a timeout, got: {e}"
        );
        assert!(e.to_string().contains("rank 1"), "{e}");
        assert!(
            t >= TIMEOUT && t < TIMEOUT + Duration::from_millis(1500),
            "took {t:?}: {e}"
        );
    }
}

#[test]
fn wrong_generation_is_refused() {
    // Rank 1 is a stale process of generation 4 trying to join generation 5.
    let l0 = RingCollective::listen(loopback()).unwrap();
    let l1 = RingCollective::listen(loopback()).unwrap();
    let peers = [l0.local_addr(), l1.local_addr()];
    let start = Instant::now();
    let (r0, r1) = std::thread::scope(|s| {
        let a = s.spawn(|| RingCollective::connect(l0, 0, &peers, 5, TIMEOUT).map(|_| ()));
        let b = s.spawn(|| {
            (
                RingCollective::connect(l1, 1, &peers, 4, TIMEOUT).map(|_| ()),
                start.elapsed(),
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let (r1, t1) = r1;
    let e1 = r1.unwrap_err();
    assert!(
        matches!(e1, CollectiveError::Mismatch { peer: 0, .. }),
        "{e1}"
    );
    assert!(e1.to_string().contains("generation"), "{e1}");
    assert!(
        t1 < TIMEOUT,
        "the stale rank should be refused at once, took {t1:?}"
    );
    // Rank 0 is refused by the stale process in turn (and would have refused it).
    let e0 = r0.unwrap_err();
    assert!(
        matches!(e0, CollectiveError::Mismatch { peer: 1, .. }),
        "{e0}"
    );
    assert!(
        e0.to_string().contains("generation 4") && e0.to_string().contains("generation 5"),
        "{e0}"
    );

    // A stale process knocking first does not stop the right peer from joining.
    let l0 = RingCollective::listen(loopback()).unwrap();
    let l1 = RingCollective::listen(loopback()).unwrap();
    let stale = RingCollective::listen(loopback()).unwrap();
    let peers = [l0.local_addr(), l1.local_addr()];
    let stale_peers = [l0.local_addr(), stale.local_addr()];
    let mut cs = std::thread::scope(|s| {
        let st =
            s.spawn(|| RingCollective::connect(stale, 1, &stale_peers, 6, TIMEOUT).unwrap_err());
        std::thread::sleep(Duration::from_millis(200)); // the stale hello is first in rank 0's backlog
        let a = s.spawn(|| RingCollective::connect(l0, 0, &peers, 7, TIMEOUT * 2).unwrap());
        let e = st.join().unwrap();
        assert!(
            matches!(e, CollectiveError::Mismatch { peer: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("refused"), "{e}");
        let b = s.spawn(|| RingCollective::connect(l1, 1, &peers, 7, TIMEOUT * 2).unwrap());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let outs = on_all(&mut cs, |r, c| {
        let mut b = vec![r as f64 + 1.0; 3];
        c.all_reduce_sum_f64(&mut b).unwrap();
        b
    });
    assert!(outs.iter().all(|b| b == &vec![3.0; 3]));
}

#[test]
fn disagreeing_lengths_fail_fast() {
    let mut cs = ring(3, Duration::from_secs(10));
    let start = Instant::now();
    let errs = on_all(&mut cs, |r, c| {
        let mut b = vec![1f32; if r == 2 { 1001 } else { 1000 }];
        (c.all_reduce_sum_f32(&mut b).unwrap_err(), start.elapsed())
    });
    // Rank 0 receives rank 2's header: it names rank 2 and the lengths.
    let (e0, _) = &errs[0];
    assert!(
        matches!(e0, CollectiveError::Mismatch { peer: 2, .. }),
        "{e0}"
    );
    assert!(
        e0.to_string().contains("buffer length 1001, ours 1000"),
        "{e0}"
    );
    for (e, t) in &errs {
        assert!(*t < Duration::from_secs(5), "took {t:?}: {e}");
    }
}

#[test]
fn nobody_listening_is_a_connect_error() {
    let l0 = RingCollective::listen(loopback()).unwrap();
    let gone = RingCollective::listen(loopback()).unwrap();
    let peers = [l0.local_addr(), gone.local_addr()];
    drop(gone);
    let start = Instant::now();
    let e = RingCollective::connect(l0, 0, &peers, 1, Duration::from_millis(500)).unwrap_err();
    assert!(matches!(e, CollectiveError::Connect { peer: 1, .. }), "{e}");
    assert!(e.to_string().contains(&peers[1].to_string()), "{e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let l = RingCollective::listen(loopback()).unwrap();
    assert!(matches!(
        RingCollective::connect(l, 2, &peers, 1, TIMEOUT),
        Err(CollectiveError::InvalidArgument(_))
    ));
}

/// A ring connect waiting for a peer that will never come gives up as soon as the caller sets `abort`
/// (the worker's heartbeat does when the coordinator dissolves the world), long before its timeout: both
/// while the next rank refuses connections and while it is bound but never answers the handshake.
#[test]
fn an_aborted_connect_stops_waiting_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for answers in [false, true] {
        let l0 = RingCollective::listen(loopback()).unwrap();
        // Bound but never accepting (the TCP connect succeeds, the handshake never does), or gone.
        let silent = RingCollective::listen(loopback()).unwrap();
        let peers = [l0.local_addr(), silent.local_addr()];
        let _keep = if answers {
            Some(silent)
        } else {
            drop(silent);
            None
        };
        let abort = AtomicBool::new(false);
        let start = Instant::now();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                abort.store(true, Ordering::Relaxed);
            });
            RingCollective::connect_or_abort(l0, 0, &peers, 1, Duration::from_secs(60), &abort)
                .unwrap_err()
        });
        assert!(matches!(e, CollectiveError::Aborted(_)), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
    }
}

// ---- ranks as processes -------------------------------------------------------------------------------------

const CHILD_ENV: &str = "DDPO_TEST_RING_CHILD";
const TAG: &str = "@@ring";

/// Not a test on its own: the body of a rank process for `ring_across_processes_survives_sigkill`. Without
/// the environment variable it returns at once.
#[test]
fn ring_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (rank, world): (usize, usize) = {
        let mut it = spec.split(',').map(|x| x.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    let l = RingCollective::listen(loopback()).unwrap();
    println!("{TAG} addr {}", l.local_addr());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers: Vec<SocketAddr> = line.trim().split(',').map(|a| a.parse().unwrap()).collect();
    assert_eq!(peers.len(), world);
    let mut c = RingCollective::connect(l, rank, &peers, 1, TIMEOUT).unwrap();
    // Phase 1: a correct result across processes.
    let mut b = data_f32(rank as u64, 100_007);
    c.all_reduce_sum_f32(&mut b).unwrap();
    let digest = b
        .iter()
        .fold(0u64, |h, x| h.rotate_left(5) ^ x.to_bits() as u64);
    println!("{TAG} digest {digest}");
    // Phase 2: all-reduce until a peer dies.
    println!("{TAG} loop");
    let mut big = data_f32(rank as u64, 3_000_000);
    loop {
        if let Err(e) = c.all_reduce_sum_f32(&mut big) {
            println!("{TAG} err {}", e.to_string().replace('\n', " "));
            // Like a worker reporting to the coordinator before it exits: closing at once would make the
            // other survivor see this rank go, rather than the killed one.
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        for x in big.iter_mut() {
            *x *= 0.25;
        }
    }
}

/// The children's tagged lines, taken phase by phase (a fast rank may report its next phase early).
struct Reports {
    rx: mpsc::Receiver<(usize, String, Instant)>,
    pending: Vec<(usize, String, Instant)>,
    deadline: Instant,
}

impl Reports {
    /// One `what` report from each of `n` ranks: (rank, rest of the line, when it arrived), by rank.
    fn take(&mut self, what: &str, n: usize) -> Vec<(usize, String, Instant)> {
        let mut got: Vec<(usize, String, Instant)> = Vec::new();
        loop {
            while let Some(i) = self
                .pending
                .iter()
                .position(|(r, m, _)| m.starts_with(what) && !got.iter().any(|g| g.0 == *r))
            {
                let (r, m, t) = self.pending.remove(i);
                got.push((r, m[what.len()..].trim().to_string(), t));
            }
            if got.len() >= n {
                got.sort_by_key(|g| g.0);
                return got;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            let msg = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("children did not report {what}: {got:?}"));
            self.pending.push(msg);
        }
    }
}

/// Kills the children still running when dropped (a failed assertion must not leave processes behind).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn ring_across_processes_survives_sigkill() {
    let world = 3;
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    let (tx, rx) = mpsc::channel::<(usize, String, Instant)>();
    let mut stdins: Vec<ChildStdin> = Vec::new();
    for r in 0..world {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "collective::ring_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, format!("{r},{world}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        stdins.push(child.stdin.take().unwrap());
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest may print "test ring_child ... " in front of the child's first line.
                if let Some(at) = line.find(TAG) {
                    let _ = tx.send((r, line[at + TAG.len()..].trim().to_string(), Instant::now()));
                }
            }
        });
        children.0.push(child);
    }
    let mut reports = Reports {
        rx,
        pending: Vec::new(),
        deadline: Instant::now() + Duration::from_secs(60),
    };
    let mut expect = |what: &str, n: usize| reports.take(what, n);
    let addrs: Vec<String> = expect("addr", world).into_iter().map(|g| g.1).collect();
    for s in &mut stdins {
        writeln!(s, "{}", addrs.join(",")).unwrap();
    }
    let digests = expect("digest", world);
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| data_f32(r as u64, 100_007)).collect();
    let want = ring_sum(&inputs)
        .iter()
        .fold(0u64, |h, x| h.rotate_left(5) ^ x.to_bits() as u64);
    for (r, d, _) in &digests {
        assert_eq!(
            d,
            &want.to_string(),
            "rank {r} computed a different sum across processes"
        );
    }
    expect("loop", world);
    std::thread::sleep(Duration::from_millis(300));
    children.0[1].kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    let errs = expect("err", world - 1);
    for (r, msg, t) in &errs {
        // Rank 2 reads from rank 1: it always names it. Rank 0 sends to rank 1 and names it while it still has
        // bytes for it; in the tail of an operation (its sends done, waiting for rank 2) it can only see rank 2
        // stop, and names rank 2.
        let named = if *r == 2 {
            msg.contains("rank 1")
        } else {
            msg.contains("rank 1") || msg.contains("rank 2")
        };
        assert!(
            named,
            "rank {r}'s error does not name the killed rank: {msg}"
        );
        let after = t.duration_since(killed);
        assert!(
            after < TIMEOUT + Duration::from_secs(1),
            "rank {r} noticed after {after:?}: {msg}"
        );
    }
    for (i, c) in children.0.iter_mut().enumerate() {
        let status = c.wait().unwrap();
        if i != 1 {
            assert!(status.success(), "rank {i} exited with {status}");
        }
    }
}

// ---- NCCL ---------------------------------------------------------------------------------------------------

#[test]
fn nccl_without_cuda_is_a_clear_error_and_with_cuda_works_for_one_rank() {
    let lib = NcclCollective::library();
    eprintln!(
        "NCCL library: {lib:?}; available: {}",
        NcclCollective::available()
    );
    if !tch::Cuda::is_available() {
        assert!(!NcclCollective::available());
        let why = NcclCollective::check_available().unwrap_err();
        assert!(matches!(why, CollectiveError::NcclUnavailable(_)), "{why}");
        let e = NcclCollective::unique_id().unwrap_err();
        assert!(matches!(e, CollectiveError::NcclUnavailable(_)), "{e}");
        let e = NcclCollective::new(0, 2, [0u8; 128], 0).unwrap_err();
        assert!(e.to_string().starts_with("NCCL unavailable: "), "{e}");
        return;
    }
    // A GPU machine: a communicator of one rank exercises loading, init, enqueue and completion.
    assert!(
        NcclCollective::available(),
        "{:?}",
        NcclCollective::check_available()
    );
    let id = NcclCollective::unique_id().unwrap();
    let mut c = NcclCollective::new(0, 1, id, 0).unwrap();
    let mut b = vec![1.5f32, -2.0, 3.0];
    c.all_reduce_sum_f32(&mut b).unwrap();
    assert_eq!(b, vec![1.5, -2.0, 3.0]);
    let mut d = vec![0.25f64; 5];
    c.all_reduce_sum_f64(&mut d).unwrap();
    assert_eq!(d, vec![0.25; 5]);
    assert_eq!(c.reduce_scatter_sum_f32(&mut b).unwrap(), 0..3);
    c.all_gather_f32(&mut b).unwrap();
    assert_eq!(b, vec![1.5, -2.0, 3.0]);
    let mut bytes = b"hello".to_vec();
    c.broadcast_bytes(&mut bytes, 0).unwrap();
    assert_eq!(bytes, b"hello");
    c.barrier().unwrap();
    let dev = Device::Cuda(0);
    let ts = [
        Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(dev),
        Tensor::from_slice(&[4.0f32; 10])
            .to_device(dev)
            .to_kind(Kind::BFloat16),
    ];
    c.all_reduce_mean_tensors(&ts, 8).unwrap();
    assert_eq!(
        Vec::<f32>::try_from(&ts[0].to_device(Device::Cpu)).unwrap(),
        vec![1.0, 2.0, 3.0]
    );
    assert_eq!(
        ts[1]
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]),
        40.0
    );
    assert!(matches!(
        c.all_reduce_mean_tensors(&[Tensor::from_slice(&[1.0f32])], 8),
        Err(CollectiveError::InvalidArgument(_))
    ));
}
