//! The state machine's own types: what workers ask and are told, and what the status shows, without the wire
//! types. `service` converts them to and from `rpc::pb`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Registered,
    Ready,
    Idle,
    Waiting,
    Precomputing,
    Generating,
    Training,
    /// Leaving (SIGTERM): given no more work.
    Exited,
    /// Stopped heartbeating (set by the coordinator).
    Dead,
}

/// The collective a training world uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorldBackend {
    /// World size 1.
    Local,
    /// TCP ring (CPU).
    Ring,
    Nccl,
}

/// A worker announcing itself.
#[derive(Debug, Clone)]
pub struct Registration {
    pub hostname: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// host:port of its CPU-ring listener.
    pub ring_address: String,
    pub pid: u32,
}

/// What a registered worker is told.
#[derive(Debug, Clone)]
pub struct Joined {
    pub worker_id: String,
    pub job_id: String,
    pub config_toml: String,
    pub heartbeat_secs: u32,
}

/// A heartbeat: liveness, state, progress and (rank 0) the latest metrics.
#[derive(Debug, Clone)]
pub struct Beat {
    pub worker_id: String,
    pub state: WorkerState,
    pub step: u64,
    pub metrics: BTreeMap<String, f64>,
    pub errors: Vec<String>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatReply {
    pub generation: u64,
    /// The worker's world is gone (or the job ended): stop the current task.
    pub abort: bool,
}

/// What a worker is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    Wait {
        millis: u32,
        reason: String,
    },
    Precompute {
        shard: PathBuf,
    },
    /// Answer this prompt shard (a generation job).
    Generate {
        shard: PathBuf,
    },
    Train(TrainTask),
    Exit {
        reason: String,
        success: bool,
    },
}

/// One rank's place in a training world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainTask {
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    /// CPU-ring addresses by rank.
    pub peers: Vec<String>,
    /// Empty until rank 0 published it (NCCL only).
    pub nccl_id: Vec<u8>,
    pub backend: WorldBackend,
}

/// A precompute lease's outcome.
#[derive(Debug, Clone)]
pub struct ShardDone {
    pub worker_id: String,
    pub shard: PathBuf,
    pub rows_written: u64,
    pub rows_skipped: u64,
    /// The shard failed on this worker.
    pub error: Option<String>,
}

/// A rank's report of how its training run ended.
#[derive(Debug, Clone)]
pub struct TrainingEnd {
    pub worker_id: String,
    pub generation: u64,
    /// All steps done.
    pub finished: bool,
    pub error: Option<String>,
    pub step: u64,
    pub last_checkpoint: Option<String>,
}

/// One worker in the status.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub hostname: String,
    pub device: String,
    pub state: WorkerState,
    /// Its rank in the current world.
    pub rank: Option<u32>,
    pub seconds_since_heartbeat: f64,
    pub alive: bool,
    pub pid: u32,
}

/// The job as the status endpoint shows it.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub job_id: String,
    pub phase: super::state::Phase,
    pub generation: u64,
    pub world_size: u32,
    pub workers: Vec<WorkerStatus>,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub metrics: BTreeMap<String, f64>,
    pub samples_per_sec: f64,
    pub eta_secs: f64,
    pub shards_done: u32,
    pub shards_total: u32,
    pub last_checkpoint: String,
    pub skipped_rows: u64,
    pub recent_errors: Vec<String>,
    pub message: String,
}

/// Why a job could not be set up: a data pattern of the config (named by its key) matched nothing usable.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct JobSetupError {
    pub key: &'static str,
    pub source: crate::data::DataError,
}

/// Why the state machine refused a call; the service maps each kind to a gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown or dead worker: register (again).
    #[error("{0}")]
    NotFound(String),
    /// Not now: the job's or the worker's state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is not the one allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
}
