//! The coordinator's state machine driven directly, through its own types (no wire types): leases, world
//! formation, and the requests it must refuse (a second rank 0, non-members, stale generations) without harming
//! the job.

use std::path::PathBuf;

use ddpo::config::Config;
use ddpo::coordinator::state::{Job, Phase};
use ddpo::coordinator::types::{
    Beat, JobError, Registration, ShardDone, Task, TrainTask, TrainingEnd, WorkerState,
};

fn shard_done(worker: &str, shard: &std::path::Path) -> ShardDone {
    ShardDone {
        worker_id: worker.into(),
        shard: shard.to_owned(),
        rows_written: 0,
        rows_skipped: 0,
        error: None,
    }
}

fn ended(worker: &str, generation: u64) -> TrainingEnd {
    TrainingEnd {
        worker_id: worker.into(),
        generation,
        finished: true,
        error: None,
        step: 0,
        last_checkpoint: None,
    }
}

fn setup(world: usize) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    ddpo::preset::write_model_files(&r.join("model"), "tiny").unwrap();
    ddpo::data::synth::write_synthetic(&ddpo::data::synth::SynthOptions {
        out_dir: r.join("data"),
        pairs: 8,
        shards: 2,
        seed: 1,
        image_size: 48,
        rows_per_group: 8,
        prefix: "train".into(),
        difficulty: Default::default(),
    })
    .unwrap();
    let text = format!(
        "[model]\npath = \"{0}/model\"\n[data]\ntrain = [\"{0}/data/*.parquet\"]\n\
         [train]\nbatch_size = 4\nmicro_batch_size = 2\noutput_dir = \"{0}/out\"\n\
         [cluster]\nworld_size = {world}\nbackend = \"ring\"\n",
        r.display()
    );
    let cfg = Config::from_toml_str(&text, std::path::Path::new("job.toml"), &[]).unwrap();
    (dir, cfg)
}

fn join(job: &mut Job, cfg: &Config, host: &str) -> String {
    let r = job
        .register(Registration {
            hostname: host.into(),
            device: "cpu".into(),
            ring_address: format!(
                "10.0.0.1:{}",
                9000 + host.len() * 10 + host.as_bytes()[0] as usize % 10
            ),
            pid: 1,
        })
        .unwrap();
    job.ready(&r.worker_id, &cfg.model_digest()).unwrap();
    r.worker_id
}

fn kind(t: &Task) -> &'static str {
    match t {
        Task::Wait { .. } => "wait",
        Task::Precompute { .. } => "precompute",
        Task::Generate { .. } => "generate",
        Task::Train(_) => "train",
        Task::Exit { .. } => "exit",
    }
}

fn train(t: Task) -> TrainTask {
    match t {
        Task::Train(x) => x,
        other => panic!("expected train, got {other:?}"),
    }
}

#[test]
fn leases_worlds_and_refusals() {
    let (_dir, cfg) = setup(2);
    let mut job = Job::new(cfg.clone(), String::new()).unwrap();
    let a = join(&mut job, &cfg, "a");
    let b = join(&mut job, &cfg, "b");

    // Precompute: one shard each; completing a shard one does not hold is refused.
    let ta = job.next_task(&a, "").unwrap();
    let tb = job.next_task(&b, "").unwrap();
    assert_eq!((kind(&ta), kind(&tb)), ("precompute", "precompute"));
    let shard_of = |t: &Task| -> PathBuf {
        match t {
            Task::Precompute { shard } => shard.clone(),
            _ => unreachable!(),
        }
    };
    let (sa, sb) = (shard_of(&ta), shard_of(&tb));
    assert_ne!(sa, sb, "a shard was leased twice");
    let e = job.complete_shard(shard_done(&a, &sb)).unwrap_err();
    assert!(matches!(e, JobError::FailedPrecondition(_)), "{e}");
    for (w, s) in [(&a, &sa), (&b, &sb)] {
        job.complete_shard(shard_done(w, s)).unwrap();
    }
    assert_eq!(job.status().shards_done, 2);

    // Training: both get ranks 0 and 1 of generation 1.
    let (ta, tb) = (
        job.next_task(&a, "127.0.0.1:1001").unwrap(),
        job.next_task(&b, "127.0.0.1:1002").unwrap(),
    );
    let (ra, rb) = (train(ta), train(tb));
    assert_eq!(
        (ra.rank, rb.rank, ra.generation, rb.generation),
        (0, 1, 1, 1)
    );
    assert_eq!(ra.peers, rb.peers);
    assert_eq!(ra.peers[0], "127.0.0.1:1001");
    assert!(ra.peers[1].starts_with("10.0.0.1:"), "{:?}", ra.peers);

    // A second rank 0: rank 1 may not publish the NCCL id; a malformed id is refused too.
    let e = job.publish_nccl_id(&b, 1, vec![0; 128]).unwrap_err();
    assert!(matches!(e, JobError::PermissionDenied(_)), "{e}");
    let e = job.publish_nccl_id(&a, 1, vec![0; 12]).unwrap_err();
    assert!(matches!(e, JobError::InvalidArgument(_)), "{e}");
    job.publish_nccl_id(&a, 1, vec![7; 128]).unwrap();

    // A worker outside the world, or reporting for an old generation, changes nothing.
    let c = join(&mut job, &cfg, "c");
    let e = job.training_ended(ended(&c, 1)).unwrap_err();
    assert!(matches!(e, JobError::PermissionDenied(_)), "{e}");
    let e = job.training_ended(ended(&a, 0)).unwrap_err();
    assert!(matches!(e, JobError::FailedPrecondition(_)), "{e}");
    assert_eq!(kind(&job.next_task(&c, "").unwrap()), "wait");
    assert_eq!(job.status().phase, Phase::Training);

    // A failure breaks the world; the next world takes idle workers and has a new generation.
    job.training_ended(TrainingEnd {
        finished: false,
        error: Some("peer reset".into()),
        ..ended(&b, 1)
    })
    .unwrap();
    // b must report a fresh listener before it can join a new world (its old one was used by generation 1),
    // and `a` still runs generation 1 until it asks for work: c alone waits.
    assert_eq!(kind(&job.next_task(&c, "127.0.0.1:1003").unwrap()), "wait");
    let rb = train(job.next_task(&b, "127.0.0.1:1004").unwrap());
    assert_eq!((rb.generation, rb.world_size), (2, 2));
    let rc = train(job.next_task(&c, "127.0.0.1:1003").unwrap());
    assert_eq!(rc.generation, 2);
    assert_eq!(rb.peers, rc.peers);
    // Both finish: the job is done and everyone is told to exit; late workers are refused.
    for w in [&b, &c] {
        job.training_ended(TrainingEnd {
            step: 4,
            ..ended(w, 2)
        })
        .unwrap();
    }
    assert_eq!(job.status().phase, Phase::Done);
    assert_eq!(kind(&job.next_task(&a, "").unwrap()), "exit");
    let e = job
        .register(Registration {
            hostname: "late".into(),
            device: "cpu".into(),
            ring_address: String::new(),
            pid: 1,
        })
        .unwrap_err();
    assert!(matches!(e, JobError::FailedPrecondition(_)), "{e}");
}

/// A member that leaves (SIGTERM) while its training task is still on the way dissolves the world at once:
/// the member already training is told to abort at its next heartbeat (instead of waiting for the leaver at
/// the ring handshake until the collective timeout), and the next world forms without the leaver.
#[test]
fn a_member_leaving_before_it_joins_dissolves_the_world() {
    let (_dir, cfg) = setup(2);
    let mut job = Job::new(cfg.clone(), String::new()).unwrap();
    let a = join(&mut job, &cfg, "a");
    let b = join(&mut job, &cfg, "b");
    let c = join(&mut job, &cfg, "c");
    for w in [&a, &b] {
        match job.next_task(w, "").unwrap() {
            Task::Precompute { shard } => job.complete_shard(shard_done(w, &shard)).unwrap(),
            other => panic!("expected precompute, got {other:?}"),
        }
    }
    // `a` asks first and gets generation 1 with `b` (registered earlier than `c`) as its peer.
    let ra = train(job.next_task(&a, "127.0.0.1:2001").unwrap());
    assert_eq!((ra.generation, ra.world_size), (1, 2));
    let beat = |job: &mut Job, w: &str, state: WorkerState| {
        job.heartbeat(Beat {
            worker_id: w.to_string(),
            state,
            step: 0,
            metrics: Default::default(),
            errors: Vec::new(),
        })
        .unwrap()
    };
    assert!(!beat(&mut job, &a, WorkerState::Training).abort);
    // `b` is terminated before it fetched its task.
    beat(&mut job, &b, WorkerState::Exited);
    assert!(
        beat(&mut job, &a, WorkerState::Training).abort,
        "the member waiting for the leaver must be told to stop"
    );
    assert!(
        job.status()
            .recent_errors
            .iter()
            .any(|e| e.contains("left (SIGTERM)")),
        "{:?}",
        job.status().recent_errors
    );
    // The next world: `a` (after asking again, with a fresh listener) and `c`; `b` gets no place.
    assert_eq!(kind(&job.next_task(&c, "127.0.0.1:2003").unwrap()), "wait");
    let ra = train(job.next_task(&a, "127.0.0.1:2004").unwrap());
    let rc = train(job.next_task(&c, "127.0.0.1:2003").unwrap());
    assert_eq!((ra.generation, rc.generation, ra.world_size), (2, 2, 2));
    assert_eq!(ra.peers, vec!["127.0.0.1:2004", "127.0.0.1:2003"]);
    assert_ne!(kind(&job.next_task(&b, "127.0.0.1:2002").unwrap()), "train");
}

/// A data pattern that matches nothing is refused when the job is made, naming the config key.
#[test]
fn a_job_without_data_names_the_key() {
    let (dir, mut cfg) = setup(1);
    cfg.data.eval = vec![format!("{}/nowhere/*.parquet", dir.path().display())];
    let e = Job::new(cfg, String::new()).err().expect("refused");
    assert_eq!(e.key, "data.eval");
    assert!(e.to_string().starts_with("data.eval: "), "{e}");
}

/// SFT and an online reference read no cache: the job goes straight to training, leasing no shard.
#[test]
fn nothing_is_precomputed_without_a_cached_reference() {
    for case in ["sft", "online"] {
        let (_dir, mut cfg) = setup(1);
        assert!(cfg.needs_reference_cache());
        match case {
            "sft" => cfg.ddpo.loss = ddpo::config::LossKind::Sft,
            _ => cfg.reference.mode = ddpo::config::ReferenceMode::Online,
        }
        assert!(!cfg.needs_reference_cache());
        let mut job = Job::new(cfg.clone(), String::new()).unwrap();
        let w = join(&mut job, &cfg, "a");
        let t = job.next_task(&w, "10.0.0.1:9000").unwrap();
        assert_eq!(kind(&t), "train", "{case}");
        assert_eq!(train(t).world_size, 1);
    }
}

/// A generation job leases its prompt shards as `Generate` tasks (a worker that asks again without completing
/// gives its shard back), never forms a training world, and ends done when every shard is answered.
#[test]
fn a_generation_job_leases_prompt_shards_and_ends() {
    let (dir, mut cfg) = setup(2);
    cfg.generate.prompts = vec![format!("{}/data/*.parquet", dir.path().display())];
    assert!(cfg.is_generation_job() && cfg.validate().is_empty());
    let mut job = Job::new(cfg.clone(), String::new()).unwrap();
    let a = join(&mut job, &cfg, "a");
    let b = join(&mut job, &cfg, "b");
    let shard_of = |t: Task| match t {
        Task::Generate { shard } => shard,
        other => panic!("expected generate, got {other:?}"),
    };
    let first = shard_of(job.next_task(&a, "").unwrap());
    assert_eq!(job.status().phase, Phase::Generating);
    // `a` asks again without completing (it restarted): the same shard comes back to it.
    assert_eq!(shard_of(job.next_task(&a, "").unwrap()), first);
    let second = shard_of(job.next_task(&b, "").unwrap());
    assert_ne!(first, second);
    job.complete_shard(shard_done(&a, &first)).unwrap();
    job.complete_shard(shard_done(&b, &second)).unwrap();
    match job.next_task(&a, "").unwrap() {
        Task::Exit { success, .. } => assert!(success),
        other => panic!("expected exit, got {other:?}"),
    }
    assert_eq!(job.status().phase, Phase::Done);
    assert_eq!(kind(&job.next_task(&b, "").unwrap()), "exit");
}
