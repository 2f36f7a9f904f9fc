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
    /// A JSON-lines file of prompts instead: {"image": PATH, "question": TEXT, "id": TEXT (optional)}, a
    /// relative image path being relative to the file; or a benchmark's prompts file as RLHF-V ships them
    /// (`image` as base64 or `image_path`, `question` or `prompt`, `image_id`, `question_id`).
    #[arg(long, conflicts_with = "data")]
    pub prompts: Option<PathBuf>,
    /// Output file: parquet (docs/formats.md), or JSON lines in the format RLHF-V's benchmark scripts read
    /// when it ends in `.jsonl` (Object HalBench, MMHal-Bench).
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
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Chat template: llava_v1 or llava_hf.
    #[arg(long, default_value = "llava_v1")]
    pub template: String,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
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
        let sampling = Sampling::from_settings(self.temperature, self.top_k, self.top_p);
        Ok(GenerateOptions {
            max_new_tokens: self.decode.max_new_tokens,
            sampling,
            samples: self.samples,
            seed: self.seed,
            eos_id,
            pad_id,
            first_index: 0,
        })
    }
}

/// Runs `ddpo generate`: loads the model, answers every prompt, writes `args.out`.
pub fn run_generate_command(args: &GenerateArgs) -> Result<GenerateReport, GenerateError> {
    let device =
        parse_device(&args.decode.device).map_err(|e| GenerateError::Usage(e.to_string()))?;
    let kind = args.decode.dtype.weight_kind(device);
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
    let run = Decoding {
        model_id: dir_name(&args.model),
        model: &model,
        pre: &pre,
        opts,
        batch_size: args.decode.batch_size,
        device,
    };
    run.write(&source, &args.out)
}

/// One shard of a generation job (`generate.prompts`): its answers into
/// `<generate.out_dir>/<shard stem>.answers.parquet`, written atomically, with the job's settings; a shard whose
/// answers file exists is done already (a re-leased shard after a worker died mid-way is redone from scratch).
pub fn generate_shard(
    cfg: &crate::config::Config,
    model: &Llava,
    shard: &std::path::Path,
    device: tch::Device,
) -> Result<GenerateReport, GenerateError> {
    let out = answers_file(cfg, shard);
    if out.exists() {
        return Ok(GenerateReport::default());
    }
    // The shard is leased to one worker at a time: temporary files of its answers belong to a lessee that died.
    crate::util::fsx::remove_temp_siblings(&out);
    let pre = Preprocessor::from_model_dir(
        &cfg.model.path,
        &cfg.data.template,
        usize::MAX / 2,
        cfg.data.pad_to_square,
        1,
    )?;
    let g = &cfg.generate;
    let sampling = Sampling::from_settings(g.temperature, g.top_k, g.top_p);
    let opts = GenerateOptions {
        max_new_tokens: g.max_new_tokens,
        sampling,
        samples: g.samples,
        seed: g.seed,
        eos_id: i64::from(pre.text.eos_id()),
        pad_id: i64::from(pre.pad_id()),
        first_index: 0,
    };
    let run = Decoding {
        model_id: dir_name(&cfg.model.path),
        model,
        pre: &pre,
        opts,
        batch_size: g.batch_size,
        device,
    };
    run.write(&PromptSource::Shards(vec![shard.to_owned()]), &out)
}

fn dir_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where a generation job writes a prompt shard's answers.
pub fn answers_file(cfg: &crate::config::Config, shard: &std::path::Path) -> PathBuf {
    let stem = shard.file_stem().map(|s| s.to_string_lossy().into_owned());
    cfg.generate
        .out_dir
        .join(format!("{}.answers.parquet", stem.unwrap_or_default()))
}

/// A loaded model, its prompt encoding and the decoding settings.
struct Decoding<'a> {
    /// The model directory's name, for answers in the RLHF-V format (`model_id`).
    model_id: String,
    model: &'a Llava,
    pre: &'a Preprocessor,
    opts: GenerateOptions,
    batch_size: usize,
    device: tch::Device,
}

impl Decoding<'_> {
    /// Answers every prompt of `source` into the answers file `out` (complete or absent).
    fn write(
        mut self,
        source: &PromptSource,
        out: &std::path::Path,
    ) -> Result<GenerateReport, GenerateError> {
        let start = Instant::now();
        let mut writer = output::Writer::create(out, &self.model_id)?;
        let mut report = GenerateReport::default();
        let mut last_log = Instant::now();
        let mut prompts = source.encoded(self.pre);
        loop {
            let batch = prompts.next_batch(self.batch_size, &mut report.skipped);
            if batch.is_empty() {
                break;
            }
            self.opts.first_index = report.prompts as u64;
            let answers = answer(self.model, self.pre, &batch, &self.opts, self.device);
            for (p, samples) in batch.iter().zip(answers) {
                report.prompts += 1;
                for (k, ids) in samples.into_iter().enumerate() {
                    report.answers += 1;
                    report.new_tokens += ids.len() as u64;
                    writer.push(p, k, &ids, self.pre)?;
                }
            }
            if last_log.elapsed().as_secs_f64() >= 10.0 {
                last_log = Instant::now();
                log_progress(&report, start);
            }
        }
        writer.finish()?;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// One batch through the model: the prompts' ids and images, the answers per prompt and sample.
fn answer(
    model: &Llava,
    pre: &Preprocessor,
    batch: &[prompts::Encoded],
    opts: &GenerateOptions,
    device: tch::Device,
) -> Vec<Vec<Vec<i64>>> {
    let prompts = batch
        .iter()
        .map(|p| (p.prompt_ids.as_slice(), p.pixel_values.as_slice()));
    let (ids, pixels) = crate::data::collate::prompt_batch(prompts, pre.image_hw());
    let pixels = pixels.to_device(device);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    fn args(extra: &[&str]) -> Result<GenerateArgs, clap::Error> {
        let base = [
            "ddpo",
            "--model",
            "m",
            "--data",
            "d.parquet",
            "--out",
            "o.parquet",
        ];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        let usage = |extra: &[&str]| args(extra).unwrap().options(2, 0).unwrap_err().to_string();
        assert!(usage(&["--samples", "0"]).contains("--samples"));
        assert!(usage(&["--top-p", "0"]).contains("--top-p 0"));
        assert!(usage(&["--temperature=-1"]).contains("--temperature -1"));
        assert!(args(&["--dtype", "fp16"])
            .unwrap_err()
            .to_string()
            .contains("fp16"));
        let ok = args(&["--temperature", "0.7", "--top-k", "5"])
            .unwrap()
            .options(2, 0)
            .unwrap();
        assert_eq!(
            ok.sampling,
            Sampling::Sample {
                temperature: 0.7,
                top_k: 5,
                top_p: 1.0
            }
        );
        assert_eq!(
            args(&[]).unwrap().options(2, 0).unwrap().sampling,
            Sampling::Greedy
        );
    }
}
