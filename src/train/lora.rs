//! LoRA training (`[lora] rank > 0`): adapters on the decoder's projections in their own `VarStore`, the base
//! model frozen, checkpoints carrying the adapters in PEFT's layout (`adapter_config.json`,
//! `adapter_model.safetensors`) beside the (unchanged) base weights, so `PeftModel.from_pretrained` on
//! transformers' `LlavaForConditionalGeneration` loads them.
//!
//! Invariants: every rank creates the same adapters (seeded by `train.seed`); a new adapter's B is zero, so
//! the policy starts equal to the base model, which is therefore the reference (cached or online) as is; the
//! PEFT `target_modules` is a regular expression that names only decoder layers (a plain list such as
//! `["q_proj"]` would also match the vision tower's projections when PEFT applies it).

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::TrainError;
use crate::config::{Config, LoraConfig};
use crate::model::llava::Llava;

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
    // The same initial adapters on every rank and in every run of the job.
    tch::manual_seed(cfg.train.seed as i64);
    model.add_lora(&lvs.root(), &cfg.lora);
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
) -> Result<(), String> {
    let mut named: Vec<(String, Tensor)> = lvs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).to_kind(Kind::Float)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, dir.join(ADAPTER_WEIGHTS)).map_err(|e| e.to_string())?;
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
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .map_err(|e| e.to_string())
}
