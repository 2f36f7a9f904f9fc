//! Ring all-reduce bus bandwidth on loopback against PyTorch Gloo, in one run. Not a test.
//! Run: `make bench-collective` (or `scripts/with-torch cargo bench --bench collective`).
//!
//! For 2 and 3 ranks and f32 buffers of 1 … 256 MiB, the ranks of `RingCollective` run as separate processes
//! (this binary re-invoked in a child mode) and `benches/gloo_allreduce.py` runs `torch.distributed.all_reduce`
//! with the Gloo backend (torch.multiprocessing, tcp init on 127.0.0.1) with the same sizes, iterations and
//! rounds, with the project's Python (`DDPO_PYTHON`). A round is `iters` back-to-back all-reduces after a
//! barrier; its time is the slowest rank's; a pass reports the median round; ring and Gloo passes alternate
//! and each keeps its best pass. Bus bandwidth = 2(n−1)/n × bytes / time.
//! Env: SIZES_MB (default 1,4,16,64,256), WORLDS (default 2,3), ROUNDS (default 5), PASSES (default 2),
//! SEGMENT_BYTES (ring only), RING_ONLY (skip Gloo, for tuning).
mod common;
use common::median;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ddpo::collective::{Collective, RingCollective};

const CHILD_ENV: &str = "DDPO_BENCH_RING_CHILD";
const MIB: usize = 1 << 20;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Iterations per round: ~512 MiB of buffer per round for small sizes, at least 3.
fn iters_for(bytes: usize) -> usize {
    (512 * MIB / bytes).clamp(3, 40)
}

/// Child mode: one rank. Protocol on stdio: print "@@ring addr A", read the peers line, then per size and
/// round print "@@ring R BYTES ITERS SECONDS".
fn child(spec: &str) {
    let f: Vec<usize> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let (rank, rounds) = (f[0], f[2]);
    let sizes = &f[3..];
    let l = RingCollective::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    println!("@@ring addr {}", l.local_addr());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers: Vec<SocketAddr> = line.trim().split(',').map(|a| a.parse().unwrap()).collect();
    let mut c = RingCollective::connect(l, rank, &peers, 1, Duration::from_secs(60)).unwrap();
    if let Some(seg) = std::env::var("SEGMENT_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        c.set_segment_bytes(seg);
    }
    for &bytes in sizes {
        let iters = iters_for(bytes);
        let mut buf = vec![1e-3f32; bytes / 4];
        c.all_reduce_sum_f32(&mut buf).unwrap(); // warm-up
        for _ in 0..rounds {
            c.barrier().unwrap();
            let t0 = Instant::now();
            for _ in 0..iters {
                c.all_reduce_sum_f32(&mut buf).unwrap();
            }
            println!(
                "@@ring {rank} {bytes} {iters} {:.6}",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    c.barrier().unwrap();
}

/// Median over rounds of the slowest rank's round time, per size; from "@@tag rank bytes iters secs" lines.
fn collect(
    lines: &[String],
    tag: &str,
    world: usize,
    rounds: usize,
) -> BTreeMap<usize, (usize, f64)> {
    let mut by_size: BTreeMap<usize, (usize, Vec<Vec<f64>>)> = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 5 || f[0] != tag || f[1] == "addr" {
            continue;
        }
        let (rank, bytes, iters): (usize, usize, usize) = (
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].parse().unwrap(),
        );
        let secs: f64 = f[4].parse().unwrap();
        let e = by_size
            .entry(bytes)
            .or_insert_with(|| (iters, vec![Vec::new(); world]));
        e.1[rank].push(secs);
    }
    by_size
        .into_iter()
        .map(|(bytes, (iters, per_rank))| {
            assert!(
                per_rank.iter().all(|r| r.len() == rounds),
                "{tag}: missing rounds for {bytes} bytes"
            );
            let slowest: Vec<f64> = (0..rounds)
                .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
                .collect();
            (bytes, (iters, median(slowest) / iters as f64))
        })
        .collect()
}

fn run_ring(world: usize, sizes: &[usize], rounds: usize) -> BTreeMap<usize, (usize, f64)> {
    let exe = std::env::current_exe().unwrap();
    let spec = [vec![0, world, rounds], sizes.to_vec()].concat();
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for r in 0..world {
        let mut s = spec.clone();
        s[0] = r;
        let spec = s
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        readers.push(BufReader::new(child.stdout.take().unwrap()).lines());
        children.push(child);
    }
    let mut addrs = Vec::new();
    for rd in readers.iter_mut() {
        let line = rd.next().unwrap().unwrap();
        addrs.push(
            line.strip_prefix("@@ring addr ")
                .expect("child address")
                .to_string(),
        );
    }
    for c in children.iter_mut() {
        writeln!(c.stdin.as_mut().unwrap(), "{}", addrs.join(",")).unwrap();
    }
    let handles: Vec<_> = readers
        .into_iter()
        .map(|rd| std::thread::spawn(move || rd.map_while(Result::ok).collect::<Vec<_>>()))
        .collect();
    let lines: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a ring rank failed");
    }
    collect(&lines, "@@ring", world, rounds)
}

fn run_gloo(
    python: &str,
    world: usize,
    sizes: &[usize],
    rounds: usize,
) -> BTreeMap<usize, (usize, f64)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gloo_allreduce.py");
    let join = |v: Vec<usize>| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new(python)
        .arg(script)
        .args([
            "--world",
            &world.to_string(),
            "--rounds",
            &rounds.to_string(),
        ])
        .args([
            "--sizes",
            &join(sizes.to_vec()),
            "--iters",
            &join(sizes.iter().map(|&b| iters_for(b)).collect()),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("running the Gloo baseline");
    assert!(out.status.success(), "gloo_allreduce.py failed");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    collect(&lines, "@@gloo", world, rounds)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("collective: a benchmark; run it with `make bench-collective`");
        return;
    }
    let python = std::env::var("DDPO_PYTHON")
        .expect("DDPO_PYTHON (set by scripts/with-torch) names the venv python");
    let sizes: Vec<usize> = env_list("SIZES_MB", &[1, 4, 16, 64, 256])
        .into_iter()
        .map(|m| m * MIB)
        .collect();
    let worlds = env_list("WORLDS", &[2, 3]);
    let rounds = env_list("ROUNDS", &[5])[0];
    let passes = env_list("PASSES", &[2])[0].max(1);
    // For tuning the ring alone: the Gloo columns then repeat the ring's.
    let ring_only = std::env::var_os("RING_ONLY").is_some();
    let started = Instant::now();
    println!("| ranks | size | iters | ring ms | ring bus GB/s | gloo ms | gloo bus GB/s | ring / gloo |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for &world in &worlds {
        // Passes alternate ring and Gloo so that a burst of load on this shared machine hits both; each keeps
        // its best pass per size.
        let best =
            |a: Option<BTreeMap<usize, (usize, f64)>>, b: BTreeMap<usize, (usize, f64)>| match a {
                None => b,
                Some(a) => a
                    .into_iter()
                    .map(|(k, v)| (k, if b[&k].1 < v.1 { b[&k] } else { v }))
                    .collect(),
            };
        let (mut ring, mut gloo) = (None, None);
        for _ in 0..passes {
            ring = Some(best(ring, run_ring(world, &sizes, rounds)));
            if ring_only {
                gloo = ring.clone();
            } else {
                gloo = Some(best(gloo, run_gloo(&python, world, &sizes, rounds)));
            }
        }
        let (ring, gloo) = (ring.unwrap(), gloo.unwrap());
        for &bytes in &sizes {
            let (iters, rt) = ring[&bytes];
            let (_, gt) = gloo[&bytes];
            let bus = |t: f64| 2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64 / t / 1e9;
            ratios.push(gt / rt);
            println!(
                "| {world} | {} MiB | {iters} | {:.2} | {:.2} | {:.2} | {:.2} | **{:.2}×** |",
                bytes / MIB,
                rt * 1e3,
                bus(rt),
                gt * 1e3,
                bus(gt),
                gt / rt
            );
        }
    }
    let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    println!(
        "\ngeometric mean ring / gloo: {geo:.2}× (min {:.2}×); {:.0} s",
        ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        started.elapsed().as_secs_f64()
    );
}
