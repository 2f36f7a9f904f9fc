//! `ddpo plan`: the memory plan of a job config or of named architectures, one plan or a table over world sizes
//! and ZeRO stages, next to the device memory. The binary only parses the flags and calls [`run_plan_command`].

use std::path::PathBuf;

use super::*;
use crate::config::{ConfigError, Dtype};

/// Why `ddpo plan` could not make a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A flag's value (names the flag).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model's config.json.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Reading the data to measure lengths.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("the training data holds no usable pair")]
    NoUsablePair,
    /// The job does not fit its device; the message carries the plan's table.
    #[error("{0}")]
    DoesNotFit(String),
}

/// `ddpo plan`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Job config: model (its config.json only), data.max_length, train.*, reference.mode, world size.
    #[arg(long, required_unless_present = "preset", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// tiny, small, 1b, llava-1.5-7b, llava-1.5-13b (comma-separated for a table).
    #[arg(long)]
    pub preset: Option<String>,
    /// Data-parallel ranks (default: cluster.world_size, or 1).
    #[arg(long)]
    pub world: Option<String>,
    /// 0, 1 or 2 (default: train.zero_stage, or 0).
    #[arg(long)]
    pub zero_stage: Option<String>,
    /// fp32 or bf16 (default: model.dtype as training resolves it for the device: bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// The sequence bound (default: data.max_length, or 2048).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Plan for measured lengths instead of the max_length bound: prompt tokens (visual tokens
    /// included) and tokens per response, e.g. the means `ddpo validate` prints.
    #[arg(long, requires = "response_tokens")]
    pub prompt_tokens: Option<usize>,
    #[arg(long, requires = "prompt_tokens")]
    pub response_tokens: Option<usize>,
    /// With --config: measure the lengths of the longest pair of the training data.
    #[arg(long, requires = "config")]
    pub measure: bool,
    /// Frozen parts, comma-separated: vision_tower, projector, language_model.
    #[arg(long, value_delimiter = ',')]
    pub freeze: Option<Vec<String>>,
    /// cached or online.
    #[arg(long)]
    pub reference: Option<String>,
    /// true or false (default: train.shared_prefix, or true).
    #[arg(long)]
    pub shared_prefix: Option<bool>,
    /// cpu or cuda (default: auto with --config, cuda with --preset). Needs no such device here.
    #[arg(long)]
    pub device: Option<String>,
    /// Device memory to plan against, GiB (default: detected; DDPO_DEVICE_MEMORY_BYTES also works).
    #[arg(long)]
    pub device_memory_gib: Option<f64>,
}

/// A comma-separated list of numbers.
fn number_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>, PlanError> {
    s.split(',')
        .map(|x| {
            x.trim().parse().map_err(|_| {
                PlanError::Usage(format!(
                    "--{flag} {s:?}: expected numbers separated by commas"
                ))
            })
        })
        .collect()
}

/// `ddpo plan`: prints one plan (with suggestions when it does not fit) or a table over models, world sizes and
/// ZeRO stages. Returns false when a single plan does not fit the device memory.
pub fn run_plan_command(a: PlanArgs) -> Result<bool, PlanError> {
    let device = plan_device(&a)?;
    let (mut bases, mut worlds, mut stages) = base_inputs(&a, device)?;
    if let Some(w) = &a.world {
        worlds = number_list("world", w)?;
    }
    if let Some(z) = &a.zero_stage {
        stages = number_list("zero-stage", z)?;
        if let Some(bad) = stages.iter().find(|&&s| s > 2) {
            return Err(PlanError::Usage(format!(
                "--zero-stage {bad}: must be 0, 1 or 2"
            )));
        }
    }
    if worlds.contains(&0) {
        return Err(PlanError::Usage("--world 0: must be >= 1".into()));
    }
    for input in bases.iter_mut() {
        apply_overrides(&a, input)?;
    }
    let memory = match a.device_memory_gib {
        Some(g) if g > 0.0 => Some(DeviceMemory {
            bytes: (g * (1u64 << 30) as f64) as u64,
            source: format!("--device-memory-gib {g}"),
        }),
        Some(g) => {
            return Err(PlanError::Usage(format!(
                "--device-memory-gib {g}: must be > 0"
            )))
        }
        None => device_memory(device),
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
                print!("{}", suggestions_text(&plan.input, m.bytes));
                return Ok(false);
            }
        }
        return Ok(true);
    }
    print_table(&bases, combos, memory.as_ref(), PlanDevice::of(device));
    Ok(true)
}

/// The device kind to plan for (no such device is needed here) and the one to detect memory on.
fn plan_device(a: &PlanArgs) -> Result<tch::Device, PlanError> {
    Ok(match a.device.as_deref() {
        None if a.config.is_some() => tch::Device::cuda_if_available(),
        None | Some("cuda") => tch::Device::Cuda(0),
        Some("cpu") => tch::Device::Cpu,
        Some(other) => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => {
                return Err(PlanError::Usage(format!(
                    "--device {other:?}: expected cpu, cuda or cuda:N"
                )))
            }
        },
    })
}

/// Base inputs (one per model), world sizes, ZeRO stages.
type Bases = (Vec<PlanInput>, Vec<usize>, Vec<u8>);

/// One base input per model (from the config or the presets), and the world sizes and stages it implies.
fn base_inputs(a: &PlanArgs, device: tch::Device) -> Result<Bases, PlanError> {
    let plan_device = PlanDevice::of(device);
    // One base input per model, from the config or the preset.
    let mut bases: Vec<PlanInput> = Vec::new();
    let mut worlds = vec![1usize];
    let mut stages = vec![0u8];
    if let Some(path) = &a.config {
        let cfg = Config::load(path)?;
        let model = LlavaConfig::from_dir(&cfg.model.path)?;
        let kind = cfg.model.dtype.weight_kind(device);
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
            let (longest, _) = measure_lengths(&cfg)?;
            input.lengths = longest;
        }
        bases.push(input);
    } else {
        let names = a.preset.as_deref().unwrap_or_default();
        for name in names.split(',').map(str::trim) {
            let model = architecture(name).ok_or_else(|| {
                PlanError::Usage(format!(
                    "--preset {name:?}: unknown; known: {}",
                    ARCHITECTURES.join(", ")
                ))
            })?;
            let dtype = WeightDtype::of(Dtype::Auto.weight_kind(device));
            bases.push(PlanInput::for_architecture(name, model, dtype, plan_device));
        }
    }
    Ok((bases, worlds, stages))
}

/// The flags that override a base input's settings.
fn apply_overrides(a: &PlanArgs, input: &mut PlanInput) -> Result<(), PlanError> {
    if let Some(d) = &a.dtype {
        input.dtype = match d.as_str() {
            "fp32" => WeightDtype::Fp32,
            "bf16" => WeightDtype::Bf16,
            other => {
                return Err(PlanError::Usage(format!(
                    "--dtype {other:?}: expected fp32 or bf16"
                )))
            }
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
            .map(|x| {
                let x = x.trim();
                FreezeTarget::from_name(x).ok_or_else(|| {
                    PlanError::Usage(format!(
                        "--freeze {x:?}: expected vision_tower, projector or language_model"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(r) = &a.reference {
        input.reference = match r.as_str() {
            "cached" => ReferenceMode::Cached,
            "online" => ReferenceMode::Online,
            other => {
                return Err(PlanError::Usage(format!(
                    "--reference {other:?}: expected cached or online"
                )))
            }
        };
    }
    if let Some(sp) = a.shared_prefix {
        input.shared_prefix = sp;
    }
    Ok(())
}

/// The table over models, world sizes and ZeRO stages, with a LoRA column.
fn print_table(
    bases: &[PlanInput],
    combos: Vec<PlanInput>,
    memory: Option<&DeviceMemory>,
    plan_device: PlanDevice,
) {
    /// The LoRA column's adapter rank (PEFT's and LLaVA's usual recipes use 8–128).
    const LORA_COLUMN_RANK: usize = 16;
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
            lora: LoraPlan::of(&crate::config::LoraConfig {
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
    let freeze: Vec<&str> = first.freeze.iter().map(|f| f.name()).collect();
    println!(
        "\nGiB per {}; micro_batch_size {}, {}, shared_prefix {}, reference {}, frozen: {}; other = runtime \
         overhead, backward and update transients, communication bucket{}. LoRA: total per device with the base \
         frozen and only adapters trained (rank {LORA_COLUMN_RANK} on q/k/v/o_proj, no dropout).",
        if plan_device == PlanDevice::Cuda { "GPU" } else { "rank" },
        first.micro_batch_size,
        first.lengths.source,
        first.shared_prefix,
        first.reference.name(),
        if freeze.is_empty() { "nothing (full fine-tuning)".to_string() } else { freeze.join(", ") },
        if plan_device == PlanDevice::Cpu { ", data feed" } else { "" },
    );
}
