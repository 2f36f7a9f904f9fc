//! LoRA training (`[lora] rank > 0`): adapters on the decoder's projections in their own `VarStore`, the base
//! model frozen, checkpoints carrying the adapters in PEFT's layout (`adapter_config.json`,
//! `adapter_model.safetensors`) beside the (unchanged) base weights, so `PeftModel.from_pretrained` on
//! transformers' `LlavaForConditionalGeneration` loads them.
//!
//! Invariants: every rank creates the same adapters (from `train.seed` and each variable's name, with the
//! project's own PRNG); a new adapter's B is zero, so
//! the policy starts equal to the base model, which is therefore the reference (cached or online) as is; the
//! PEFT `target_modules` is a regular expression that names only decoder layers (a plain list such as
//! `["q_proj"]` would also match the vision tower's projections when PEFT applies it).

use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use super::TrainError;
use crate::config::{Config, LoraConfig};
use crate::model::llava::Llava;

/// A file of an adapter or merged model that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Tensors {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SaveError + '_ {
    move |source| SaveError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_tensors(named: &[(String, Tensor)], path: PathBuf) -> Result<(), SaveError> {
    Tensor::write_safetensors(named, &path).map_err(|source| SaveError::Tensors { path, source })
}

/// PEFT's file names.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Adds the adapters to `model` and freezes the base (`base`); with `resume_from`, the adapters' values are
/// read from that checkpoint. Returns the adapters' `VarStore` (every variable trainable).
pub fn attach(
    model: &mut Llava,
    base: &nn::VarStore,
    cfg: &Config,
    device: Device,
    kind: Kind,
    resume_from: Option<&Path>,
) -> Result<nn::VarStore, TrainError> {
    let mut lvs = nn::VarStore::new(device);
    {
        let _rng = crate::model::global_rng_lock();
        let l = &cfg.lora;
        model.add_lora(&lvs.root(), l.rank, l.alpha, l.dropout, &l.target_modules);
    }
    // The same initial adapters on every rank and in every run of the job: A drawn from the project's own
    // PRNG (seeded by train.seed and the variable's name), not libtorch's global generator, which other
    // threads of the process may draw from meanwhile.
    tch::no_grad(|| {
        for (name, mut v) in lvs.variables() {
            if !name.contains(".lora_A.") {
                continue;
            }
            let (r, inp) = v.size2().expect("[r, in]");
            let bound = 1.0 / (inp as f64).sqrt();
            let mut rng = crate::util::prng::SplitMix::new(
                cfg.train.seed
                    ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                    }),
            );
            let vals: Vec<f32> = (0..r * inp)
                .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound)
                .map(|x| x as f32)
                .collect();
            v.copy_(&Tensor::from_slice(&vals).view([r, inp]).to_device(device));
        }
    });
    lvs.set_kind(kind);
    for (_, mut t) in base.variables() {
        let _ = t.requires_grad_(false);
    }
    if let Some(dir) = resume_from {
        let file = dir.join(ADAPTER_WEIGHTS);
        let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&file)
            .map_err(|e| TrainError::Setup(format!("{}: {e}", file.display())))?
            .into_iter()
            .collect();
        let vars = lvs.variables();
        if saved.len() != vars.len() {
            return Err(TrainError::Setup(format!(
                "{}: {} tensors, but lora settings give {} adapter tensors (lora.rank or target_modules changed?)",
                file.display(),
                saved.len(),
                vars.len()
            )));
        }
        tch::no_grad(|| -> Result<(), TrainError> {
            for (name, mut v) in vars {
                let src = saved.get(&name).ok_or_else(|| {
                    TrainError::Setup(format!("{}: no tensor {name}", file.display()))
                })?;
                if src.size() != v.size() {
                    return Err(TrainError::Setup(format!(
                        "{}: {name} has shape {:?}, expected {:?} (lora.rank changed?)",
                        file.display(),
                        src.size(),
                        v.size()
                    )));
                }
                v.copy_(&src.to_device(device).to_kind(kind));
            }
            Ok(())
        })?;
    }
    Ok(lvs)
}

/// Writes `dir` as a plain llava-hf model: the base weights with every adapter folded in
/// (`W + (alpha / rank) · B A`, in fp32), and the base model's config, tokenizer and processor files.
pub fn save_merged(
    base: &nn::VarStore,
    lvs: &nn::VarStore,
    cfg: &LoraConfig,
    model_dir: &Path,
    dir: &Path,
) -> Result<(), SaveError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let adapters = lvs.variables();
    let scale = cfg.alpha / cfg.rank as f64;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, w) in base.variables() {
        let w = w.detach().to_device(Device::Cpu).to_kind(Kind::Float);
        // language_model.model.layers.<i>.<part>.<proj>.weight ↔ the adapter's PEFT name.
        let stem = name
            .strip_prefix("language_model.model.")
            .and_then(|s| s.strip_suffix(".weight"));
        let pair = stem.and_then(|s| {
            let key =
                |ab: &str| format!("base_model.model.model.language_model.{s}.lora_{ab}.weight");
            Some((adapters.get(&key("A"))?, adapters.get(&key("B"))?))
        });
        let merged = match pair {
            Some((a, b)) => {
                let a = a.detach().to_device(Device::Cpu).to_kind(Kind::Float);
                let b = b.detach().to_device(Device::Cpu).to_kind(Kind::Float);
                w + b.matmul(&a) * scale
            }
            None => w,
        };
        named.push((name, merged));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_tensors(&named, dir.join("model.safetensors"))?;
    for f in super::checkpoint::MODEL_FILES {
        let src = model_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).map_err(io_err(&src))?;
        }
    }
    Ok(())
}

/// The PEFT `target_modules` pattern for the configured projections: decoder layers only.
pub fn peft_target_pattern(cfg: &LoraConfig) -> String {
    format!(
        r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({})",
        cfg.target_modules.join("|")
    )
}

/// Writes `adapter_model.safetensors` (fp32) and `adapter_config.json` into `dir`.
pub fn save_adapter(
    lvs: &nn::VarStore,
    cfg: &LoraConfig,
    base_model: &Path,
    dir: &Path,
) -> Result<(), SaveError> {
    let mut named: Vec<(String, Tensor)> = lvs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).to_kind(Kind::Float)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_tensors(&named, dir.join(ADAPTER_WEIGHTS))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model.display().to_string(),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_pattern(cfg),
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).map_err(io_err(&path))
}
