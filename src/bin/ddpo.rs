//! `ddpo`: the user's toolbox. Thin over the library: parse arguments, call, report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use ddpo::config::{Config, OnBadRow};
use ddpo::data::pipeline::{ExampleStream, Preprocessor};
use ddpo::data::{shards, synth};
use ddpo::logging::{self, LogFormat};
use ddpo::preset;

#[derive(Parser)]
#[command(
    name = "ddpo",
    version,
    about = "Dense Direct Preference Optimization (RLHF-V) for LLaVA-style models"
)]
struct Cli {
    /// Log format: text for terminals, json for cluster log collectors (also DDPO_LOG_FORMAT=json).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write synthetic preference data in the RLHF-V parquet layout (images of shapes, correct and
    /// hallucinated descriptions).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 256)]
        pairs: usize,
        #[arg(long, default_value_t = 2)]
        shards: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = 96)]
        image_size: u32,
        /// Rows per parquet row group.
        #[arg(long, default_value_t = 64)]
        rows_per_group: usize,
        /// File name prefix (`train`, `eval`, …).
        #[arg(long, default_value = "train")]
        prefix: String,
        /// `standard` (1-3 groups; wrong colour, shape, count or position) or `easy` (one group, one wrong
        /// colour: learnable by a tiny model from scratch).
        #[arg(long, default_value = "standard")]
        difficulty: String,
    },
    /// Write a random-initialised model directory of a built-in shape: weights (llava-hf layout),
    /// config.json, tokenizer and image-processor files.
    InitModel {
        #[arg(long)]
        out: PathBuf,
        /// `tiny` (tests, seconds on CPU), `small` (benchmarks, LLaVA-1.5 scaled down) or `1b` (~1.05 B
        /// parameters, for GPU checks).
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Compute the reference model's per-token log-probs over every training and eval shard, once, into the
    /// cache (`reference.cache_dir`). Shards already cached with the same fingerprint are not recomputed.
    Precompute {
        #[arg(long)]
        config: PathBuf,
        /// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Train with DDPO in this process (precomputing the reference cache first if needed). Resumes from the
    /// newest checkpoint in `train.output_dir` when there is one.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Stop after this many optimizer steps in total, with a checkpoint (run again to continue).
        #[arg(long)]
        max_steps: Option<usize>,
    },
    /// Supervised fine-tuning on the chosen responses (mean token NLL; no reference model): `train` with
    /// `ddpo.loss = "sft"`, the same distributed trainer, checkpoints, resume and metrics. RLHF-V starts DDPO
    /// from an SFT model.
    Sft {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        max_steps: Option<usize>,
    },
    /// Show a running job's status (from the coordinator's status endpoint).
    Status {
        /// Coordinator URL, e.g. http://127.0.0.1:50051
        #[arg(long)]
        coordinator: String,
        /// Print JSON (one object; with --watch one per line) instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep printing updates until the job ends.
        #[arg(long)]
        watch: bool,
        /// Milliseconds between updates with --watch.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u32,
    },
    /// Check a job: config keys and ranges, files, model directory, and every data row (layout, JSON, image
    /// decode, tokenization, diff). Reports bad rows with shard, row number and reason; exits non-zero on
    /// any problem.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the memory plan of one training rank (weights, gradients, fp32 masters, AdamW moments,
    /// activations, overhead) and whether it fits the device; exits 1 when it does not. From a job config
    /// (flags override its values) or a model preset. Comma-separated --preset, --world and --zero-stage
    /// values print one summary row per combination instead.
    Plan(ddpo::memplan::PlanArgs),
    /// Answer the questions of preference shards or of a prompts file with a model (greedy or sampled, K
    /// answers each), into one parquet file: question, image, sample, response text and token ids.
    Generate(ddpo::generate::GenerateArgs),
    /// How often a model hallucinates about synthetic scenes: its answers (generated, or from a `generate`
    /// file) scored claim by claim against each row's scene; CHAIR_s/CHAIR_i-like rates, per kind, coverage.
    Evaluate(ddpo::evaluate::EvaluateArgs),
}

fn main() -> ExitCode {
    ddpo::util::numerics::init_process();
    let cli = Cli::parse();
    let log_format = cli.log_format.unwrap_or_else(LogFormat::from_env);
    logging::init(log_format);
    let result = match cli.cmd {
        Cmd::Synth {
            out,
            pairs,
            shards,
            seed,
            image_size,
            rows_per_group,
            prefix,
            difficulty,
        } => match synth::Difficulty::from_name(&difficulty) {
            Some(difficulty) => cmd_synth(synth::SynthOptions {
                out_dir: out,
                pairs,
                shards,
                seed,
                image_size,
                rows_per_group,
                prefix,
                difficulty,
            }),
            None => Err(anyhow::anyhow!(
                "--difficulty {difficulty:?}: expected standard or easy"
            )),
        },
        Cmd::InitModel { out, preset, seed } => cmd_init_model(&out, &preset, seed),
        Cmd::Validate { config } => cmd_validate(&config),
        Cmd::Plan(args) => ddpo::memplan::run_plan_command(args)
            .map(|fits| {
                if fits {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
            .map_err(anyhow::Error::from),
        Cmd::Precompute { config, device } => cmd_precompute(&config, &device),
        Cmd::Generate(args) => cmd_generate(&args),
        Cmd::Evaluate(args) => ddpo::evaluate::run_evaluate_command(&args)
            .map(|report| {
                println!("{report}");
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Cmd::Status {
            coordinator,
            json,
            watch,
            interval_ms,
        } => cmd_status(&coordinator, json, watch, interval_ms),
        Cmd::Train {
            config,
            device,
            max_steps,
        } => cmd_train(&config, &device, max_steps, log_format, false),
        Cmd::Sft {
            config,
            device,
            max_steps,
        } => cmd_train(&config, &device, max_steps, log_format, true),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_synth(opts: synth::SynthOptions) -> Result<ExitCode> {
    let t = Instant::now();
    let report = synth::write_synthetic(&opts)
        .with_context(|| format!("writing synthetic data to {}", opts.out_dir.display()))?;
    println!(
        "wrote {} pairs ({} hallucinated segments) in {} shard(s) to {} in {:.2} s",
        report.pairs,
        report.edits,
        report.files.len(),
        opts.out_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_init_model(out: &Path, name: &str, seed: u64) -> Result<ExitCode> {
    let written = preset::init_model(out, name, seed)?;
    println!(
        "wrote {} preset files to {}: {}",
        name,
        out.display(),
        written.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn status_json(s: &ddpo::rpc::pb::JobStatus) -> serde_json::Value {
    let workers: Vec<serde_json::Value> = s
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({"worker_id": w.worker_id, "hostname": w.hostname, "device": w.device,
                "state": w.state().name(), "rank": w.rank, "alive": w.alive, "pid": w.pid,
                "seconds_since_heartbeat": w.seconds_since_heartbeat})
        })
        .collect();
    let metrics: std::collections::BTreeMap<_, _> = s.metrics.iter().collect();
    serde_json::json!({"job_id": s.job_id, "phase": s.phase().name(), "generation": s.generation,
        "world_size": s.world_size, "workers": workers, "step": s.step, "total_steps": s.total_steps,
        "epoch": s.epoch, "metrics": metrics, "samples_per_sec": s.samples_per_sec, "eta_secs": s.eta_secs,
        "shards_done": s.shards_done, "shards_total": s.shards_total, "last_checkpoint": s.last_checkpoint,
        "skipped_rows": s.skipped_rows, "recent_errors": s.recent_errors, "message": s.message})
}

fn status_table(s: &ddpo::rpc::pb::JobStatus) -> String {
    let mut out = format!(
        "job {}  phase {}  generation {}  world {}\n{}\nstep {}/{}  epoch {:.2}  {:.2} pairs/s  ETA {:.0} s\n\
         precompute {}/{} shards  skipped rows {}  last checkpoint {}\n",
        s.job_id,
        s.phase().name(),
        s.generation,
        s.world_size,
        s.message,
        s.step,
        s.total_steps,
        s.epoch,
        s.samples_per_sec,
        s.eta_secs,
        s.shards_done,
        s.shards_total,
        s.skipped_rows,
        if s.last_checkpoint.is_empty() { "-" } else { &s.last_checkpoint }
    );
    out += &format!(
        "{:<24} {:<10} {:>4} {:<14} {:>6} {:>8}\n",
        "WORKER", "DEVICE", "RANK", "STATE", "ALIVE", "LAST HB"
    );
    for w in &s.workers {
        out += &format!(
            "{:<24} {:<10} {:>4} {:<14} {:>6} {:>7.1}s\n",
            w.worker_id,
            w.device,
            if w.rank < 0 {
                "-".to_string()
            } else {
                w.rank.to_string()
            },
            w.state().name(),
            if w.alive { "yes" } else { "no" },
            w.seconds_since_heartbeat
        );
    }
    let keys = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "eval/loss",
        "eval/rewards/accuracies",
    ];
    let shown: Vec<String> = keys
        .iter()
        .filter_map(|k| s.metrics.get(*k).map(|v| format!("{k} {v:.4}")))
        .collect();
    if !shown.is_empty() {
        out += &format!("metrics: {}\n", shown.join("  "));
    }
    for e in &s.recent_errors {
        out += &format!("error: {e}\n");
    }
    out
}

fn cmd_status(url: &str, json: bool, watch: bool, interval_ms: u32) -> Result<ExitCode> {
    use ddpo::rpc::pb;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut c = pb::coordinator_client::CoordinatorClient::connect(url.to_string())
            .await
            .with_context(|| format!("connecting to the coordinator at {url}"))?;
        let show = |s: &pb::JobStatus| {
            if json {
                println!("{}", status_json(s));
            } else {
                println!("{}", status_table(s));
            }
        };
        if watch {
            let mut stream = c
                .watch_status(pb::WatchStatusRequest {
                    interval_millis: interval_ms,
                })
                .await?
                .into_inner();
            while let Some(s) = stream.message().await? {
                show(&s);
            }
        } else {
            let s = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
            show(&s);
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn parse_device(s: &str) -> Result<tch::Device> {
    Ok(ddpo::config::parse_device(s)?)
}

/// Loads and fully checks a job config (keys, ranges, files), printing problems like `validate` does.
fn load_config(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    let problems = ddpo::data::check_files(&cfg);
    if !problems.is_empty() {
        bail!(
            "config {}: {} problem(s):\n  - {}",
            path.display(),
            problems.len(),
            problems.join("\n  - ")
        );
    }
    Ok(cfg)
}

fn cmd_generate(args: &ddpo::generate::GenerateArgs) -> Result<ExitCode> {
    let report = ddpo::generate::run_generate_command(args)?;
    println!("{report}");
    println!("answers: {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn cmd_precompute(path: &Path, device: &str) -> Result<ExitCode> {
    let cfg = load_config(path)?;
    let device = parse_device(device)?;
    let t = Instant::now();
    let report = ddpo::refcache::precompute(&cfg, device)?;
    println!("{report}");
    println!("precompute done in {:.1} s", t.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn cmd_train(
    path: &Path,
    device: &str,
    max_steps: Option<usize>,
    log_format: LogFormat,
    sft: bool,
) -> Result<ExitCode> {
    let mut cfg = load_config(path)?;
    if sft {
        cfg.ddpo.loss = ddpo::config::LossKind::Sft;
    }
    let device = parse_device(device)?;
    let t = Instant::now();
    let progress_bar =
        std::io::IsTerminal::is_terminal(&std::io::stderr()) && log_format == LogFormat::Text;
    let report = ddpo::train::train(
        &cfg,
        &ddpo::train::TrainOptions {
            device,
            max_steps,
            progress_bar,
        },
    )?;
    if let Some(from) = report.resumed_from {
        println!("resumed from step {from}");
    }
    println!(
        "trained {}/{} steps ({} skipped) in {:.1} s; checkpoint {}",
        report.steps,
        report.total_steps,
        report.skipped_steps,
        t.elapsed().as_secs_f64(),
        report
            .last_checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    for (k, v) in report.last_metrics.iter().chain(report.last_eval.iter()) {
        println!("  {k} = {v:.6}");
    }
    println!(
        "metrics: {}",
        cfg.train.output_dir.join("metrics.jsonl").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_validate(path: &Path) -> Result<ExitCode> {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    println!("config {}: keys and ranges ok", path.display());
    let problems = ddpo::data::check_files(&cfg);
    if !problems.is_empty() {
        eprintln!(
            "config {}: {} problem(s):\n  - {}",
            path.display(),
            problems.len(),
            problems.join("\n  - ")
        );
        return Ok(ExitCode::FAILURE);
    }
    let pre =
        Preprocessor::from_config(&cfg).context("loading the model's tokenizer and processors")?;
    println!(
        "model {}: tokenizer, config and image processor ok",
        cfg.model.path.display()
    );
    let mut failed = false;
    for (key, pats) in [
        ("data.train", &cfg.data.train),
        ("data.eval", &cfg.data.eval),
    ] {
        if pats.is_empty() {
            continue;
        }
        let files = shards::discover(pats).with_context(|| key.to_string())?;
        failed |= validate_split(key, &pre, files, cfg.data.on_bad_row)?;
    }
    if let Some(mib) = peak_rss_mib() {
        println!("peak memory: {mib:.1} MiB");
    }
    if failed {
        println!("validation FAILED");
        Ok(ExitCode::FAILURE)
    } else {
        println!("validation passed");
        Ok(ExitCode::SUCCESS)
    }
}

/// Streams every row of one split; returns whether anything was wrong.
fn validate_split(
    key: &str,
    pre: &Preprocessor,
    files: Vec<PathBuf>,
    policy: OnBadRow,
) -> Result<bool> {
    let n_files = files.len();
    let t = Instant::now();
    // Validation sees every row whatever the policy, so it always streams in skip mode.
    let mut stream = ExampleStream::new(pre, files, OnBadRow::Skip);
    let (mut prompt, mut resp, mut changed) = (0usize, 0usize, 0usize);
    let mut shard_errors = Vec::new();
    for item in stream.by_ref() {
        match item {
            Ok(ex) => {
                prompt += ex.prompt_ids.len();
                resp += ex.chosen_ids.len() + ex.rejected_ids.len();
                changed += ex.chosen_changed.iter().filter(|&&c| c).count()
                    + ex.rejected_changed.iter().filter(|&&c| c).count();
            }
            Err(e) => shard_errors.push(e.to_string()),
        }
    }
    let s = &stream.stats;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{key}: {n_files} shard(s), {} rows: {} ok, {} bad, {} truncated to data.max_length; {:.1} pairs/s",
        s.rows,
        s.ok,
        s.skipped,
        s.truncated,
        s.rows as f64 / secs.max(1e-9)
    );
    for (p, layout) in &stream.layouts {
        println!("  {}: {} layout", p.display(), layout.name());
    }
    if s.ok > 0 {
        println!(
            "  mean prompt {:.1} tokens, mean response {:.1} tokens, {:.1}% of response tokens in changed segments",
            prompt as f64 / s.ok as f64,
            resp as f64 / (2 * s.ok) as f64,
            100.0 * changed as f64 / resp.max(1) as f64
        );
    }
    for e in &shard_errors {
        println!("  shard error: {e}");
    }
    for e in &s.first_errors {
        println!("  bad row: {e}");
    }
    if s.skipped as usize > s.first_errors.len() {
        println!(
            "  … and {} more bad rows (all are in the log)",
            s.skipped as usize - s.first_errors.len()
        );
    }
    if s.skipped > 0 {
        println!(
            "  with data.on_bad_row = {:?} training would {} them",
            policy,
            match policy {
                OnBadRow::Skip => "skip",
                OnBadRow::Fail => "stop at the first of",
            }
        );
    }
    if s.rows == 0 && shard_errors.is_empty() {
        bail!("{key}: the shards hold no rows");
    }
    Ok(s.skipped > 0 || !shard_errors.is_empty())
}

/// Peak resident memory of this process in MiB (Linux), for reports.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
