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
    #[command(flatten)]
    pub decode: DecodeArgs,
}

/// The report: rates over the answers.
pub type Report = Rates;

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
    let report = totals.rates();
    if let Some(out) = &args.out {
        let json = serde_json::to_vec_pretty(&report).expect("a report serialises");
        crate::util::fsx::write_atomic(out, &json).map_err(|source| EvaluateError::Io {
            path: out.clone(),
            source,
        })?;
    }
    Ok(report)
}
