//! A `Train` task: join the world (the NCCL id exchange, or the CPU ring), train as one rank on a blocking
//! thread, and report how the run ended with `TrainingEnded`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::heartbeat::{Hooks, Shared};
use super::session::Session;
use super::WorkerError;
use crate::collective::ring::RingListener;
use crate::collective::{
    Collective, CollectiveError, LocalCollective, NcclCollective, RingCollective,
};
use crate::rpc::pb;
use crate::train::{TrainError, TrainOptions, TrainReport};

/// What the training thread needs to join its world.
struct Membership {
    backend: pb::Backend,
    rank: usize,
    world: usize,
    generation: u64,
    peers: Vec<SocketAddr>,
    nccl_id: Vec<u8>,
    device_index: usize,
    timeout: Duration,
}

/// Returns `Ok(false)` when the task must be asked for again (a non-zero NCCL rank before rank 0 published
/// the communicator id).
pub(super) async fn handle(s: &mut Session, t: pb::Train) -> Result<bool, WorkerError> {
    s.reference = None; // free the reference model: training reads the cache
    s.shared.set_state(pb::WorkerState::Training);
    s.shared.generation.store(t.generation, Ordering::Relaxed);
    s.shared.abort.store(false, Ordering::Relaxed);
    let Some(nccl_id) = nccl_id(s, &t).await? else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Ok(false);
    };
    let peers = t
        .ring_peers
        .iter()
        .map(|p| p.parse())
        .collect::<Result<Vec<SocketAddr>, _>>()
        .map_err(|e| WorkerError::Setup(format!("bad ring peer address: {e}")))?;
    let member = Membership {
        backend: t.backend(),
        rank: t.rank as usize,
        world: t.world_size as usize,
        generation: t.generation,
        peers,
        nccl_id,
        device_index: match s.opts.device {
            tch::Device::Cuda(i) => i,
            _ => 0,
        },
        timeout: Duration::from_secs(s.cfg.cluster.collective_timeout_secs),
    };
    // The listener is consumed by the ring; bind a fresh one for any later generation.
    let fresh = RingCollective::listen(s.opts.ring_bind)
        .map_err(|e| WorkerError::Setup(format!("ring listener: {e}")))?;
    let listener = std::mem::replace(&mut s.listener, fresh);
    let (cfg, shared) = (s.cfg.clone(), s.shared.clone());
    let opts = TrainOptions {
        device: s.opts.device,
        max_steps: None,
        progress_bar: false,
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let mut comm = join(&member, listener, &shared.abort)?;
        let mut hooks = Hooks { shared };
        crate::train::train_distributed(&cfg, &opts, comm.as_mut(), &mut hooks)
    })
    .await
    .map_err(|e| WorkerError::Setup(format!("training thread: {e}")))?;
    report(s, t.generation, outcome).await;
    // A run stopped by another rank's SIGTERM: the caller asks for the next world.
    Ok(true)
}

/// NCCL: rank 0 creates the communicator id and publishes it; the others wait for it (`None`: not yet).
async fn nccl_id(s: &mut Session, t: &pb::Train) -> Result<Option<Vec<u8>>, WorkerError> {
    if t.backend() != pb::Backend::Nccl || !t.nccl_id.is_empty() {
        return Ok(Some(t.nccl_id.clone()));
    }
    if t.rank != 0 {
        return Ok(None);
    }
    let created =
        NcclCollective::unique_id().map_err(|e| WorkerError::Setup(format!("NCCL: {e}")))?;
    let req = pb::PublishNcclIdRequest {
        worker_id: s.id.clone(),
        generation: t.generation,
        nccl_id: created.to_vec(),
    };
    s.client
        .publish_nccl_id(req)
        .await
        .map_err(|st| WorkerError::Refused(st.message().to_string()))?;
    Ok(Some(created.to_vec()))
}

/// The world's collective on this (blocking) thread. The heartbeat sets `abort` when the coordinator dissolves
/// the world (a member left before joining): a ring stops waiting for it then.
fn join(
    m: &Membership,
    listener: RingListener,
    abort: &AtomicBool,
) -> Result<Box<dyn Collective>, CollectiveError> {
    Ok(match m.backend {
        pb::Backend::Local => Box::new(LocalCollective),
        pb::Backend::Ring => Box::new(RingCollective::connect_or_abort(
            listener,
            m.rank,
            &m.peers,
            m.generation,
            m.timeout,
            abort,
        )?),
        pb::Backend::Nccl => {
            let id: [u8; 128] = m.nccl_id.as_slice().try_into().map_err(|_| {
                CollectiveError::InvalidArgument(format!(
                    "NCCL id of {} bytes (expected 128)",
                    m.nccl_id.len()
                ))
            })?;
            // The communicator is created and used on this thread only.
            Box::new(NcclCollective::with_timeout(
                m.rank,
                m.world,
                id,
                m.device_index,
                m.timeout,
            )?)
        }
        pb::Backend::Unspecified => {
            return Err(CollectiveError::InvalidArgument(
                "the coordinator named no backend".into(),
            ))
        }
    })
}

/// `TrainingEnded`: finished or not, the error, the step reached and the last checkpoint.
async fn report(s: &mut Session, generation: u64, outcome: Result<TrainReport, TrainError>) {
    let shared: &Arc<Shared> = &s.shared;
    let req = match &outcome {
        Ok(r) => pb::TrainingEndedRequest {
            worker_id: s.id.clone(),
            generation,
            finished: !r.stopped && r.steps == r.total_steps,
            error: String::new(),
            step: r.steps as u64,
            last_checkpoint: r
                .last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        },
        Err(e) => {
            tracing::warn!(generation, "training failed: {e}");
            pb::TrainingEndedRequest {
                worker_id: s.id.clone(),
                generation,
                finished: false,
                error: e.to_string(),
                step: shared.step.load(Ordering::Relaxed),
                last_checkpoint: String::new(),
            }
        }
    };
    let _ = s.client.training_ended(req).await;
    shared.generation.store(0, Ordering::Relaxed);
    shared.set_state(pb::WorkerState::Idle);
}
