//! The coordinator's state machine driven directly: leases, world formation, and the requests it must
//! refuse (a second rank 0, non-members, stale generations) without harming the job.

use ddpo::config::Config;
use ddpo::coordinator::state::Job;
use ddpo::rpc::pb;
use tonic::Code;

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
        .register(pb::RegisterRequest {
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

fn kind(t: &pb::Task) -> &'static str {
    match t.kind.as_ref().unwrap() {
        pb::task::Kind::Wait(_) => "wait",
        pb::task::Kind::Precompute(_) => "precompute",
        pb::task::Kind::Train(_) => "train",
        pb::task::Kind::Exit(_) => "exit",
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
    let shard_of = |t: &pb::Task| match t.kind.as_ref().unwrap() {
        pb::task::Kind::Precompute(p) => p.shard_path.clone(),
        _ => unreachable!(),
    };
    let (sa, sb) = (shard_of(&ta), shard_of(&tb));
    assert_ne!(sa, sb, "a shard was leased twice");
    let e = job
        .complete_shard(pb::CompleteShardRequest {
            worker_id: a.clone(),
            shard_path: sb.clone(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    for (w, s) in [(&a, &sa), (&b, &sb)] {
        job.complete_shard(pb::CompleteShardRequest {
            worker_id: w.clone(),
            shard_path: s.clone(),
            ..Default::default()
        })
        .unwrap();
    }
    assert_eq!(job.status().shards_done, 2);

    // Training: both get ranks 0 and 1 of generation 1.
    let (ta, tb) = (
        job.next_task(&a, "127.0.0.1:1001").unwrap(),
        job.next_task(&b, "127.0.0.1:1002").unwrap(),
    );
    let train = |t: &pb::Task| match t.kind.as_ref().unwrap() {
        pb::task::Kind::Train(x) => x.clone(),
        other => panic!("expected train, got {other:?}"),
    };
    let (ra, rb) = (train(&ta), train(&tb));
    assert_eq!(
        (ra.rank, rb.rank, ra.generation, rb.generation),
        (0, 1, 1, 1)
    );
    assert_eq!(ra.ring_peers, rb.ring_peers);
    assert_eq!(ra.ring_peers[0], "127.0.0.1:1001");
    assert!(
        ra.ring_peers[1].starts_with("10.0.0.1:"),
        "{:?}",
        ra.ring_peers
    );

    // A second rank 0: rank 1 may not publish the NCCL id; a malformed id is refused too.
    let e = job.publish_nccl_id(&b, 1, vec![0; 128]).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = job.publish_nccl_id(&a, 1, vec![0; 12]).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    job.publish_nccl_id(&a, 1, vec![7; 128]).unwrap();

    // A worker outside the world, or reporting for an old generation, changes nothing.
    let c = join(&mut job, &cfg, "c");
    let e = job
        .training_ended(pb::TrainingEndedRequest {
            worker_id: c.clone(),
            generation: 1,
            finished: true,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = job
        .training_ended(pb::TrainingEndedRequest {
            worker_id: a.clone(),
            generation: 0,
            finished: true,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert_eq!(kind(&job.next_task(&c, "").unwrap()), "wait");
    assert_eq!(job.status().phase, "training");

    // A failure breaks the world; the next world takes idle workers and has a new generation.
    job.training_ended(pb::TrainingEndedRequest {
        worker_id: b.clone(),
        generation: 1,
        error: "peer reset".into(),
        ..Default::default()
    })
    .unwrap();
    // b must report a fresh listener before it can join a new world (its old one was used by generation 1),
    // and `a` still runs generation 1 until it asks for work: c alone waits.
    assert_eq!(kind(&job.next_task(&c, "127.0.0.1:1003").unwrap()), "wait");
    let rb = train(&job.next_task(&b, "127.0.0.1:1004").unwrap());
    assert_eq!((rb.generation, rb.world_size), (2, 2));
    let rc = train(&job.next_task(&c, "127.0.0.1:1003").unwrap());
    assert_eq!(rc.generation, 2);
    assert_eq!(rb.ring_peers, rc.ring_peers);
    // Both finish: the job is done and everyone is told to exit; late workers are refused.
    for w in [&b, &c] {
        job.training_ended(pb::TrainingEndedRequest {
            worker_id: w.clone(),
            generation: 2,
            finished: true,
            step: 4,
            ..Default::default()
        })
        .unwrap();
    }
    assert_eq!(job.status().phase, "done");
    assert_eq!(kind(&job.next_task(&a, "").unwrap()), "exit");
    let e = job
        .register(pb::RegisterRequest {
            hostname: "late".into(),
            device: "cpu".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
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
        match job.next_task(w, "").unwrap().kind.unwrap() {
            pb::task::Kind::Precompute(p) => job
                .complete_shard(pb::CompleteShardRequest {
                    worker_id: w.clone(),
                    shard_path: p.shard_path,
                    ..Default::default()
                })
                .unwrap(),
            other => panic!("expected precompute, got {other:?}"),
        }
    }
    let train = |t: pb::Task| match t.kind.unwrap() {
        pb::task::Kind::Train(x) => x,
        other => panic!("expected train, got {other:?}"),
    };
    // `a` asks first and gets generation 1 with `b` (registered earlier than `c`) as its peer.
    let ra = train(job.next_task(&a, "127.0.0.1:2001").unwrap());
    assert_eq!((ra.generation, ra.world_size), (1, 2));
    let beat = |job: &mut Job, w: &str, state: &str| {
        job.heartbeat(pb::HeartbeatRequest {
            worker_id: w.to_string(),
            state: state.into(),
            ..Default::default()
        })
        .unwrap()
    };
    assert!(!beat(&mut job, &a, "training").abort);
    // `b` is terminated before it fetched its task.
    beat(&mut job, &b, "exited");
    assert!(
        beat(&mut job, &a, "training").abort,
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
    assert_eq!(ra.ring_peers, vec!["127.0.0.1:2004", "127.0.0.1:2003"]);
    assert_ne!(kind(&job.next_task(&b, "127.0.0.1:2002").unwrap()), "train");
}
