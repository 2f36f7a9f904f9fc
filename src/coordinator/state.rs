//! The job's state machine, separate from gRPC so it can be reasoned about (and tested) on its own.
//! All methods run under one mutex; none blocks.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::types::{
    Beat, BeatReply, JobError, JobSetupError, JobStatus, Joined, Registration, ShardDone, Task,
    TrainTask, TrainingEnd, WorkerState, WorkerStatus, WorldBackend,
};
use crate::config::{Backend, Config};
use crate::data::shards;

/// How many times a broken world is re-formed before the job is declared failed.
const MAX_GENERATIONS: u64 = 20;
/// After the job ends, how long workers get to collect their `Exit` before the server stops.
const DRAIN: Duration = Duration::from_secs(3);
/// Errors kept for the status endpoint.
const KEEP_ERRORS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Waiting,
    Precompute,
    /// A generation job: prompt shards leased to workers, then done.
    Generating,
    Training,
    Done,
    Failed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Precompute => "precompute",
            Phase::Generating => "generating",
            Phase::Training => "training",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Worker {
    seq: u64,
    hostname: String,
    device: String,
    ring_address: String,
    pid: u32,
    last_heartbeat: Instant,
    alive: bool,
    ready: bool,
    state: WorkerState,
    step: u64,
    lease: Option<PathBuf>,
    /// The generation this worker is a member of, if any.
    generation: Option<u64>,
    exited: bool,
    /// `ring_address` is the listener the worker will use next (reported since its last training run);
    /// a worker re-binds its listener for every run, so an older address would be stale.
    addr_fresh: bool,
}

#[derive(Debug)]
struct World {
    generation: u64,
    /// Worker ids by rank.
    members: Vec<String>,
    /// Ring addresses by rank, fixed when the world forms so every rank sees the same list.
    peers: Vec<String>,
    nccl_id: Vec<u8>,
    backend: WorldBackend,
    finished: HashSet<String>,
}

/// What survives a coordinator restart (`<output_dir>/coordinator-state.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Saved {
    job_id: String,
    generation: u64,
    shards_done: Vec<PathBuf>,
    done: bool,
}

pub struct Job {
    cfg: Config,
    config_toml: String,
    job_id: String,
    phase: Phase,
    message: String,
    generation: u64,
    workers: BTreeMap<String, Worker>,
    next_seq: u64,
    model_digest: String,
    shards_total: usize,
    pending: VecDeque<PathBuf>,
    leased: BTreeMap<PathBuf, String>,
    done_shards: HashSet<PathBuf>,
    skipped_rows: u64,
    world: Option<World>,
    step: u64,
    total_steps: u64,
    metrics: BTreeMap<String, f64>,
    last_checkpoint: String,
    errors: VecDeque<String>,
    ended_at: Option<Instant>,
    started: Instant,
    incarnation: String,
}

fn state_path(cfg: &Config) -> PathBuf {
    cfg.train.output_dir.join("coordinator-state.json")
}

impl Job {
    /// A new job, or the job recorded in the output folder by a previous coordinator (restart).
    pub fn new(cfg: Config, config_toml: String) -> Result<Self, JobSetupError> {
        let discover = |key, patterns: &[String]| {
            shards::discover(patterns).map_err(|source| JobSetupError { key, source })
        };
        let all = if cfg.is_generation_job() {
            discover("generate.prompts", &cfg.generate.prompts)?
        } else if cfg.needs_reference_cache() {
            let mut all = discover("data.train", &cfg.data.train)?;
            if !cfg.data.eval.is_empty() {
                all.extend(discover("data.eval", &cfg.data.eval)?);
            }
            all
        } else {
            // Nothing to precompute without a cached reference (SFT, online reference); the data is still
            // checked here.
            discover("data.train", &cfg.data.train)?;
            Vec::new()
        };
        let saved: Option<Saved> = std::fs::read_to_string(state_path(&cfg))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let digest = cfg.model_digest();
        let job_id = saved
            .as_ref()
            .map(|s| s.job_id.clone())
            .unwrap_or_else(|| format!("{}-{}", &digest[..12], std::process::id()));
        let done_shards: HashSet<PathBuf> = saved
            .as_ref()
            .map(|s| s.shards_done.iter().cloned().collect())
            .unwrap_or_default();
        let pending: VecDeque<PathBuf> = all
            .iter()
            .filter(|s| !done_shards.contains(*s))
            .cloned()
            .collect();
        if let Some(s) = &saved {
            tracing::info!(
                job = %s.job_id,
                generation = s.generation,
                shards_done = s.shards_done.len(),
                "recovered the job from its state file"
            );
        }
        let done = saved.as_ref().is_some_and(|s| s.done);
        Ok(Self {
            generation: saved.as_ref().map(|s| s.generation).unwrap_or(0),
            phase: if done { Phase::Done } else { Phase::Waiting },
            message: if done {
                "the job had already finished".into()
            } else {
                "waiting for workers".into()
            },
            cfg,
            config_toml,
            job_id,
            workers: BTreeMap::new(),
            next_seq: 0,
            model_digest: digest,
            shards_total: all.len(),
            pending,
            leased: BTreeMap::new(),
            done_shards,
            skipped_rows: 0,
            world: None,
            step: 0,
            total_steps: 0,
            metrics: BTreeMap::new(),
            last_checkpoint: String::new(),
            errors: VecDeque::new(),
            ended_at: if done { Some(Instant::now()) } else { None },
            started: Instant::now(),
            incarnation: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64 & 0xffffff)
                    .unwrap_or(0)
            ),
        })
    }

    pub fn save_state(&self) {
        let s = Saved {
            job_id: self.job_id.clone(),
            generation: self.generation,
            shards_done: self.done_shards.iter().cloned().collect(),
            done: self.phase == Phase::Done,
        };
        let p = state_path(&self.cfg);
        let _ = std::fs::create_dir_all(&self.cfg.train.output_dir);
        let bytes = serde_json::to_vec_pretty(&s).expect("serialises");
        if let Err(e) = crate::util::fsx::write_atomic(&p, &bytes) {
            tracing::warn!("cannot save the job state to {}: {e}", p.display());
        }
    }

    fn error(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.errors.push_back(msg);
        while self.errors.len() > KEEP_ERRORS {
            self.errors.pop_front();
        }
    }

    fn end(&mut self, phase: Phase, message: String) {
        if self.ended_at.is_none() {
            tracing::info!(phase = phase.name(), "{message}");
            self.phase = phase;
            self.message = message;
            self.ended_at = Some(Instant::now());
            self.save_state();
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    pub fn succeeded(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Over, every live worker has collected its `Exit` (or the grace period passed), and `linger` has
    /// passed since the end (so status readers see the final state).
    pub fn finished_and_drained(&self, linger: Duration) -> bool {
        let Some(t) = self.ended_at else { return false };
        let all_out = self.workers.values().all(|w| w.exited || !w.alive);
        (all_out || t.elapsed() > DRAIN) && t.elapsed() >= linger
    }

    fn worker(&mut self, id: &str) -> Result<&mut Worker, JobError> {
        if id.is_empty() {
            return Err(JobError::InvalidArgument("worker_id is empty".into()));
        }
        match self.workers.get_mut(id) {
            Some(w) if w.alive => Ok(w),
            Some(_) => Err(JobError::NotFound(format!(
                "worker {id} was declared dead (no heartbeat); register again"
            ))),
            None => Err(JobError::NotFound(format!(
                "unknown worker {id}; register first"
            ))),
        }
    }

    pub fn register(&mut self, r: Registration) -> Result<Joined, JobError> {
        if self.is_over() {
            return Err(JobError::FailedPrecondition(format!(
                "job {} is {} ({}); no more workers are needed",
                self.job_id,
                self.phase.name(),
                self.message
            )));
        }
        if r.hostname.is_empty() || r.device.is_empty() {
            return Err(JobError::InvalidArgument(
                "hostname and device are required".into(),
            ));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // The incarnation tag keeps ids unique across coordinator restarts: a worker of the previous
        // incarnation is then unknown (and re-registers) instead of being mistaken for a new one.
        let id = format!("w{seq}-{}-{}", r.hostname, self.incarnation);
        tracing::info!(worker = %id, device = %r.device, ring = %r.ring_address, "worker registered");
        self.workers.insert(
            id.clone(),
            Worker {
                seq,
                hostname: r.hostname,
                device: r.device,
                ring_address: r.ring_address,
                pid: r.pid,
                last_heartbeat: Instant::now(),
                alive: true,
                ready: false,
                state: WorkerState::Registered,
                step: 0,
                lease: None,
                generation: None,
                exited: false,
                addr_fresh: true,
            },
        );
        Ok(Joined {
            worker_id: id,
            job_id: self.job_id.clone(),
            config_toml: self.config_toml.clone(),
            heartbeat_secs: self.cfg.cluster.heartbeat_secs as u32,
        })
    }

    pub fn ready(&mut self, id: &str, digest: &str) -> Result<(), JobError> {
        let expected = self.model_digest.clone();
        let w = self.worker(id)?;
        if digest != expected {
            w.alive = false;
            let msg = format!(
                "worker {id} sees a different model or seed (digest {}…, coordinator {}…): refused",
                &digest.get(..12).unwrap_or(digest),
                &expected[..12]
            );
            self.error(msg.clone());
            return Err(JobError::FailedPrecondition(msg));
        }
        w.ready = true;
        w.state = WorkerState::Ready;
        Ok(())
    }

    pub fn heartbeat(&mut self, r: Beat) -> Result<BeatReply, JobError> {
        let over = self.is_over();
        let w = self.worker(&r.worker_id)?;
        w.last_heartbeat = Instant::now();
        // A worker that says it is leaving (SIGTERM) is not given work or a place in a world again.
        let leaving = r.state == WorkerState::Exited && !w.exited;
        if leaving {
            w.exited = true;
        }
        w.state = r.state;
        w.step = r.step;
        // A member of the current world leaving before it finished there (SIGTERM while its task was on the
        // way): the others would wait for it at the ring handshake until the collective timeout. Dissolve the
        // world now; their heartbeats then tell them to stop waiting.
        let id = r.worker_id.clone();
        if leaving
            && self
                .world
                .as_ref()
                .is_some_and(|wd| wd.members.contains(&id) && !wd.finished.contains(&id))
        {
            self.break_world(format!("{id} left (SIGTERM)"));
        }
        let current = self.world.as_ref().map(|w| w.generation);
        let w = self.worker(&id)?;
        // A member of a world that no longer exists must stop what it is doing.
        let abort = w.generation.is_some() && w.generation != current || over;
        let rank0 = current.is_some()
            && self.world.as_ref().and_then(|wd| wd.members.first()) == Some(&r.worker_id);
        if rank0 && !r.metrics.is_empty() {
            self.step = r.step;
            if let Some(t) = r.metrics.get("total_steps") {
                self.total_steps = *t as u64;
            }
            self.metrics
                .extend(r.metrics.into_iter().filter(|(k, _)| k != "total_steps"));
        }
        for e in r.errors {
            let msg = format!("{}: {e}", r.worker_id);
            self.error(msg);
        }
        Ok(BeatReply {
            generation: self.generation,
            abort,
        })
    }

    fn wait(millis: u32, reason: &str) -> Task {
        Task::Wait {
            millis,
            reason: reason.into(),
        }
    }

    /// The next task of worker `id`: exit, a shard to precompute, its rank in the training world (formed here
    /// when enough workers wait), or a wait.
    pub fn next_task(&mut self, id: &str, ring_address: &str) -> Result<Task, JobError> {
        if let Some(exit) = self.check_in(id, ring_address)? {
            return Ok(exit);
        }
        if let Some(task) = self.precompute_task(id) {
            return Ok(task);
        }
        if self.phase == Phase::Done {
            // A generation job just ended: this worker's answer is `Exit`.
            return self.next_task(id, "");
        }
        if self.world.is_some() {
            return Ok(self.world_task(id));
        }
        match self.form_world() {
            Some(wait) => Ok(wait),
            // Formed (or the job ended): hand out what that gives this worker.
            None => self.next_task(id, ""),
        }
    }

    /// Notes a sign of life and the worker's ring address, refuses a worker that is not ready, answers `Exit`
    /// when the job has ended, and returns its lease and world membership (it may join again).
    fn check_in(&mut self, id: &str, ring_address: &str) -> Result<Option<Task>, JobError> {
        let (phase, message) = (self.phase, self.message.clone());
        let w = self.worker(id)?;
        // Asking for work is a sign of life too.
        w.last_heartbeat = Instant::now();
        if !ring_address.is_empty() {
            w.ring_address = ring_address.to_string();
            w.addr_fresh = true;
        }
        if !w.ready {
            return Err(JobError::FailedPrecondition(format!(
                "worker {id} has not reported Ready"
            )));
        }
        if matches!(phase, Phase::Done | Phase::Failed) {
            w.exited = true;
            return Ok(Some(Task::Exit {
                reason: message,
                success: phase == Phase::Done,
            }));
        }
        // A worker asking for work holds no lease and is not training.
        w.generation = None;
        if let Some(s) = w.lease.take() {
            self.leased.remove(&s);
            self.pending.push_front(s);
        }
        Ok(None)
    }

    /// During precompute (or a generation job's generating phase): lease the next shard, or wait for the
    /// others' leases; when every shard is done, moves the job to training (a generation job ends).
    fn precompute_task(&mut self, id: &str) -> Option<Task> {
        let generating = self.cfg.is_generation_job();
        if self.phase == Phase::Waiting {
            (self.phase, self.message) = match generating {
                true => (Phase::Generating, "answering prompt shards".into()),
                false => (Phase::Precompute, "computing reference log-probs".into()),
            };
        }
        if !matches!(self.phase, Phase::Precompute | Phase::Generating) {
            return None;
        }
        if let Some(shard) = self.pending.pop_front() {
            let w = self.workers.get_mut(id).expect("checked");
            w.lease = Some(shard.clone());
            self.leased.insert(shard.clone(), id.to_string());
            w.state = match generating {
                true => WorkerState::Generating,
                false => WorkerState::Precomputing,
            };
            return Some(match generating {
                true => Task::Generate { shard },
                false => Task::Precompute { shard },
            });
        }
        if !self.leased.is_empty() {
            return Some(Self::wait(500, "other workers are finishing their shards"));
        }
        if generating {
            let n = self.done_shards.len();
            self.end(
                Phase::Done,
                format!("generation finished: {n} prompt shard(s) answered"),
            );
            return None;
        }
        self.phase = Phase::Training;
        self.message = "forming the training world".into();
        self.save_state();
        None
    }

    /// With a world formed: a member's rank (again, after a retry), a finished member's wait, or standing by.
    fn world_task(&mut self, id: &str) -> Task {
        let world = self.world.as_ref().expect("called with a world");
        let Some(rank) = world.members.iter().position(|m| m == id) else {
            return Self::wait(1000, "the training world is complete; standing by");
        };
        if world.finished.contains(id) {
            return Self::wait(500, "waiting for the other ranks to finish");
        }
        let w = self.workers.get_mut(id).expect("checked");
        w.generation = Some(world.generation);
        w.state = WorkerState::Training;
        w.addr_fresh = false;
        Task::Train(TrainTask {
            generation: world.generation,
            rank: rank as u32,
            world_size: world.members.len() as u32,
            peers: world.peers.clone(),
            nccl_id: world.nccl_id.clone(),
            backend: world.backend,
        })
    }

    /// Forms the next world from the longest-registered ready workers (`None`), or says why not yet (a wait).
    /// Gives the job up (`None`, the phase now failed) after [`MAX_GENERATIONS`] worlds.
    fn form_world(&mut self) -> Option<Task> {
        let n = self.cfg.cluster.world_size;
        let ready = self.joinable_workers();
        if ready.len() < n {
            self.message = format!("waiting for workers: {} of {n} ready", ready.len());
            return Some(Self::wait(500, &self.message.clone()));
        }
        if self.generation >= MAX_GENERATIONS {
            self.end(
                Phase::Failed,
                format!("the training world broke {MAX_GENERATIONS} times; giving up (see recent errors)"),
            );
            return None;
        }
        self.generation += 1;
        let members: Vec<String> = ready.into_iter().take(n).collect();
        let cuda = self.workers[&members[0]].device.starts_with("cuda");
        let backend = match (self.cfg.cluster.backend, n) {
            (_, 1) => WorldBackend::Local,
            (Backend::Nccl, _) => WorldBackend::Nccl,
            (Backend::Ring, _) => WorldBackend::Ring,
            (Backend::Auto, _) if cuda => WorldBackend::Nccl,
            (Backend::Auto, _) => WorldBackend::Ring,
        };
        tracing::info!(
            generation = self.generation,
            ?members,
            ?backend,
            "training world formed"
        );
        let peers = members
            .iter()
            .map(|m| self.workers[m].ring_address.clone())
            .collect();
        self.world = Some(World {
            generation: self.generation,
            peers,
            members,
            nccl_id: Vec::new(),
            backend,
            finished: HashSet::new(),
        });
        self.message = format!("training (generation {})", self.generation);
        self.save_state();
        None
    }

    /// Workers that may join a world, in registration order. Only workers heard from recently: one that just
    /// died is not yet declared dead by the sweep, and a world formed with it would only break again at the
    /// collective timeout.
    fn joinable_workers(&self) -> Vec<String> {
        let fresh = Duration::from_secs(2 * self.cfg.cluster.heartbeat_secs + 1);
        let mut ready: Vec<(u64, String)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.alive
                    && w.ready
                    && !w.exited
                    && w.generation.is_none()
                    && w.addr_fresh
                    && w.last_heartbeat.elapsed() < fresh
            })
            .map(|(k, w)| (w.seq, k.clone()))
            .collect();
        ready.sort();
        ready.into_iter().map(|(_, k)| k).collect()
    }

    pub fn complete_shard(&mut self, r: ShardDone) -> Result<(), JobError> {
        let shard = r.shard;
        let w = self.worker(&r.worker_id)?;
        if w.lease.as_ref() != Some(&shard) {
            return Err(JobError::FailedPrecondition(format!(
                "worker {} does not hold a lease on {} (expired?)",
                r.worker_id,
                shard.display()
            )));
        }
        w.lease = None;
        w.state = WorkerState::Idle;
        self.leased.remove(&shard);
        if let Some(error) = r.error {
            let what = match self.cfg.is_generation_job() {
                true => "generation",
                false => "precompute",
            };
            let msg = format!(
                "{}: {what} of {} failed: {error}",
                r.worker_id,
                shard.display()
            );
            self.error(msg.clone());
            self.end(Phase::Failed, msg);
            return Ok(());
        }
        self.skipped_rows += r.rows_skipped;
        self.done_shards.insert(shard);
        self.save_state();
        Ok(())
    }

    pub fn publish_nccl_id(
        &mut self,
        id: &str,
        generation: u64,
        nccl_id: Vec<u8>,
    ) -> Result<(), JobError> {
        self.worker(id)?;
        let world = self
            .world
            .as_mut()
            .filter(|w| w.generation == generation)
            .ok_or_else(|| {
                JobError::FailedPrecondition(format!("generation {generation} is not current"))
            })?;
        if world.members.first().map(String::as_str) != Some(id) {
            return Err(JobError::PermissionDenied(format!(
                "worker {id} is not rank 0 of generation {generation}; only rank 0 creates the NCCL id"
            )));
        }
        if nccl_id.len() != 128 {
            return Err(JobError::InvalidArgument(format!(
                "an NCCL unique id has 128 bytes, got {}",
                nccl_id.len()
            )));
        }
        world.nccl_id = nccl_id;
        Ok(())
    }

    /// Breaks the current world: its members abort and the next world re-forms from the checkpoint.
    fn break_world(&mut self, why: String) {
        if let Some(world) = self.world.take() {
            self.error(format!("generation {} broken: {why}", world.generation));
            self.message = format!("re-forming the training world after: {why}");
        }
    }

    pub fn training_ended(&mut self, r: TrainingEnd) -> Result<(), JobError> {
        // Whatever the outcome, this worker is no longer training.
        self.worker(&r.worker_id)?.generation = None;
        let Some(world) = self.world.as_mut().filter(|w| w.generation == r.generation) else {
            // A report from an older generation changes nothing.
            return Err(JobError::FailedPrecondition(format!(
                "generation {} is not current",
                r.generation
            )));
        };
        if !world.members.contains(&r.worker_id) {
            return Err(JobError::PermissionDenied(format!(
                "worker {} is not a member of generation {}",
                r.worker_id, r.generation
            )));
        }
        if let Some(c) = &r.last_checkpoint {
            self.last_checkpoint = c.clone();
        }
        if let Some(error) = &r.error {
            let why = format!("{} failed: {error}", r.worker_id);
            self.break_world(why);
            return Ok(());
        }
        if r.finished {
            world.finished.insert(r.worker_id.clone());
            if world.finished.len() == world.members.len() {
                self.step = r.step;
                self.end(Phase::Done, format!("training finished at step {}", r.step));
            }
        } else {
            // Stopped early (SIGTERM) with a checkpoint: the world cannot go on without this rank.
            let why = format!(
                "{} stopped at step {} (checkpoint written)",
                r.worker_id, r.step
            );
            self.break_world(why);
        }
        Ok(())
    }

    /// Declares workers dead after `heartbeat_timeout_secs` of silence: their leases go back to the queue,
    /// and a world they belong to is broken.
    pub fn sweep(&mut self) {
        let timeout = Duration::from_secs(self.cfg.cluster.heartbeat_timeout_secs);
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.alive && !w.exited && w.last_heartbeat.elapsed() > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for id in dead {
            let w = self.workers.get_mut(&id).expect("listed");
            w.alive = false;
            w.state = WorkerState::Dead;
            let lease = w.lease.take();
            self.error(format!("worker {id} stopped heartbeating; declared dead"));
            if let Some(s) = lease {
                self.leased.remove(&s);
                self.pending.push_front(s);
            }
            if self
                .world
                .as_ref()
                .is_some_and(|wd| wd.members.contains(&id))
                && !self.is_over()
            {
                self.break_world(format!("worker {id} died"));
            }
        }
    }

    pub fn status(&self) -> JobStatus {
        let current = self.world.as_ref();
        let workers = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                worker_id: id.clone(),
                hostname: w.hostname.clone(),
                device: w.device.clone(),
                state: w.state,
                rank: current
                    .and_then(|wd| wd.members.iter().position(|m| m == id))
                    .map(|r| r as u32),
                seconds_since_heartbeat: w.last_heartbeat.elapsed().as_secs_f64(),
                alive: w.alive,
                pid: w.pid,
            })
            .collect();
        let sps = self.metrics.get("samples_per_sec").copied().unwrap_or(0.0);
        let remaining = self.total_steps.saturating_sub(self.step) as f64;
        let eta = if sps > 0.0 {
            remaining * self.cfg.train.batch_size as f64 / sps
        } else {
            0.0
        };
        JobStatus {
            job_id: self.job_id.clone(),
            phase: self.phase,
            generation: self.generation,
            world_size: self.cfg.cluster.world_size as u32,
            workers,
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.metrics.get("epoch").copied().unwrap_or(0.0),
            metrics: self.metrics.clone(),
            samples_per_sec: sps,
            eta_secs: eta,
            shards_done: self.done_shards.len() as u32,
            shards_total: self.shards_total as u32,
            last_checkpoint: self.last_checkpoint.clone(),
            skipped_rows: self.skipped_rows,
            recent_errors: self.errors.iter().cloned().collect(),
            message: format!(
                "{} (up {:.0} s)",
                self.message,
                self.started.elapsed().as_secs_f64()
            ),
        }
    }
}
