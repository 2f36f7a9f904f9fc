//! `ddpo evaluate`: how often a model hallucinates about synthetic scenes. Answers (generated here, greedy, or
//! read from a `ddpo generate` file) are scored claim by claim against each row's stored scene
//! (`data::synth::truth`): the share of answers with at least one false claim (CHAIR_s-like), the share of
//! false claims among all claims (CHAIR_i-like), rates per kind (object, colour, count, position) and coverage
//! (the share of true groups mentioned correctly, so saying nothing does not score well). The binary parses
//! flags and calls [`run_evaluate_command`].

use std::path::PathBuf;

use crate::data::shards;
use crate::data::synth::truth::{self, Rates, Totals};
use crate::generate::{self, DecodeArgs, GenerateArgs};

/// Why `ddpo evaluate` stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Generate(#[from] generate::GenerateError),
    /// An answer whose prompt id is in no scene file.
    #[error("{}: answer for id {id:?} has no scene in the data", path.display())]
    UnknownId { path: PathBuf, id: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `ddpo evaluate`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EvaluateArgs {
    /// Shards made by `ddpo synth` (paths or globs, comma-separated): the prompts and their scenes.
    #[arg(long, value_delimiter = ',', required = true)]
    pub data: Vec<String>,
    /// Model to generate the answers with (greedy), unless --responses is given.
    #[arg(long, required_unless_present = "responses")]
    pub model: Option<PathBuf>,
    /// Score the answers of this `ddpo generate` file instead of generating.
    #[arg(long, conflicts_with = "model")]
    pub responses: Option<PathBuf>,
    /// Where the generated answers go (default: next to --out, or `answers.parquet`).
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Reference model (the one DDPO started from): also report the held-out reward accuracy of --model
    /// against it on the data's preference pairs.
    #[arg(long, requires = "model")]
    pub reference: Option<PathBuf>,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// The report: rates over the answers, and the held-out reward accuracy when a reference was given.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub rates: Rates,
    /// Share of the data's preference pairs whose DDPO reward margin (model vs `--reference`, the paper's
    /// weighting: γ = 5, mean scores) is positive; `None` without `--reference`.
    pub reward_accuracy: Option<f64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.rates)?;
        if let Some(a) = self.reward_accuracy {
            write!(
                f,
                "\nreward accuracy    {a:.4}  (held-out pairs, vs the reference)"
            )?;
        }
        Ok(())
    }
}

/// The share of `files`' preference pairs on which `model` prefers the chosen answer more than `reference`
/// does (DDPO margin > 0 with the default `[ddpo]` weighting), in batches of `decode.batch_size` pairs.
fn reward_accuracy(
    files: &[PathBuf],
    model: &std::path::Path,
    reference: &std::path::Path,
    decode: &DecodeArgs,
) -> Result<f64, EvaluateError> {
    use crate::data::pipeline::{ExampleStream, Preprocessor};
    let device = crate::config::parse_device(&decode.device)
        .map_err(|e| generate::GenerateError::Usage(e.to_string()))?;
    let kind = decode.dtype.weight_kind(device);
    let cfg = crate::config::DdpoConfig::default();
    let pre = Preprocessor::from_model_dir(model, &decode.template, 4096, false, cfg.min_match)?;
    let load = |dir: &std::path::Path| crate::model::llava::Llava::load(dir, device, kind);
    let ((_pv, policy), (_rv, refm)) = (
        load(model).map_err(generate::GenerateError::from)?,
        load(reference).map_err(generate::GenerateError::from)?,
    );
    let mut sums = crate::ddpo::MetricSums::default();
    let mut stream = ExampleStream::new(&pre, files.to_vec(), crate::config::OnBadRow::Skip);
    loop {
        // Streamed in batches: a large held-out set is never all in memory.
        let chunk: Vec<_> = stream
            .by_ref()
            .take(decode.batch_size.max(1))
            .collect::<Result<_, _>>()?;
        if chunk.is_empty() {
            break;
        }
        let batch = crate::data::collate::collate(&chunk, pre.pad_id(), pre.image_hw(), true)
            .to_device(device);
        let t = tch::no_grad(|| {
            let p = crate::logps::batch_logps(&policy, &batch);
            let r = crate::logps::batch_logps(&refm, &batch);
            crate::ddpo::pair_terms(&p, &r, &batch, &cfg)
        });
        sums.add(&t, batch.response_tokens);
    }
    let named = sums.named("");
    Ok(named
        .iter()
        .find(|(k, _)| k == "rewards/accuracies")
        .map_or(0.0, |(_, v)| *v))
}

/// Runs `ddpo evaluate`: answers (generated or given) scored against the scenes of `args.data`.
pub fn run_evaluate_command(args: &EvaluateArgs) -> Result<Report, EvaluateError> {
    let files = shards::discover(&args.data)?;
    let scenes = truth::read_scenes(&files)?;
    let answers_file = match (&args.responses, &args.model) {
        (Some(r), _) => r.clone(),
        (None, Some(model)) => {
            let out = args.answers.clone().unwrap_or_else(|| {
                let dir = args
                    .out
                    .as_ref()
                    .and_then(|o| o.parent())
                    .map(PathBuf::from);
                dir.unwrap_or_default().join("answers.parquet")
            });
            let g = generate::run_generate_command(&GenerateArgs {
                model: model.clone(),
                data: args.data.clone(),
                prompts: None,
                out: out.clone(),
                samples: 1,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 0,
                pad_to_square: false,
                decode: args.decode.clone(),
            })?;
            tracing::info!("generated: {g}");
            out
        }
        (None, None) => unreachable!("clap requires --model or --responses"),
    };
    let answers = generate::read_answers(&answers_file)?;
    let mut totals = Totals::default();
    for a in &answers {
        let scene = scenes.get(&a.id).ok_or_else(|| EvaluateError::UnknownId {
            path: answers_file.clone(),
            id: a.id.clone(),
        })?;
        totals.add(&truth::score(&a.response, scene));
    }
    let reward_accuracy = match (&args.reference, &args.model) {
        (Some(r), Some(m)) => Some(reward_accuracy(&files, m, r, &args.decode)?),
        _ => None,
    };
    let report = Report {
        rates: totals.rates(),
        reward_accuracy,
    };
    if let Some(out) = &args.out {
        let json = serde_json::to_vec_pretty(&report).expect("a report serialises");
        crate::util::fsx::write_atomic(out, &json).map_err(|source| EvaluateError::Io {
            path: out.clone(),
            source,
        })?;
    }
    Ok(report)
}
