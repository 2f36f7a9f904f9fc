//! The distributed job with real processes on loopback: a coordinator and CPU workers (TCP ring).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ddpo::rpc::pb;

/// These tests start several processes each; on a 2-core machine running them one at a time keeps
/// heartbeats and timeouts meaningful.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits up to `limit` for the process to exit; its status, or a panic naming what hung.
    fn wait(&mut self, limit: Duration, what: &str) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "{what} did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn bin(name: &str) -> PathBuf {
    // CARGO_BIN_EXE_<name> is set for the package's binaries in integration tests.
    match name {
        "coordinator" => PathBuf::from(env!("CARGO_BIN_EXE_coordinator")),
        "worker" => PathBuf::from(env!("CARGO_BIN_EXE_worker")),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_ddpo")),
    }
}

struct Job {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Job {
    fn new(pairs: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        ddpo::preset::init_model(&root.join("model"), "tiny", 0).unwrap();
        for (prefix, n, seed) in [("train", pairs, 1), ("eval", 16, 2)] {
            ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
                out_dir: root.join("data"),
                pairs: n,
                shards: 2,
                seed,
                image_size: 48,
                rows_per_group: 8,
                prefix: prefix.into(),
                difficulty: ddpo::data::synth::Difficulty::Easy,
            })
            .unwrap();
        }
        Job { _dir: dir, root }
    }

    fn config(&self, name: &str, world: usize, extra: &str) -> PathBuf {
        let r = self.root.display();
        let text = format!(
            "[model]\npath = \"{r}/model\"\n[reference]\ncache_dir = \"{r}/cache\"\n\
             [data]\ntrain = [\"{r}/data/train-*.parquet\"]\neval = [\"{r}/data/eval-*.parquet\"]\nmax_length = 256\n\
             [train]\nbatch_size = 8\nmicro_batch_size = 2\nepochs = 1\nlr = 1e-3\nwarmup_ratio = 0.0\nseed = 5\n\
             output_dir = \"{r}/{name}\"\nsave_every = 2\n\
             [cluster]\nworld_size = {world}\nbackend = \"ring\"\nheartbeat_secs = 1\nheartbeat_timeout_secs = 5\n\
             collective_timeout_secs = 5\nreplica_check_every = 1\n{extra}\n"
        );
        let p = self.root.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Starts a coordinator on a free port; returns it and its URL.
    fn coordinator(&self, config: &Path, local_workers: usize) -> (Proc, String) {
        let addr_file = config.with_extension("addr");
        let _ = std::fs::remove_file(&addr_file);
        let child = Command::new(bin("coordinator"))
            .args([
                "--config",
                config.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--local-workers", &local_workers.to_string()])
            .args(["--address-file", addr_file.to_str().unwrap()])
            .args(["--linger-secs", "8"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                if !a.is_empty() {
                    break a;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "coordinator did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (Proc(child), format!("http://{addr}"))
    }
}

/// Rewrites a job config for a longer run (4 pairs a step, 2 epochs) with a checkpoint every
/// `save_every` steps; returns the new text.
fn long_run(cfg: &Path, save_every: usize) -> String {
    let text = std::fs::read_to_string(cfg)
        .unwrap()
        .replace(
            "batch_size = 8\nmicro_batch_size = 2\nepochs = 1",
            "batch_size = 4\nmicro_batch_size = 2\nepochs = 2",
        )
        .replace("save_every = 2", &format!("save_every = {save_every}"));
    std::fs::write(cfg, &text).unwrap();
    text
}

fn weights(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Two ranks with a global batch of 8 train the same model as one process with a batch of 8. (Every rank
/// also checks after every step that its weights equal rank 0's — the job would fail otherwise.)
#[test]
fn two_workers_match_one_process() {
    let _serial = serial();
    let job = Job::new(32);
    let dist = job.config("dist", 2, "");
    let (mut coord, _url) = job.coordinator(&dist, 2);
    let status = coord.wait(Duration::from_secs(300), "the 2-worker job");
    assert!(status.success(), "coordinator exited with {status}");

    let single = job.config("single", 1, "");
    let o = Command::new(bin("ddpo"))
        .args([
            "train",
            "--config",
            single.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (md, ms) = (
        metrics(&job.root.join("dist")),
        metrics(&job.root.join("single")),
    );
    assert_eq!(md.len(), ms.len());
    for (a, b) in md.iter().zip(&ms) {
        for k in ["loss", "rewards/margins", "eval/loss"] {
            if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                assert!(
                    (x - y).abs() < 1e-5,
                    "step {}: {k} {x} (2 ranks) vs {y} (1 process)",
                    a["step"]
                );
            }
        }
    }
    let (wd, ws) = (
        weights(&job.root.join("dist/checkpoint-4")),
        weights(&job.root.join("single/checkpoint-4")),
    );
    let (mut worst, mut total, mut n) = (0f64, 0f64, 0f64);
    for ((na, a), (nb, b)) in wd.iter().zip(&ws) {
        assert_eq!(na, nb);
        let d = (a - b).abs();
        worst = worst.max(d.max().double_value(&[]));
        total += d.sum(tch::Kind::Double).double_value(&[]);
        n += a.numel() as f64;
    }
    eprintln!(
        "2 ranks vs 1 process after 4 steps: max |Δw| {worst:.3e}, mean |Δw| {:.3e}",
        total / n
    );
    // Adam's update is ±lr where a gradient is ~0, so summation-order noise can move single elements by up
    // to a few lr; on average the weights must agree to float precision.
    assert!(worst <= 4.0 * 1e-3 + 1e-6, "max weight difference {worst}");
    assert!(total / n < 1e-6, "mean weight difference {}", total / n);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The status endpoint answers in every phase; bad requests are refused with a clear status and do not
/// harm the job; a worker that comes after the end is refused.
#[test]
fn status_and_bad_requests() {
    let _serial = serial();
    // Enough data that precompute and training last several status intervals.
    let job = Job::new(256);
    let cfg = job.config("status", 1, "");
    let (mut coord, url) = job.coordinator(&cfg, 0);
    rt().block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone())
            .await
            .unwrap();
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.phase(), pb::Phase::Waiting);
        assert_eq!(s.shards_total, 4);
        // Malformed and unknown requests.
        let e = c
            .register(pb::RegisterRequest {
                hostname: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let e = c
            .next_task(pb::NextTaskRequest {
                worker_id: "w99-nobody".into(),
                ring_address: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        assert!(e.message().contains("unknown worker w99-nobody"), "{e}");
        // A worker that sees a different model is refused at Ready.
        let r = c
            .register(pb::RegisterRequest {
                hostname: "impostor".into(),
                device: "cpu".into(),
                ring_address: "127.0.0.1:1".into(),
                pid: 1,
            })
            .await
            .unwrap()
            .into_inner();
        let e = c
            .ready(pb::ReadyRequest {
                worker_id: r.worker_id.clone(),
                model_digest: "0".repeat(64),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("different model"), "{e}");
        // Only rank 0 of the current generation may publish an NCCL id.
        let e = c
            .publish_nccl_id(pb::PublishNcclIdRequest {
                worker_id: r.worker_id,
                generation: 7,
                nccl_id: vec![0; 128],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ),
            "{e}"
        );
    });
    // Now a real worker runs the whole job; a `ddpo status --watch` stream follows it through every phase.
    let watcher = Command::new(bin("ddpo"))
        .args([
            "status",
            "--coordinator",
            &url,
            "--json",
            "--watch",
            "--interval-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut watcher = Proc(watcher);
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(watcher.0.stdout.take().unwrap()).lines();
    // The watcher's first report comes before the worker exists (it would race the worker's start-up
    // otherwise, and the short waiting phase could pass unseen).
    let first = lines.next().expect("a first status line").unwrap();
    let mut worker = Proc(
        Command::new(bin("worker"))
            .args([
                "--coordinator",
                &url,
                "--device",
                "cpu",
                "--ring-bind",
                "127.0.0.1:0",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut phases = std::collections::BTreeSet::new();
    let mut saw_step = false;
    for line in std::iter::once(Ok(first)).chain(lines) {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let phase = v["phase"].as_str().unwrap().to_string();
        saw_step |= phase == "training" && v["step"].as_u64().unwrap_or(0) > 0;
        phases.insert(phase.clone());
        if phase == "done" {
            break;
        }
    }
    // A worker arriving after the end is refused with a clear status.
    let late = rt().block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.clone())
            .await
            .unwrap();
        c.register(pb::RegisterRequest {
            hostname: "late".into(),
            device: "cpu".into(),
            ring_address: "127.0.0.1:1".into(),
            pid: 2,
        })
        .await
        .unwrap_err()
    });
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late}");
    assert!(late.message().contains("no more workers"), "{late}");
    eprintln!("phases seen: {phases:?}");
    for p in ["waiting", "precompute", "training", "done"] {
        assert!(phases.contains(p), "status never showed {p}: {phases:?}");
    }
    assert!(saw_step, "status never showed training progress");
    assert!(worker.wait(Duration::from_secs(30), "worker").success());
    assert!(coord.wait(Duration::from_secs(20), "coordinator").success());
    assert!(job.root.join("status/metrics.jsonl").exists());
}

fn status(url: &str) -> Option<pb::JobStatus> {
    rt().block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.to_string())
            .await
            .ok()?;
        Some(
            c.get_status(pb::GetStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    })
}

fn worker(url: &str) -> Proc {
    Proc(
        Command::new(bin("worker"))
            .args([
                "--coordinator",
                url,
                "--device",
                "cpu",
                "--ring-bind",
                "127.0.0.1:0",
                "--threads",
                "1",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Waits (up to 60 s, polling the status) for a worker in `state` and kills it with SIGKILL; `check` sees every
/// status read meanwhile.
fn kill_first_in_state(
    url: &str,
    workers: &mut [Proc],
    state: pb::WorkerState,
    check: &dyn Fn(&pb::JobStatus),
) {
    let t = Instant::now();
    let victim = loop {
        if let Some(s) = status(url) {
            check(&s);
            if let Some(w) = s.workers.iter().find(|w| w.state() == state) {
                break w.pid;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no worker was ever {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let idx = workers
        .iter()
        .position(|w| w.0.id() == victim)
        .expect("the worker is one of ours");
    kill9(&mut workers[idx]);
}

fn kill9(p: &mut Proc) {
    // SIGKILL: no chance to clean up, as a crashed node.
    unsafe {
        libc::kill(p.0.id() as i32, libc::SIGKILL);
    }
    let _ = p.0.wait();
}

/// Precompute with three workers, one killed with SIGKILL while it holds a shard: its lease returns to
/// the queue, the job finishes, and every shard's cache equals a single-process precompute's.
#[test]
fn precompute_survives_a_killed_worker() {
    let _serial = serial();
    let job = Job::new(96);
    // 2 train shards of 48 pairs + 2 eval shards; the world needs 2 of the 3 workers.
    let cfg = job.config("pre", 2, "");
    let (mut coord, url) = job.coordinator(&cfg, 0);
    let mut workers: Vec<Proc> = (0..3).map(|_| worker(&url)).collect();
    kill_first_in_state(&url, &mut workers, pb::WorkerState::Precomputing, &|_| {});
    let status_code = coord.wait(
        Duration::from_secs(240),
        "the job after a killed precompute worker",
    );
    assert!(status_code.success(), "coordinator: {status_code}");

    // Reference: the same cache computed in one process.
    let single = job.config("pre-single", 1, "");
    let text = std::fs::read_to_string(&single).unwrap().replace(
        &format!("{}/cache", job.root.display()),
        &format!("{}/cache-single", job.root.display()),
    );
    std::fs::write(&single, text).unwrap();
    let one = ddpo::config::Config::load_with_env(&single, &[]).unwrap();
    ddpo::refcache::precompute(&one, tch::Device::Cpu).unwrap();
    let many = ddpo::config::Config::load_with_env(&cfg, &[]).unwrap();
    let (a, b) = (
        ddpo::refcache::RefCache::open_for_device(&many, tch::Device::Cpu).unwrap(),
        ddpo::refcache::RefCache::open_for_device(&one, tch::Device::Cpu).unwrap(),
    );
    let mut shards = ddpo::data::shards::discover(&many.data.train).unwrap();
    shards.extend(ddpo::data::shards::discover(&many.data.eval).unwrap());
    // Ids and rows must be identical; log-probs equal up to float summation order (the workers ran with
    // one thread each, the single process with all cores).
    let mut worst = 0f32;
    for s in &shards {
        let (x, y) = (a.load_shard(s).unwrap(), b.load_shard(s).unwrap());
        assert_eq!(x.len(), y.len(), "{}: row count differs", s.display());
        for (p, q) in x.iter().zip(&y) {
            assert_eq!(
                (p.row, &p.prompt_ids, &p.chosen_ids, &p.rejected_ids),
                (q.row, &q.prompt_ids, &q.chosen_ids, &q.rejected_ids),
                "{} row {}: ids differ",
                s.display(),
                p.row
            );
            for (u, v) in p
                .chosen_logps
                .iter()
                .chain(&p.rejected_logps)
                .zip(q.chosen_logps.iter().chain(&q.rejected_logps))
            {
                worst = worst.max((u - v).abs());
            }
        }
    }
    eprintln!("3-worker (one killed) vs single-process cache: max |Δ logp| {worst:.2e}");
    assert!(worst < 1e-4, "cached log-probs differ by {worst}");
}

/// Training with two workers, one killed mid-epoch and a replacement started: the world re-forms, resumes
/// from the last checkpoint and finishes with the model an uninterrupted run gives.
#[test]
fn training_survives_a_killed_worker() {
    let _serial = serial();
    let job = Job::new(128);
    let extra = "";
    let cfg = job.config("kill", 2, extra);
    // 4 pairs a step, 32 steps an epoch, 2 epochs, a checkpoint every 4 steps.
    let text = long_run(&cfg, 4);
    let (mut coord, url) = job.coordinator(&cfg, 0);
    let mut a = worker(&url);
    let mut b = worker(&url);
    let out = job.root.join("kill");
    let t = Instant::now();
    while !out.join("checkpoint-8").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "training never reached step 8"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill9(&mut b);
    let mut c = worker(&url);
    let code = coord.wait(
        Duration::from_secs(300),
        "the job after a killed training worker",
    );
    assert!(code.success(), "coordinator: {code}");
    assert!(a.wait(Duration::from_secs(30), "worker a").success());
    assert!(c
        .wait(Duration::from_secs(30), "replacement worker")
        .success());
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("coordinator-state.json")).unwrap())
            .unwrap();
    assert!(
        saved["generation"].as_u64().unwrap() >= 2,
        "the world never re-formed: {saved}"
    );

    // An uninterrupted run of the same job in one process.
    let single_cfg = job.root.join("kill-single.toml");
    std::fs::write(
        &single_cfg,
        text.replace(
            &format!("{}/kill\"", job.root.display()),
            &format!("{}/kill-single\"", job.root.display()),
        )
        .replace("world_size = 2", "world_size = 1"),
    )
    .unwrap();
    let o = Command::new(bin("ddpo"))
        .args([
            "train",
            "--config",
            single_cfg.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (wd, ws) = (
        weights(&out.join("checkpoint-64")),
        weights(&job.root.join("kill-single/checkpoint-64")),
    );
    let (mut worst, mut total, mut n) = (0f64, 0f64, 0f64);
    for ((na, x), (nb, y)) in wd.iter().zip(&ws) {
        assert_eq!(na, nb);
        let d = (x - y).abs();
        worst = worst.max(d.max().double_value(&[]));
        total += d.sum(tch::Kind::Double).double_value(&[]);
        n += x.numel() as f64;
    }
    eprintln!(
        "killed+resumed 2-rank run vs uninterrupted: max |Δw| {worst:.3e}, mean {:.3e}",
        total / n
    );
    assert!(total / n < 1e-5, "mean weight difference {}", total / n);
    // Metrics cover every step exactly once (the resumed world rewrote what followed its checkpoint).
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=64).collect::<Vec<_>>());
}

/// A generic gRPC client (Python grpcio) sees the standard health service answer SERVING and finds the
/// service through server reflection.
#[test]
fn health_and_reflection_answer_a_generic_client() {
    let _serial = serial();
    let job = Job::new(16);
    let cfg = job.config("probe", 1, "");
    let (_coord, url) = job.coordinator(&cfg, 0);
    let py = crate::common::python();
    let o = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/grpc_probe.py"))
        .arg(url.trim_start_matches("http://"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} (set DDPO_PYTHON to the project venv): {e}"));
    assert!(
        o.status.success(),
        "the grpcio probe failed (is grpcio installed? run scripts/setup.sh):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["health[]"], "SERVING", "{v}");
    assert_eq!(v["health[ddpo.v1.Coordinator]"], "SERVING", "{v}");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        services.contains(&"ddpo.v1.Coordinator") && services.contains(&"grpc.health.v1.Health"),
        "{v}"
    );
    let methods: Vec<&str> = v["coordinator_methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for m in [
        "Register",
        "Heartbeat",
        "NextTask",
        "GetStatus",
        "WatchStatus",
    ] {
        assert!(methods.contains(&m), "reflection lacks {m}: {v}");
    }
}

/// The coordinator is SIGKILLed mid-training and started again on the same address: it recovers the job
/// from its state file and the output folder, the workers re-register, and the job finishes.
#[test]
fn restarted_coordinator_recovers_the_job() {
    let _serial = serial();
    let job = Job::new(128);
    let cfg = job.config("restart", 2, "");
    long_run(&cfg, 4);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start = || {
        Proc(
            Command::new(bin("coordinator"))
                .args([
                    "--config",
                    cfg.to_str().unwrap(),
                    "--listen",
                    &addr,
                    "--linger-secs",
                    "1",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    };
    let mut first = start();
    let url = format!("http://{addr}");
    std::thread::sleep(Duration::from_millis(300));
    let mut a = worker(&url);
    let mut b = worker(&url);
    let out = job.root.join("restart");
    let t = Instant::now();
    while !out.join("checkpoint-8").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "training never reached step 8"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    kill9(&mut first);
    assert!(out.join("coordinator-state.json").exists());
    let mut second = start();
    let code = second.wait(Duration::from_secs(240), "the restarted coordinator");
    assert!(code.success(), "restarted coordinator: {code}");
    assert!(a.wait(Duration::from_secs(30), "worker a").success());
    assert!(b.wait(Duration::from_secs(30), "worker b").success());
    assert!(out.join("checkpoint-64").exists());
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=64).collect::<Vec<_>>());
}

/// SIGTERM on a training worker: every rank stops at the same step boundary with a checkpoint, the
/// signalled worker exits 0, and a replacement lets the job resume from that checkpoint and finish.
#[test]
fn sigterm_stops_a_worker_cleanly_with_a_checkpoint() {
    let _serial = serial();
    let job = Job::new(128);
    let cfg = job.config("term", 2, "");
    long_run(&cfg, 16);
    let (mut coord, url) = job.coordinator(&cfg, 0);
    let mut a = worker(&url);
    let mut b = worker(&url);
    let out = job.root.join("term");
    let t = Instant::now();
    while !out.join("checkpoint-16").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "training never reached step 16"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe {
        libc::kill(b.0.id() as i32, libc::SIGTERM);
    }
    let code = b.wait(Duration::from_secs(60), "the SIGTERMed worker");
    assert!(
        code.success(),
        "a SIGTERMed worker should exit 0, got {code}"
    );
    let steps: Vec<usize> = ddpo::train::checkpoint::list(&out)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let stopped_at = *steps.last().unwrap();
    // The stop checkpoint is the step where the ranks agreed to stop (16 itself if the signal came right
    // after that checkpoint was written).
    assert!(
        (16..64).contains(&stopped_at),
        "no stop checkpoint: {steps:?}"
    );
    let mut c = worker(&url);
    let code = coord.wait(Duration::from_secs(240), "the job after a SIGTERM");
    assert!(code.success(), "coordinator: {code}");
    assert!(a.wait(Duration::from_secs(30), "worker a").success());
    assert!(c
        .wait(Duration::from_secs(30), "replacement worker")
        .success());
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=64).collect::<Vec<_>>());
}

/// A generation job (`[generate] prompts`) with three workers, one killed with SIGKILL while it answers a
/// shard: its lease returns to the queue, the job ends done, and every shard's answers file equals what
/// `ddpo generate` writes for that shard in one process (sampled, K = 2, so the per-prompt seeding is checked
/// too: answers must not depend on which worker ran them).
#[test]
fn generation_survives_a_killed_worker() {
    let _serial = serial();
    let job = Job::new(96);
    let r = job.root.display().to_string();
    let gen = format!(
        "[generate]\nprompts = [\"{r}/data/train-*.parquet\"]\nout_dir = \"{r}/answers\"\nsamples = 2\n\
         temperature = 0.8\nseed = 3\nmax_new_tokens = 24\nbatch_size = 4\n"
    );
    let cfg = job.config("gen", 1, &gen);
    let (mut coord, url) = job.coordinator(&cfg, 0);
    let mut workers: Vec<Proc> = (0..3).map(|_| worker(&url)).collect();
    let only_generating = |s: &pb::JobStatus| {
        let phase = s.phase();
        assert!(
            matches!(phase, pb::Phase::Waiting | pb::Phase::Generating),
            "{s:?}"
        );
    };
    kill_first_in_state(
        &url,
        &mut workers,
        pb::WorkerState::Generating,
        &only_generating,
    );
    let code = coord.wait(
        Duration::from_secs(240),
        "the generation job after a killed worker",
    );
    assert!(code.success(), "coordinator: {code}");
    let many = ddpo::config::Config::load_with_env(&cfg, &[]).unwrap();
    let shards = ddpo::data::shards::discover(&many.generate.prompts).unwrap();
    assert_eq!(shards.len(), 2);
    // The same settings in one process, one thread as the workers ran, shard by shard.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    for s in &shards {
        let single = job.root.join("single.parquet");
        let args = ddpo::generate::GenerateArgs {
            model: many.model.path.clone(),
            data: vec![s.display().to_string()],
            prompts: None,
            out: single.clone(),
            samples: 2,
            temperature: 0.8,
            top_p: 1.0,
            top_k: 0,
            seed: 3,
            pad_to_square: many.data.pad_to_square,
            decode: ddpo::generate::DecodeArgs {
                max_new_tokens: 24,
                batch_size: 4,
                device: "cpu".into(),
                dtype: ddpo::config::Dtype::Fp32,
                template: many.data.template.clone(),
            },
        };
        ddpo::generate::run_generate_command(&args).unwrap();
        let want = ddpo::generate::read_answers(&single).unwrap();
        let got = ddpo::generate::read_answers(&ddpo::generate::answers_file(&many, s)).unwrap();
        assert_eq!(got.len(), 96, "{}", s.display());
        assert_eq!(got, want, "{}: distributed answers differ", s.display());
    }
    tch::set_num_threads(threads);
    // The killed worker's partial file was removed when its shard was answered again.
    let left: Vec<_> = std::fs::read_dir(&many.generate.out_dir)
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// The pid of the first worker the status shows in `state` (waiting up to 60 s).
fn pid_in_state(url: &str, state: pb::WorkerState) -> u32 {
    let t = Instant::now();
    loop {
        if let Some(w) =
            status(url).and_then(|s| s.workers.into_iter().find(|w| w.state() == state))
        {
            return w.pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no worker was ever {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `coordinator --local-workers 2`: a local worker killed with SIGKILL mid-training is started again and the
/// job finishes with no manual step; then, on a second job, SIGTERM to the coordinator ends it and its
/// workers within 5 s.
#[test]
fn local_workers_are_restarted_and_sigterm_ends_the_coordinator_quickly() {
    let _serial = serial();
    let job = Job::new(96);
    let cfg = job.config("local", 2, "");
    let (mut coord, url) = job.coordinator(&cfg, 2);
    let victim = pid_in_state(&url, pb::WorkerState::Training);
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let code = coord.wait(
        Duration::from_secs(240),
        "the job after a killed local worker",
    );
    assert!(code.success(), "coordinator: {code}");

    // A long job, stopped by SIGTERM while it trains.
    let long = job.config("local-term", 2, "");
    std::fs::write(&long, long_run(&long, 4)).unwrap();
    let (mut coord, url) = job.coordinator(&long, 2);
    pid_in_state(&url, pb::WorkerState::Training);
    let pids: Vec<u32> = status(&url)
        .unwrap()
        .workers
        .iter()
        .map(|w| w.pid)
        .collect();
    let t = Instant::now();
    unsafe {
        libc::kill(coord.0.id() as i32, libc::SIGTERM);
    }
    coord.wait(Duration::from_secs(5), "the coordinator after SIGTERM");
    eprintln!("coordinator exited {:?} after SIGTERM", t.elapsed());
    // Its workers are gone too (reaped by the coordinator: signal 0 finds no such process).
    for pid in pids {
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
        assert!(!alive, "local worker {pid} outlived its coordinator");
    }
}
