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

//!
//! Code map (mini-redis style, one file per task kind): `session` (connection, registration, next task),
//! `heartbeat` (shared state, heartbeats, SIGTERM, training hooks), `precompute`, `generate` and `train` (the
//! tasks).

mod generate;
mod heartbeat;
mod precompute;
mod session;
mod train;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::rpc::pb;
use heartbeat::Shared;
use session::Session;

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

/// Runs the worker until the coordinator says to exit. Returns the job's success.
pub async fn run(opts: WorkerOptions) -> Result<bool, WorkerError> {
    let shared = Arc::new(Shared::default());
    heartbeat::on_sigterm(shared.clone());
    let mut s = Session::start(opts, shared.clone()).await?;
    let hb = heartbeat::spawn(shared.clone(), s.client.clone(), s.heartbeat_every);
    let result = loop {
        if let Some(done) = next(&mut s).await.transpose() {
            break done;
        }
        if shared.terminate.load(Ordering::Relaxed) {
            // SIGTERM: whatever was running ended cleanly (training with a checkpoint); say we leave, so
            // the coordinator does not count on us for the next world, and exit 0.
            tracing::info!("stopped by SIGTERM");
            s.say_exited().await;
            break Ok(true);
        }
    };
    hb.abort();
    result
}

/// Asks for and does one task; `Some` when the job is over for this worker (`Exit`, or a refusal).
async fn next(s: &mut Session) -> Result<Option<bool>, WorkerError> {
    let Some(kind) = s.next_task().await? else {
        return Ok(None);
    };
    match kind {
        pb::task::Kind::Wait(w) => {
            s.shared.set_state(pb::WorkerState::Waiting);
            tracing::debug!("waiting: {}", w.reason);
            tokio::time::sleep(Duration::from_millis(u64::from(w.millis.max(50)))).await;
        }
        pb::task::Kind::Exit(e) => {
            tracing::info!("exit: {}", e.reason);
            return match e.success {
                true => Ok(Some(true)),
                false => Err(WorkerError::JobFailed(e.reason)),
            };
        }
        pb::task::Kind::Precompute(p) => precompute::handle(s, p).await?,
        pb::task::Kind::Generate(g) => generate::handle(s, g).await?,
        pb::task::Kind::Train(t) => {
            train::handle(s, t).await?;
        }
    }
    Ok(None)
}
