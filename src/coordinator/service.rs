//! The gRPC service over the shared job state: the one place where wire types (`rpc::pb`) meet the state
//! machine's own types (`types`), converted both ways, and `JobError` becomes a gRPC status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::state::{Job, Phase};
use super::types::{
    Beat, JobError, JobStatus, Registration, ShardDone, Task, TrainingEnd, WorkerState,
    WorldBackend,
};
use crate::rpc::pb;

#[derive(Clone)]
pub struct Service {
    job: Arc<Mutex<Job>>,
}

impl Service {
    pub fn new(job: Arc<Mutex<Job>>) -> Self {
        Self { job }
    }

    fn job(&self) -> std::sync::MutexGuard<'_, Job> {
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let joined = self.job().register(Registration {
            hostname: r.hostname,
            device: r.device,
            ring_address: r.ring_address,
            pid: r.pid,
        })?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: joined.worker_id,
            job_id: joined.job_id,
            config_toml: joined.config_toml,
            heartbeat_secs: joined.heartbeat_secs,
        }))
    }

    async fn ready(
        &self,
        req: Request<pb::ReadyRequest>,
    ) -> Result<Response<pb::ReadyResponse>, Status> {
        let r = req.into_inner();
        self.job().ready(&r.worker_id, &r.model_digest)?;
        Ok(Response::new(pb::ReadyResponse {}))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let state = worker_state(r.state())?;
        let reply = self.job().heartbeat(Beat {
            worker_id: r.worker_id,
            state,
            step: r.step,
            metrics: r.metrics.into_iter().collect::<BTreeMap<_, _>>(),
            errors: r.errors,
        })?;
        Ok(Response::new(pb::HeartbeatResponse {
            generation: reply.generation,
            abort: reply.abort,
        }))
    }

    async fn next_task(
        &self,
        req: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let r = req.into_inner();
        let task = self.job().next_task(&r.worker_id, &r.ring_address)?;
        Ok(Response::new(wire_task(task)))
    }

    async fn complete_shard(
        &self,
        req: Request<pb::CompleteShardRequest>,
    ) -> Result<Response<pb::CompleteShardResponse>, Status> {
        let r = req.into_inner();
        self.job().complete_shard(ShardDone {
            worker_id: r.worker_id,
            shard: PathBuf::from(r.shard_path),
            rows_written: r.rows_written,
            rows_skipped: r.rows_skipped,
            error: (!r.error.is_empty()).then_some(r.error),
        })?;
        Ok(Response::new(pb::CompleteShardResponse {}))
    }

    async fn publish_nccl_id(
        &self,
        req: Request<pb::PublishNcclIdRequest>,
    ) -> Result<Response<pb::PublishNcclIdResponse>, Status> {
        let r = req.into_inner();
        self.job()
            .publish_nccl_id(&r.worker_id, r.generation, r.nccl_id)?;
        Ok(Response::new(pb::PublishNcclIdResponse {}))
    }

    async fn training_ended(
        &self,
        req: Request<pb::TrainingEndedRequest>,
    ) -> Result<Response<pb::TrainingEndedResponse>, Status> {
        let r = req.into_inner();
        self.job().training_ended(TrainingEnd {
            worker_id: r.worker_id,
            generation: r.generation,
            finished: r.finished,
            error: (!r.error.is_empty()).then_some(r.error),
            step: r.step,
            last_checkpoint: (!r.last_checkpoint.is_empty()).then_some(r.last_checkpoint),
        })?;
        Ok(Response::new(pb::TrainingEndedResponse {}))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(wire_status(self.job().status())))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        req: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let every =
            Duration::from_millis(u64::from(req.into_inner().interval_millis).clamp(100, 60_000));
        let job = self.job.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (status, over) = {
                    let j = job.lock().unwrap_or_else(|p| p.into_inner());
                    (wire_status(j.status()), j.is_over())
                };
                if tx.send(Ok(status)).await.is_err() || over {
                    break;
                }
                tokio::time::sleep(every).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl From<JobError> for Status {
    fn from(e: JobError) -> Self {
        match e {
            JobError::InvalidArgument(m) => Status::invalid_argument(m),
            JobError::NotFound(m) => Status::not_found(m),
            JobError::FailedPrecondition(m) => Status::failed_precondition(m),
            JobError::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

/// A reported state; a worker may not claim the states only the coordinator sets.
fn worker_state(s: pb::WorkerState) -> Result<WorkerState, Status> {
    Ok(match s {
        // proto3's default: a client that sent no state.
        pb::WorkerState::Unspecified | pb::WorkerState::Idle => WorkerState::Idle,
        pb::WorkerState::Waiting => WorkerState::Waiting,
        pb::WorkerState::Precomputing => WorkerState::Precomputing,
        pb::WorkerState::Generating => WorkerState::Generating,
        pb::WorkerState::Training => WorkerState::Training,
        pb::WorkerState::Exited => WorkerState::Exited,
        other => {
            return Err(Status::invalid_argument(format!(
                "a worker cannot report the state {}",
                other.as_str_name()
            )))
        }
    })
}

fn wire_worker_state(s: WorkerState) -> pb::WorkerState {
    match s {
        WorkerState::Registered => pb::WorkerState::Registered,
        WorkerState::Ready => pb::WorkerState::Ready,
        WorkerState::Idle => pb::WorkerState::Idle,
        WorkerState::Waiting => pb::WorkerState::Waiting,
        WorkerState::Precomputing => pb::WorkerState::Precomputing,
        WorkerState::Generating => pb::WorkerState::Generating,
        WorkerState::Training => pb::WorkerState::Training,
        WorkerState::Exited => pb::WorkerState::Exited,
        WorkerState::Dead => pb::WorkerState::Dead,
    }
}

fn wire_phase(p: Phase) -> pb::Phase {
    match p {
        Phase::Waiting => pb::Phase::Waiting,
        Phase::Precompute => pb::Phase::Precompute,
        Phase::Generating => pb::Phase::Generating,
        Phase::Training => pb::Phase::Training,
        Phase::Done => pb::Phase::Done,
        Phase::Failed => pb::Phase::Failed,
    }
}

fn wire_task(t: Task) -> pb::Task {
    use pb::task::Kind;
    let kind = match t {
        Task::Wait { millis, reason } => Kind::Wait(pb::Wait { millis, reason }),
        Task::Precompute { shard } => Kind::Precompute(pb::Precompute {
            shard_path: shard.display().to_string(),
        }),
        Task::Generate { shard } => Kind::Generate(pb::Generate {
            shard_path: shard.display().to_string(),
        }),
        Task::Exit { reason, success } => Kind::Exit(pb::Exit { reason, success }),
        Task::Train(t) => Kind::Train(pb::Train {
            generation: t.generation,
            rank: t.rank,
            world_size: t.world_size,
            ring_peers: t.peers,
            nccl_id: t.nccl_id,
            backend: match t.backend {
                WorldBackend::Local => pb::Backend::Local,
                WorldBackend::Ring => pb::Backend::Ring,
                WorldBackend::Nccl => pb::Backend::Nccl,
            } as i32,
        }),
    };
    pb::Task { kind: Some(kind) }
}

fn wire_status(s: JobStatus) -> pb::JobStatus {
    pb::JobStatus {
        job_id: s.job_id,
        phase: wire_phase(s.phase) as i32,
        generation: s.generation,
        world_size: s.world_size,
        workers: s
            .workers
            .into_iter()
            .map(|w| pb::WorkerStatus {
                worker_id: w.worker_id,
                hostname: w.hostname,
                device: w.device,
                state: wire_worker_state(w.state) as i32,
                rank: w.rank.map_or(-1, |r| r as i32),
                seconds_since_heartbeat: w.seconds_since_heartbeat,
                alive: w.alive,
                pid: w.pid,
            })
            .collect(),
        step: s.step,
        total_steps: s.total_steps,
        epoch: s.epoch,
        metrics: s.metrics.into_iter().collect(),
        samples_per_sec: s.samples_per_sec,
        eta_secs: s.eta_secs,
        shards_done: s.shards_done,
        shards_total: s.shards_total,
        last_checkpoint: s.last_checkpoint,
        skipped_rows: s.skipped_rows,
        recent_errors: s.recent_errors,
        message: s.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refusals_become_the_grpc_codes_that_say_why() {
        let cases = [
            (JobError::InvalidArgument("a".into()), Code::InvalidArgument),
            (JobError::NotFound("b".into()), Code::NotFound),
            (
                JobError::FailedPrecondition("c".into()),
                Code::FailedPrecondition,
            ),
            (
                JobError::PermissionDenied("d".into()),
                Code::PermissionDenied,
            ),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg.as_str()));
        }
    }

    #[test]
    fn a_worker_reports_only_its_own_states() {
        assert_eq!(
            worker_state(pb::WorkerState::Unspecified).unwrap(),
            WorkerState::Idle
        );
        assert_eq!(
            worker_state(pb::WorkerState::Exited).unwrap(),
            WorkerState::Exited
        );
        for s in [
            pb::WorkerState::Registered,
            pb::WorkerState::Ready,
            pb::WorkerState::Dead,
        ] {
            let e = worker_state(s).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert!(e.message().contains(s.as_str_name()), "{}", e.message());
        }
    }
}
