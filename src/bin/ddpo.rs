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
use ddpo::model::preset;

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
    Plan(PlanArgs),
}

fn main() -> ExitCode {
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
        Cmd::Plan(args) => cmd_plan(args),
        Cmd::Precompute { config, device } => cmd_precompute(&config, &device),
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
        } => cmd_train(&config, &device, max_steps, log_format),
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
                "state": w.state, "rank": w.rank, "alive": w.alive, "pid": w.pid,
                "seconds_since_heartbeat": w.seconds_since_heartbeat})
        })
        .collect();
    let metrics: std::collections::BTreeMap<_, _> = s.metrics.iter().collect();
    serde_json::json!({"job_id": s.job_id, "phase": s.phase, "generation": s.generation,
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
        s.phase,
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
            w.state,
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
    ddpo::config::parse_device(s).map_err(anyhow::Error::msg)
}

/// Loads and fully checks a job config (keys, ranges, files), printing problems like `validate` does.
fn load_config(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    let problems = cfg.check_files();
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
) -> Result<ExitCode> {
    let cfg = load_config(path)?;
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
    let problems = cfg.check_files();
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

#[derive(clap::Args)]
struct PlanArgs {
    /// Job config: model (its config.json only), data.max_length, train.*, reference.mode, world size.
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// tiny, small, 1b, llava-1.5-7b, llava-1.5-13b (comma-separated for a table).
    #[arg(long)]
    preset: Option<String>,
    /// Data-parallel ranks (default: cluster.world_size, or 1).
    #[arg(long)]
    world: Option<String>,
    /// 0, 1 or 2 (default: train.zero_stage, or 0).
    #[arg(long)]
    zero_stage: Option<String>,
    /// fp32 or bf16 (default: model.dtype as training resolves it for the device: bf16 on CUDA).
    #[arg(long)]
    dtype: Option<String>,
    #[arg(long)]
    micro_batch_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// The sequence bound (default: data.max_length, or 2048).
    #[arg(long)]
    max_length: Option<usize>,
    /// Plan for measured lengths instead of the max_length bound: prompt tokens (visual tokens
    /// included) and tokens per response, e.g. the means `ddpo validate` prints.
    #[arg(long, requires = "response_tokens")]
    prompt_tokens: Option<usize>,
    #[arg(long, requires = "prompt_tokens")]
    response_tokens: Option<usize>,
    /// With --config: measure the lengths of the longest pair of the training data.
    #[arg(long, requires = "config")]
    measure: bool,
    /// Frozen parts, comma-separated: vision_tower, projector, language_model.
    #[arg(long, value_delimiter = ',')]
    freeze: Option<Vec<String>>,
    /// cached or online.
    #[arg(long)]
    reference: Option<String>,
    /// true or false (default: train.shared_prefix, or true).
    #[arg(long)]
    shared_prefix: Option<bool>,
    /// cpu or cuda (default: auto with --config, cuda with --preset). Needs no such device here.
    #[arg(long)]
    device: Option<String>,
    /// Device memory to plan against, GiB (default: detected; DDPO_DEVICE_MEMORY_BYTES also works).
    #[arg(long)]
    device_memory_gib: Option<f64>,
}

/// A comma-separated list of numbers.
fn number_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| {
            x.trim().parse().map_err(|_| {
                anyhow::anyhow!("--{flag} {s:?}: expected numbers separated by commas")
            })
        })
        .collect()
}

fn cmd_plan(a: PlanArgs) -> Result<ExitCode> {
    use ddpo::config::{Dtype, FreezeTarget, ReferenceMode};
    use ddpo::memplan::{
        self, DeviceMemory, Lengths, LoraPlan, MemoryPlan, PlanDevice, PlanInput, WeightDtype,
    };
    /// The LoRA column's adapter rank (PEFT's and LLaVA's usual recipes use 8–128).
    const LORA_COLUMN_RANK: usize = 16;

    // The device kind to plan for (no such device is needed here) and the one to detect memory on.
    let device = match a.device.as_deref() {
        None if a.config.is_some() => tch::Device::cuda_if_available(),
        None | Some("cuda") => tch::Device::Cuda(0),
        Some("cpu") => tch::Device::Cpu,
        Some(other) => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
        },
    };
    let plan_device = PlanDevice::of(device);
    // One base input per model, from the config or the preset.
    let mut bases: Vec<PlanInput> = Vec::new();
    let mut worlds = vec![1usize];
    let mut stages = vec![0u8];
    if let Some(path) = &a.config {
        let cfg = Config::load(path)?;
        let model = ddpo::model::config::LlavaConfig::from_dir(&cfg.model.path)
            .map_err(anyhow::Error::msg)?;
        let kind = ddpo::train::weight_kind(cfg.model.dtype, device);
        let mut input = PlanInput::from_config(
            &cfg,
            cfg.model.path.display().to_string(),
            model,
            plan_device,
            WeightDtype::of(kind),
            cfg.cluster.world_size,
        );
        worlds = vec![cfg.cluster.world_size];
        stages = vec![cfg.train.zero_stage];
        if a.measure {
            let (longest, _) = memplan::measure_lengths(&cfg).map_err(anyhow::Error::msg)?;
            input.lengths = longest;
        }
        bases.push(input);
    } else {
        let names = a.preset.as_deref().unwrap_or_default();
        for name in names.split(',').map(str::trim) {
            let model = memplan::architecture(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "--preset {name:?}: unknown; known: {}",
                    memplan::ARCHITECTURES.join(", ")
                )
            })?;
            let dtype = WeightDtype::of(ddpo::train::weight_kind(Dtype::Auto, device));
            bases.push(PlanInput::for_architecture(name, model, dtype, plan_device));
        }
    }
    if let Some(w) = &a.world {
        worlds = number_list("world", w)?;
    }
    if let Some(z) = &a.zero_stage {
        stages = number_list("zero-stage", z)?;
        if let Some(bad) = stages.iter().find(|&&s| s > 2) {
            bail!("--zero-stage {bad}: must be 0, 1 or 2");
        }
    }
    if worlds.contains(&0) {
        bail!("--world 0: must be >= 1");
    }
    for input in bases.iter_mut() {
        if let Some(d) = &a.dtype {
            input.dtype = match d.as_str() {
                "fp32" => WeightDtype::Fp32,
                "bf16" => WeightDtype::Bf16,
                other => bail!("--dtype {other:?}: expected fp32 or bf16"),
            };
        }
        if let Some(m) = a.micro_batch_size {
            input.micro_batch_size = m.max(1);
        }
        if let Some(b) = a.batch_size {
            input.batch_size = b.max(1);
        }
        if let Some(l) = a.max_length {
            input.lengths = Lengths::bound(&input.model, l);
        }
        if let Some((p, r)) = a.prompt_tokens.zip(a.response_tokens) {
            input.lengths = Lengths::measured(p, r, "given lengths");
        }
        if let Some(f) = &a.freeze {
            input.freeze = f
                .iter()
                .map(|x| match x.trim() {
                    "vision_tower" => Ok(FreezeTarget::VisionTower),
                    "projector" => Ok(FreezeTarget::Projector),
                    "language_model" => Ok(FreezeTarget::LanguageModel),
                    other => Err(anyhow::anyhow!(
                        "--freeze {other:?}: expected vision_tower, projector or language_model"
                    )),
                })
                .collect::<Result<_>>()?;
        }
        if let Some(r) = &a.reference {
            input.reference = match r.as_str() {
                "cached" => ReferenceMode::Cached,
                "online" => ReferenceMode::Online,
                other => bail!("--reference {other:?}: expected cached or online"),
            };
        }
        if let Some(sp) = a.shared_prefix {
            input.shared_prefix = sp;
        }
    }
    let memory = match a.device_memory_gib {
        Some(g) if g > 0.0 => Some(DeviceMemory {
            bytes: (g * (1u64 << 30) as f64) as u64,
            source: format!("--device-memory-gib {g}"),
        }),
        Some(g) => bail!("--device-memory-gib {g}: must be > 0"),
        None => memplan::device_memory(device),
    };

    let mut combos: Vec<PlanInput> = Vec::new();
    for b in &bases {
        for &world in &worlds {
            for &zero_stage in &stages {
                combos.push(PlanInput {
                    world,
                    zero_stage,
                    ..b.clone()
                });
            }
        }
    }
    if combos.len() == 1 {
        let plan = MemoryPlan::new(combos.into_iter().next().expect("one"));
        print!("{}", plan.table(memory.as_ref()));
        if let Some(m) = &memory {
            if plan.total > m.bytes {
                print!("{}", memplan::suggestions_text(&plan.input, m.bytes));
                return Ok(ExitCode::FAILURE);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let gib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 30) as f64);
    let fits_header = match &memory {
        Some(m) => format!("fits {} GiB", gib(m.bytes)),
        None => "fits".into(),
    };
    println!(
        "| model | {} | ZeRO | dtype | weights | gradients | fp32 masters | AdamW moments | activations | other | total per {} (GiB) | {fits_header} | LoRA total (GiB) |",
        if plan_device == PlanDevice::Cuda { "GPUs" } else { "ranks" },
        if plan_device == PlanDevice::Cuda { "GPU" } else { "rank" },
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for input in combos {
        // LoRA: the base frozen (no gradients, masters or moments for it), adapters of the default
        // settings on top.
        let lora = MemoryPlan::new(PlanInput {
            freeze: vec![
                FreezeTarget::VisionTower,
                FreezeTarget::Projector,
                FreezeTarget::LanguageModel,
            ],
            lora: LoraPlan::of(&ddpo::config::LoraConfig {
                rank: LORA_COLUMN_RANK,
                ..Default::default()
            }),
            ..input.clone()
        });
        let lora_fits = match &memory {
            Some(m) if lora.total <= m.bytes => " (fits)",
            Some(_) => " (**no**)",
            None => "",
        };
        let p = MemoryPlan::new(input);
        let i = &p.input;
        let listed = p.weights + p.gradients + p.masters + p.moments + p.activations.total();
        let fits = match &memory {
            Some(m) if p.total <= m.bytes => "yes",
            Some(_) => "**no**",
            None => "?",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {fits} | {}{lora_fits} |",
            i.name,
            i.world,
            i.zero_stage,
            i.dtype.name(),
            gib(p.weights),
            gib(p.gradients),
            gib(p.masters),
            gib(p.moments),
            gib(p.activations.total()),
            gib(p.total - listed),
            gib(p.total),
            gib(lora.total),
        );
    }
    let first = &bases[0];
    let freeze: Vec<&str> = first
        .freeze
        .iter()
        .map(|f| match f {
            FreezeTarget::VisionTower => "vision_tower",
            FreezeTarget::Projector => "projector",
            FreezeTarget::LanguageModel => "language_model",
        })
        .collect();
    println!(
        "\nGiB per {}; micro_batch_size {}, {}, shared_prefix {}, reference {}, frozen: {}; other = runtime \
         overhead, backward and update transients, communication bucket{}. LoRA: total per device with the base \
         frozen and only adapters trained (rank {LORA_COLUMN_RANK} on q/k/v/o_proj, no dropout).",
        if plan_device == PlanDevice::Cuda { "GPU" } else { "rank" },
        first.micro_batch_size,
        first.lengths.source,
        first.shared_prefix,
        match first.reference {
            ReferenceMode::Cached => "cached",
            ReferenceMode::Online => "online",
        },
        if freeze.is_empty() { "nothing (full fine-tuning)".to_string() } else { freeze.join(", ") },
        if plan_device == PlanDevice::Cpu { ", data feed" } else { "" },
    );
    Ok(ExitCode::SUCCESS)
}
