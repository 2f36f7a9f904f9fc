//! A worker's connection to its job: the coordinator client (reconnected with back-off), registration and the
//! model check, the CPU-ring listener it advertises, and the next task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Code;

use super::heartbeat::Shared;
use super::precompute::Reference;
use super::{WorkerError, WorkerOptions};
use crate::collective::ring::RingListener;
use crate::collective::RingCollective;
use crate::config::Config;
use crate::rpc::pb;
use crate::rpc::pb::coordinator_client::CoordinatorClient;

pub(super) struct Session {
    pub opts: WorkerOptions,
    pub client: CoordinatorClient<Channel>,
    pub shared: Arc<Shared>,
    pub hostname: String,
    /// This worker's id at the coordinator (changes when it registers again).
    pub id: String,
    pub cfg: Config,
    /// The CPU-ring listener peers connect to; a training world consumes it and a fresh one is bound.
    pub listener: RingListener,
    pub reference: Reference,
    /// The job's model in a generation job, kept loaded between prompt shards.
    pub generator: Reference,
    pub heartbeat_every: Duration,
}

impl Session {
    /// Reports a leased shard's outcome (rows written and skipped, or the error) with `CompleteShard`, and
    /// becomes idle. A refusal (the lease expired) is logged: the coordinator has given the shard to another.
    pub async fn complete_shard(
        &mut self,
        shard_path: &str,
        outcome: Result<(u64, u64), impl std::fmt::Display>,
    ) {
        let (rows_written, rows_skipped, error) = match outcome {
            Ok((w, k)) => (w, k, String::new()),
            Err(e) => (0, 0, e.to_string()),
        };
        let req = pb::CompleteShardRequest {
            worker_id: self.id.clone(),
            shard_path: shard_path.to_owned(),
            rows_written,
            rows_skipped,
            error,
        };
        if let Err(st) = self.client.complete_shard(req).await {
            tracing::warn!("shard {shard_path} not accepted: {}", st.message());
        }
        self.shared.set_state(pb::WorkerState::Idle);
    }

    /// Connects (retrying an unreachable coordinator), binds the ring listener and registers.
    pub async fn start(opts: WorkerOptions, shared: Arc<Shared>) -> Result<Self, WorkerError> {
        let mut client = connect(&opts.coordinator, opts.give_up_after).await?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let listener = RingCollective::listen(opts.ring_bind)
            .map_err(|e| WorkerError::Setup(format!("ring listener on {}: {e}", opts.ring_bind)))?;
        let (reg, cfg) = register(&mut client, &hostname, &opts, &listener).await?;
        shared.set_worker_id(&reg.worker_id);
        tracing::info!(worker = %reg.worker_id, job = %reg.job_id, "registered");
        Ok(Self {
            opts,
            client,
            shared,
            hostname,
            id: reg.worker_id,
            cfg,
            listener,
            reference: None,
            generator: None,
            heartbeat_every: Duration::from_secs(u64::from(reg.heartbeat_secs.max(1))),
        })
    }

    /// The next task, or `None` after recovering from a lost coordinator or a forgotten registration (ask
    /// again then).
    pub async fn next_task(&mut self) -> Result<Option<pb::task::Kind>, WorkerError> {
        let req = pb::NextTaskRequest {
            worker_id: self.id.clone(),
            ring_address: self.listener.local_addr().to_string(),
        };
        match self.client.next_task(req).await {
            Ok(t) => t
                .into_inner()
                .kind
                .map(Some)
                .ok_or_else(|| WorkerError::Refused("empty task".into())),
            Err(s) if s.code() == Code::Unavailable => {
                tracing::warn!("coordinator unavailable ({}); retrying", s.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.client = connect(&self.opts.coordinator, self.opts.give_up_after).await?;
                Ok(None)
            }
            Err(s) if s.code() == Code::NotFound => {
                // A restarted coordinator (or one that declared us dead) does not know this id: join again.
                tracing::warn!(
                    "coordinator does not know worker {} ({}); registering again",
                    self.id,
                    s.message()
                );
                let (reg, _) =
                    register(&mut self.client, &self.hostname, &self.opts, &self.listener).await?;
                self.id = reg.worker_id;
                self.shared.set_worker_id(&self.id);
                Ok(None)
            }
            Err(s) => Err(WorkerError::Refused(s.message().to_string())),
        }
    }

    /// Tells the coordinator this worker leaves (SIGTERM), so the next world does not count on it.
    pub async fn say_exited(&mut self) {
        let req = pb::HeartbeatRequest {
            worker_id: self.id.clone(),
            state: pb::WorkerState::Exited as i32,
            step: self.shared.step.load(std::sync::atomic::Ordering::Relaxed),
            ..Default::default()
        };
        let _ = self.client.heartbeat(req).await;
    }
}

fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

async fn connect(url: &str, give_up: Duration) -> Result<CoordinatorClient<Channel>, WorkerError> {
    let start = Instant::now();
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

/// Registers, loads the job config the coordinator sends, checks this machine sees its files, and reports
/// the model digest (the coordinator refuses a worker that sees a different model).
async fn register(
    client: &mut CoordinatorClient<Channel>,
    hostname: &str,
    opts: &WorkerOptions,
    listener: &RingListener,
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
    let problems = crate::data::check_files(&cfg);
    if !problems.is_empty() {
        return Err(WorkerError::Setup(format!(
            "this machine cannot see the job's files: {}",
            problems.join("; ")
        )));
    }
    client
        .ready(pb::ReadyRequest {
            worker_id: reg.worker_id.clone(),
            model_digest: cfg.model_digest(),
        })
        .await
        .map_err(|s| WorkerError::Refused(s.message().to_string()))?;
    Ok((reg, cfg))
}
