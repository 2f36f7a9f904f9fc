//! The worker: registers with the coordinator, checks it sees the same model, then does what it is told —
//! precompute a leased shard, or train as one rank of a world — heartbeating all along.
//!
//! Invariants:
//! - Model work runs on a blocking thread; the async side only talks to the coordinator, so heartbeats keep
//!   flowing during long steps.
//! - A lost coordinator is retried with back-off (the job state lives in the coordinator's state file and
//!   the output folder, so a restarted coordinator picks up); an unknown-worker answer means "register again".
//! - A training run that fails (a peer died, a collective timed out) is reported and the worker asks for its
//!   next task: the coordinator re-forms the world and training resumes from the last checkpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;

use crate::collective::{Collective, LocalCollective, RingCollective};
use crate::config::Config;
use crate::model::llava::Llava;
use crate::rpc::pb;
use crate::rpc::pb::coordinator_client::CoordinatorClient;
use crate::train::{TrainHooks, TrainOptions};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator {url}: {reason}")]
    Coordinator { url: String, reason: String },
    #[error("refused by the coordinator: {0}")]
    Refused(String),
    #[error("{0}")]
    Setup(String),
    #[error("the job failed: {0}")]
    JobFailed(String),
}

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub device: tch::Device,
    /// Address to bind the CPU-ring listener on (port 0 picks one); its IP is what peers connect to.
    pub ring_bind: SocketAddr,
    /// How long to keep retrying an unreachable coordinator before giving up.
    pub give_up_after: Duration,
}

/// Shared between the heartbeat task and the work thread.
#[derive(Default)]
struct Shared {
    worker_id: Mutex<String>,
    generation: AtomicU64,
    step: AtomicU64,
    state: Mutex<String>,
    metrics: Mutex<Vec<(String, f64)>>,
    abort: AtomicBool,
    terminate: AtomicBool,
}

fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

async fn connect(url: &str, give_up: Duration) -> Result<CoordinatorClient<Channel>, WorkerError> {
    let start = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match CoordinatorClient::connect(url.to_string()).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() < give_up => {
                tracing::warn!("coordinator {url} unreachable ({e}); retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(WorkerError::Coordinator {
                    url: url.into(),
                    reason: format!("unreachable for {give_up:?}: {e}"),
                })
            }
        }
    }
}

/// Hooks that feed heartbeats and honour aborts/termination.
struct Hooks {
    shared: Arc<Shared>,
}

impl TrainHooks for Hooks {
    fn on_step(&mut self, step: usize, total: usize, metrics: &[(String, f64)]) {
        self.shared.step.store(step as u64, Ordering::Relaxed);
        let mut m = self
            .shared
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.retain(|(k, _)| !metrics.iter().any(|(n, _)| n == k));
        m.extend(metrics.iter().cloned());
        m.retain(|(k, _)| k != "total_steps");
        m.push(("total_steps".into(), total as f64));
    }

    fn should_stop(&mut self) -> bool {
        self.shared.terminate.load(Ordering::Relaxed)
    }
}

/// Runs the worker until the coordinator says to exit. Returns the job's success.
pub async fn run(opts: WorkerOptions) -> Result<bool, WorkerError> {
    let url = opts.coordinator.clone();
    let shared = Arc::new(Shared::default());
    {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return,
                };
            term.recv().await;
            tracing::info!("SIGTERM: finishing the current step, then checkpointing and exiting");
            s.terminate.store(true, Ordering::Relaxed);
        });
    }
    let mut client = connect(&url, opts.give_up_after).await?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());

    // Register and load the job.
    let mut listener = RingCollective::listen(opts.ring_bind)
        .map_err(|e| WorkerError::Setup(format!("ring listener on {}: {e}", opts.ring_bind)))?;
    let (reg, cfg) = register(&mut client, &hostname, &opts, &listener).await?;
    *shared.worker_id.lock().unwrap_or_else(|p| p.into_inner()) = reg.worker_id.clone();
    let mut id = reg.worker_id.clone();
    tracing::info!(worker = %id, job = %reg.job_id, "registered");

    // Heartbeats.
    let hb = {
        let s = shared.clone();
        let mut c = client.clone();
        let every = Duration::from_secs(u64::from(reg.heartbeat_secs.max(1)));
        tokio::spawn(async move {
            loop {
                let req = pb::HeartbeatRequest {
                    worker_id: s
                        .worker_id
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    generation: s.generation.load(Ordering::Relaxed),
                    state: s.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    step: s.step.load(Ordering::Relaxed),
                    metrics: s
                        .metrics
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .cloned()
                        .collect(),
                    errors: vec![],
                };
                match c.heartbeat(req).await {
                    Ok(r) => {
                        if r.into_inner().abort {
                            s.abort.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => tracing::warn!("heartbeat failed: {}", e.message()),
                }
                tokio::time::sleep(every).await;
            }
        })
    };

    let mut reference: Option<(tch::nn::VarStore, Llava)> = None;
    let result = loop {
        let set_state =
            |st: &str| *shared.state.lock().unwrap_or_else(|p| p.into_inner()) = st.into();
        let task = client
            .next_task(pb::NextTaskRequest {
                worker_id: id.clone(),
                ring_address: listener.local_addr().to_string(),
            })
            .await;
        let task = match task {
            Ok(t) => t.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                tracing::warn!("coordinator unavailable ({}); retrying", s.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
                client = connect(&url, opts.give_up_after).await?;
                continue;
            }
            Err(s) if s.code() == Code::NotFound => {
                // A restarted coordinator (or one that declared us dead) does not know this id: join again.
                tracing::warn!(
                    "coordinator does not know worker {id} ({}); registering again",
                    s.message()
                );
                let (reg, _) = register(&mut client, &hostname, &opts, &listener).await?;
                id = reg.worker_id.clone();
                *shared.worker_id.lock().unwrap_or_else(|p| p.into_inner()) = id.clone();
                continue;
            }
            Err(s) => break Err(WorkerError::Refused(s.message().to_string())),
        };
        match task.kind {
            None => break Err(WorkerError::Refused("empty task".into())),
            Some(pb::task::Kind::Wait(w)) => {
                set_state("waiting");
                tracing::debug!("waiting: {}", w.reason);
                tokio::time::sleep(Duration::from_millis(u64::from(w.millis.max(50)))).await;
            }
            Some(pb::task::Kind::Exit(e)) => {
                tracing::info!("exit: {}", e.reason);
                break if e.success {
                    Ok(true)
                } else {
                    Err(WorkerError::JobFailed(e.reason))
                };
            }
            Some(pb::task::Kind::Precompute(p)) => {
                set_state("precomputing");
                let shard = PathBuf::from(&p.shard_path);
                let cfg2 = cfg.clone();
                let device = opts.device;
                let mut model = reference.take();
                let (model_back, outcome) = tokio::task::spawn_blocking(move || {
                    let r = precompute_shard(&cfg2, &shard, device, &mut model);
                    (model, r)
                })
                .await
                .map_err(|e| WorkerError::Setup(format!("precompute thread: {e}")))?;
                reference = model_back;
                let (written, skipped, error) = match outcome {
                    Ok((w, s)) => (w, s, String::new()),
                    Err(e) => (0, 0, e),
                };
                if let Err(s) = client
                    .complete_shard(pb::CompleteShardRequest {
                        worker_id: id.clone(),
                        shard_path: p.shard_path.clone(),
                        rows_written: written,
                        rows_skipped: skipped,
                        error,
                    })
                    .await
                {
                    tracing::warn!("shard {} not accepted: {}", p.shard_path, s.message());
                }
                set_state("idle");
            }
            Some(pb::task::Kind::Train(t)) => {
                reference = None; // free the reference model: training reads the cache
                set_state("training");
                shared.generation.store(t.generation, Ordering::Relaxed);
                shared.abort.store(false, Ordering::Relaxed);
                let peers: Result<Vec<SocketAddr>, _> =
                    t.ring_peers.iter().map(|p| p.parse()).collect();
                let peers =
                    peers.map_err(|e| WorkerError::Setup(format!("bad ring peer address: {e}")))?;
                let cfg2 = cfg.clone();
                let opts2 = TrainOptions {
                    device: opts.device,
                    max_steps: None,
                    progress_bar: false,
                };
                let timeout = Duration::from_secs(cfg.cluster.collective_timeout_secs);
                let hooks_shared = shared.clone();
                let (rank, generation, t_world) =
                    (t.rank as usize, t.generation, t.world_size as usize);
                let backend = t.backend.clone();
                // NCCL: rank 0 creates the communicator id and publishes it; the others wait for it.
                let mut nccl_id = t.nccl_id.clone();
                if backend == "nccl" && nccl_id.is_empty() {
                    if rank == 0 {
                        let created = crate::collective::nccl::NcclCollective::unique_id()
                            .map_err(|e| WorkerError::Setup(format!("NCCL: {e}")))?;
                        client
                            .publish_nccl_id(pb::PublishNcclIdRequest {
                                worker_id: id.clone(),
                                generation: t.generation,
                                nccl_id: created.to_vec(),
                            })
                            .await
                            .map_err(|s| WorkerError::Refused(s.message().to_string()))?;
                        nccl_id = created.to_vec();
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                let device_index = match opts.device {
                    tch::Device::Cuda(i) => i,
                    _ => 0,
                };
                // The listener is consumed by the ring; bind a fresh one for any later generation.
                let this_listener = std::mem::replace(
                    &mut listener,
                    RingCollective::listen(opts.ring_bind)
                        .map_err(|e| WorkerError::Setup(format!("ring listener: {e}")))?,
                );
                let outcome = tokio::task::spawn_blocking(
                    move || -> Result<crate::train::TrainReport, String> {
                        let mut comm: Box<dyn Collective> = match backend.as_str() {
                            "local" => Box::new(LocalCollective),
                            "ring" => Box::new(
                                // The heartbeat sets `abort` when the coordinator dissolves this world
                                // (a member left before joining): stop waiting for it then.
                                RingCollective::connect_or_abort(
                                    this_listener,
                                    rank,
                                    &peers,
                                    generation,
                                    timeout,
                                    &hooks_shared.abort,
                                )
                                .map_err(|e| e.to_string())?,
                            ),
                            "nccl" => {
                                let id: [u8; 128] = nccl_id
                                    .as_slice()
                                    .try_into()
                                    .map_err(|_| format!("NCCL id of {} bytes", nccl_id.len()))?;
                                // NCCL's communicator is not Send: created and used on this thread only.
                                Box::new(
                                    crate::collective::nccl::NcclCollective::with_timeout(
                                        rank,
                                        t_world,
                                        id,
                                        device_index,
                                        timeout,
                                    )
                                    .map_err(|e| e.to_string())?,
                                )
                            }
                            other => {
                                return Err(format!(
                                    "backend {other:?} is not available in this worker"
                                ))
                            }
                        };
                        let mut hooks = Hooks {
                            shared: hooks_shared,
                        };
                        crate::train::train_distributed(&cfg2, &opts2, comm.as_mut(), &mut hooks)
                            .map_err(|e| e.to_string())
                    },
                )
                .await
                .map_err(|e| WorkerError::Setup(format!("training thread: {e}")))?;
                let (finished, error, step, ckpt) = match &outcome {
                    Ok(r) => (
                        !r.stopped && r.steps == r.total_steps,
                        String::new(),
                        r.steps as u64,
                        r.last_checkpoint
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                    ),
                    Err(e) => (
                        false,
                        e.clone(),
                        shared.step.load(Ordering::Relaxed),
                        String::new(),
                    ),
                };
                if !error.is_empty() {
                    tracing::warn!(generation, "training failed: {error}");
                }
                let _ = client
                    .training_ended(pb::TrainingEndedRequest {
                        worker_id: id.clone(),
                        generation,
                        finished,
                        error,
                        step,
                        last_checkpoint: ckpt,
                    })
                    .await;
                shared.generation.store(0, Ordering::Relaxed);
                set_state("idle");
                // A run stopped by another rank's SIGTERM: ask for the next world.
            }
        }
        if shared.terminate.load(Ordering::Relaxed) {
            // SIGTERM: whatever was running ended cleanly (training with a checkpoint); say we leave, so
            // the coordinator does not count on us for the next world, and exit 0.
            tracing::info!("stopped by SIGTERM");
            let _ = client
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: id.clone(),
                    state: "exited".into(),
                    step: shared.step.load(Ordering::Relaxed),
                    ..Default::default()
                })
                .await;
            break Ok(true);
        }
    };
    hb.abort();
    result
}

/// Registers, loads the job config the coordinator sends, checks this machine sees its files, and reports
/// the model digest (the coordinator refuses a worker that sees a different model).
async fn register(
    client: &mut CoordinatorClient<Channel>,
    hostname: &str,
    opts: &WorkerOptions,
    listener: &crate::collective::ring::RingListener,
) -> Result<(pb::RegisterResponse, Config), WorkerError> {
    let reg = client
        .register(pb::RegisterRequest {
            hostname: hostname.to_string(),
            device: device_name(opts.device),
            ring_address: listener.local_addr().to_string(),
            pid: std::process::id(),
        })
        .await
        .map_err(|s| WorkerError::Refused(s.message().to_string()))?
        .into_inner();
    let cfg = Config::from_toml_str(&reg.config_toml, std::path::Path::new("<coordinator>"), &[])
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    let problems = cfg.check_files();
    if !problems.is_empty() {
        return Err(WorkerError::Setup(format!(
            "this machine cannot see the job's files: {}",
            problems.join("; ")
        )));
    }
    client
        .ready(pb::ReadyRequest {
            worker_id: reg.worker_id.clone(),
            model_digest: crate::coordinator::state::model_digest(&cfg),
        })
        .await
        .map_err(|s| WorkerError::Refused(s.message().to_string()))?;
    Ok((reg, cfg))
}

/// Computes one shard's cache file (unless it is already valid), loading the reference model on first use.
fn precompute_shard(
    cfg: &Config,
    shard: &std::path::Path,
    device: tch::Device,
    model: &mut Option<(tch::nn::VarStore, Llava)>,
) -> Result<(u64, u64), String> {
    let cache =
        crate::refcache::RefCache::open_for_device(cfg, device).map_err(|e| e.to_string())?;
    if cache
        .missing_shards(&[shard.to_owned()])
        .map_err(|e| e.to_string())?
        .is_empty()
    {
        return Ok((0, 0));
    }
    if model.is_none() {
        let kind = crate::refcache::reference_kind(cfg, device);
        *model = Some(Llava::load(cfg.reference_path(), device, kind)?);
    }
    let (_, m) = model.as_ref().expect("loaded");
    let pre = crate::data::pipeline::Preprocessor::from_model_dir(
        cfg.reference_path(),
        &cfg.data.template,
        cfg.data.max_length,
        cfg.data.pad_to_square,
        cfg.ddpo.min_match,
    )
    .map_err(|e| e.to_string())?;
    let r = cache
        .compute_shard(
            m,
            &pre,
            shard,
            &crate::refcache::ComputeOptions::from_config(cfg, device),
        )
        .map_err(|e| e.to_string())?;
    Ok((r.rows_written, r.rows_skipped))
}
