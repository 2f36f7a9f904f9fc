//! `ddpo generate`: a model's answers to the questions of preference shards (RLHF-V / RLAIF-V layouts) or of a
//! prompts file, K samples each, written to one parquet file (question, image, sample, response text and ids).
//! The binary parses the flags and calls [`run_generate_command`].
//!
//! Invariants: prompts are encoded exactly as training encodes them (chat template, image processor, the
//! model's image-token expansion); the output file is complete or absent (written under a temporary name and
//! renamed); a bad input row is skipped and reported with its file and row, never silently dropped.

mod output;
mod prompts;

use std::path::PathBuf;
use std::time::Instant;

use tch::Tensor;

use crate::config::{parse_device, Dtype};
use crate::data::pipeline::Preprocessor;
use crate::model::generate::{GenerateOptions, Sampling};
use crate::model::llava::Llava;
pub use output::{read_answers, write_answers, AnswerRow};
pub use prompts::{Prompt, PromptSource};

/// Why `ddpo generate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A flag's value (names the flag).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The prompts file: its path, line and what is wrong.
    #[error("{}: line {line}: {reason}", path.display())]
    Prompts {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
}

/// `ddpo generate`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Model directory (llava-hf layout: config.json, weights, tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Parquet shards (paths or globs, comma-separated) whose questions and images are the prompts.
    #[arg(long, value_delimiter = ',', required_unless_present = "prompts")]
    pub data: Vec<String>,
    /// A JSON-lines file of prompts instead: {"image": PATH, "question": TEXT, "id": TEXT (optional)}; a
    /// relative image path is relative to the file.
    #[arg(long, conflicts_with = "data")]
    pub prompts: Option<PathBuf>,
    /// Output parquet file.
    #[arg(long)]
    pub out: PathBuf,
    /// Answers per prompt (their image and prompt are encoded once).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// 0 decodes greedily; above 0, samples from the softmax at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pad images to a square before the image processor (LLaVA-1.5's expand2square).
    #[arg(long)]
    pub pad_to_square: bool,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// Model loading and decoding flags shared by `ddpo generate` and `ddpo evaluate`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts per forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `fp32` or `bf16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Chat template: llava_v1 or llava_hf.
    #[arg(long, default_value = "llava_v1")]
    pub template: String,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateReport {
    pub prompts: usize,
    pub answers: usize,
    pub skipped: usize,
    pub new_tokens: u64,
    pub seconds: f64,
}

impl GenerateArgs {
    fn options(&self, eos_id: i64, pad_id: i64) -> Result<GenerateOptions, GenerateError> {
        let usage = |m: String| Err(GenerateError::Usage(m));
        if self.samples == 0 || self.decode.batch_size == 0 || self.decode.max_new_tokens == 0 {
            return usage("--samples, --batch-size and --max-new-tokens must be >= 1".into());
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return usage(format!("--temperature {}: must be >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return usage(format!("--top-p {}: must be in (0, 1]", self.top_p));
        }
        let sampling = if self.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
            }
        };
        Ok(GenerateOptions {
            max_new_tokens: self.decode.max_new_tokens,
            sampling,
            samples: self.samples,
            seed: self.seed,
            eos_id,
            pad_id,
        })
    }

    fn dtype(&self) -> Result<Dtype, GenerateError> {
        match self.decode.dtype.as_str() {
            "auto" => Ok(Dtype::Auto),
            "fp32" => Ok(Dtype::Fp32),
            "bf16" => Ok(Dtype::Bf16),
            d => Err(GenerateError::Usage(format!(
                "--dtype {d:?}: expected auto, fp32 or bf16"
            ))),
        }
    }
}

/// Runs `ddpo generate`: loads the model, answers every prompt, writes `args.out`.
pub fn run_generate_command(args: &GenerateArgs) -> Result<GenerateReport, GenerateError> {
    let device =
        parse_device(&args.decode.device).map_err(|e| GenerateError::Usage(e.to_string()))?;
    let kind = args.dtype()?.weight_kind(device);
    let pre = Preprocessor::from_model_dir(
        &args.model,
        &args.decode.template,
        usize::MAX / 2,
        args.pad_to_square,
        1,
    )?;
    let opts = args.options(i64::from(pre.text.eos_id()), i64::from(pre.pad_id()))?;
    let source = match &args.prompts {
        Some(file) => PromptSource::file(file)?,
        None => PromptSource::shards(&args.data)?,
    };
    let (_vs, model) = Llava::load(&args.model, device, kind)?;
    let start = Instant::now();
    let mut out = output::Writer::create(&args.out)?;
    let mut report = GenerateReport {
        prompts: 0,
        answers: 0,
        skipped: 0,
        new_tokens: 0,
        seconds: 0.0,
    };
    let mut last_log = Instant::now();
    let mut prompts = source.encoded(&pre);
    loop {
        let batch = prompts.next_batch(args.decode.batch_size, &mut report.skipped);
        if batch.is_empty() {
            break;
        }
        let answers = answer(&model, &pre, &batch, &opts, device);
        for (p, samples) in batch.iter().zip(answers) {
            report.prompts += 1;
            for (k, ids) in samples.into_iter().enumerate() {
                report.answers += 1;
                report.new_tokens += ids.len() as u64;
                out.push(p, k, &ids, &pre, opts.eos_id)?;
            }
        }
        if last_log.elapsed().as_secs_f64() >= 10.0 {
            last_log = Instant::now();
            log_progress(&report, start);
        }
    }
    out.finish()?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// One batch through the model: the prompts' ids and images, the answers per prompt and sample.
fn answer(
    model: &Llava,
    pre: &Preprocessor,
    batch: &[prompts::Encoded],
    opts: &GenerateOptions,
    device: tch::Device,
) -> Vec<Vec<Vec<i64>>> {
    let (h, w) = pre.image_hw();
    let pixels: Vec<Tensor> = batch
        .iter()
        .map(|p| Tensor::from_slice(&p.pixel_values))
        .collect();
    let pixels = Tensor::stack(&pixels, 0)
        .view([batch.len() as i64, 3, h as i64, w as i64])
        .to_device(device);
    let ids: Vec<Vec<i64>> = batch
        .iter()
        .map(|p| p.prompt_ids.iter().map(|&i| i64::from(i)).collect())
        .collect();
    model.generate(&ids, &pixels, opts)
}

fn log_progress(r: &GenerateReport, start: Instant) {
    let s = start.elapsed().as_secs_f64().max(1e-9);
    tracing::info!(
        prompts = r.prompts,
        answers = r.answers,
        skipped = r.skipped,
        prompts_per_sec = format!("{:.2}", r.prompts as f64 / s),
        tokens_per_sec = format!("{:.1}", r.new_tokens as f64 / s),
        "generating"
    );
}

impl std::fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.seconds.max(1e-9);
        write!(
            f,
            "{} prompts, {} answers ({} new tokens, {:.1} tokens/s), {} rows skipped, {:.1} s",
            self.prompts,
            self.answers,
            self.new_tokens,
            self.new_tokens as f64 / s,
            self.skipped,
            self.seconds
        )
    }
}
