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
    },
    /// Write a random-initialised model directory of a built-in shape: weights (llava-hf layout),
    /// config.json, tokenizer and image-processor files.
    InitModel {
        #[arg(long)]
        out: PathBuf,
        /// `tiny` (tests, seconds on CPU) or `small` (benchmarks, LLaVA-1.5 scaled down).
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check a job: config keys and ranges, files, model directory, and every data row (layout, JSON, image
    /// decode, tokenization, diff). Reports bad rows with shard, row number and reason; exits non-zero on
    /// any problem.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format.unwrap_or_else(LogFormat::from_env));
    let result = match cli.cmd {
        Cmd::Synth {
            out,
            pairs,
            shards,
            seed,
            image_size,
            rows_per_group,
            prefix,
        } => cmd_synth(synth::SynthOptions {
            out_dir: out,
            pairs,
            shards,
            seed,
            image_size,
            rows_per_group,
            prefix,
        }),
        Cmd::InitModel { out, preset, seed } => cmd_init_model(&out, &preset, seed),
        Cmd::Validate { config } => cmd_validate(&config),
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
