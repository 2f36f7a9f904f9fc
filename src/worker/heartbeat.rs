//! What the work thread and the heartbeat task share, the heartbeat loop itself, SIGTERM, and the training hooks
//! that feed heartbeats and honour a stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;

use crate::rpc::pb;
use crate::rpc::pb::coordinator_client::CoordinatorClient;
use crate::train::TrainHooks;

/// Shared between the heartbeat task and the work thread.
#[derive(Default)]
pub(super) struct Shared {
    pub worker_id: Mutex<String>,
    pub generation: AtomicU64,
    pub step: AtomicU64,
    pub state: Mutex<pb::WorkerState>,
    pub metrics: Mutex<Vec<(String, f64)>>,
    /// Set by a heartbeat answer: the coordinator dissolved this worker's world.
    pub abort: AtomicBool,
    /// Set on SIGTERM: finish the current step, checkpoint, leave.
    pub terminate: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn set_state(&self, state: pb::WorkerState) {
        *lock(&self.state) = state;
    }

    pub fn set_worker_id(&self, id: &str) {
        *lock(&self.worker_id) = id.into();
    }

    /// The heartbeat this worker sends now.
    fn heartbeat(&self) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            worker_id: lock(&self.worker_id).clone(),
            generation: self.generation.load(Ordering::Relaxed),
            state: *lock(&self.state) as i32,
            step: self.step.load(Ordering::Relaxed),
            metrics: lock(&self.metrics).iter().cloned().collect(),
            errors: vec![],
        }
    }
}

/// Heartbeats every `every` until aborted; an answer that says abort sets [`Shared::abort`].
pub(super) fn spawn(
    shared: Arc<Shared>,
    mut client: CoordinatorClient<Channel>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match client.heartbeat(shared.heartbeat()).await {
                Ok(r) => {
                    if r.into_inner().abort {
                        shared.abort.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!("heartbeat failed: {}", e.message()),
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// SIGTERM sets [`Shared::terminate`]: the current step finishes, training checkpoints, the worker leaves.
pub(super) fn on_sigterm(shared: Arc<Shared>) {
    tokio::spawn(async move {
        let kind = tokio::signal::unix::SignalKind::terminate();
        let Ok(mut term) = tokio::signal::unix::signal(kind) else {
            return;
        };
        term.recv().await;
        tracing::info!("SIGTERM: finishing the current step, then checkpointing and exiting");
        shared.terminate.store(true, Ordering::Relaxed);
    });
}

/// Hooks that feed heartbeats and honour termination.
pub(super) struct Hooks {
    pub shared: Arc<Shared>,
}

impl TrainHooks for Hooks {
    fn on_step(&mut self, step: usize, total: usize, metrics: &[(String, f64)]) {
        self.shared.step.store(step as u64, Ordering::Relaxed);
        let mut m = lock(&self.shared.metrics);
        m.retain(|(k, _)| !metrics.iter().any(|(n, _)| n == k));
        m.extend(metrics.iter().cloned());
        m.retain(|(k, _)| k != "total_steps");
        m.push(("total_steps".into(), total as f64));
    }

    fn should_stop(&mut self) -> bool {
        self.shared.terminate.load(Ordering::Relaxed)
    }
}
