//! The coordinator: owns a job's state and hands out work over gRPC (service `ddpo.v1.Coordinator`).
//!
//! Phases: `waiting` (no worker yet) → `precompute` (every train/eval shard is leased to whichever worker
//! asks; a lease returns to the queue when its worker stops heartbeating) → `training` (when `world_size`
//! ready workers are waiting, they form a world: ranks, ring peers, a new generation) → `done` | `failed`.
//!
//! Invariants:
//! - Every shard is completed exactly once per job; a lease belongs to one live worker at a time.
//! - A world (generation) is broken as soon as one of its members dies or reports an error; its surviving
//!   members are told to abort (heartbeat `abort`), and the next world resumes from the last complete
//!   checkpoint (training always resumes from `train.output_dir`).
//! - Requests from unknown workers, from workers of an older generation, or for a finished job are refused
//!   with a gRPC status that says why; they never change the job.

pub mod local;
mod service;
pub mod state;
pub mod types;

pub use service::Service;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::rpc::pb;
use state::Job;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Job(#[from] types::JobSetupError),
}

/// Serves the job on `listener` until the job is over (and a grace period for workers to collect their
/// `Exit`) or `shutdown` resolves. Returns whether the job succeeded.
pub async fn serve(
    cfg: Config,
    config_toml: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    linger: Duration,
) -> Result<bool, CoordinatorError> {
    let job = Arc::new(Mutex::new(Job::new(cfg, config_toml)?));
    let service = Service::new(job.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::coordinator_server::CoordinatorServer<Service>>()
        .await;
    // Reflection in both protocol versions: grpcurl speaks v1, many clients (grpcio) still v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| CoordinatorError::Setup(format!("reflection: {e}")))?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| CoordinatorError::Setup(format!("reflection: {e}")))?;

    // Liveness sweep: expire leases and break worlds of workers that stopped heartbeating.
    let sweeper = {
        let job = job.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                job.lock().unwrap_or_else(|p| p.into_inner()).sweep();
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Ends the server when the job is over (after workers had time to fetch their Exit) or on shutdown.
    let ender = {
        let job = job.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        let over = job.lock().unwrap_or_else(|p| p.into_inner()).finished_and_drained(linger);
                        if over { break; }
                    }
                }
            }
            let _ = stop_tx.send(());
        })
    };
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Listen {
            addr: "?".into(),
            source: e,
        })?;
    tracing::info!(%addr, "coordinator listening");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(pb::coordinator_server::CoordinatorServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        })
        .await?;
    sweeper.abort();
    ender.abort();
    let j = job.lock().unwrap_or_else(|p| p.into_inner());
    j.save_state();
    Ok(j.succeeded())
}
