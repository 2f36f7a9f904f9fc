//! Checkpoint I/O: safetensors, single file or sharded with `model.safetensors.index.json`, memory-mapped,
//! in both Hugging Face weight-name layouts; saving in the llava-hf layout with config, tokenizer and
//! processor files so transformers loads the result unchanged.
//!
//! Invariants: every model variable is loaded exactly once or loading fails naming what is missing; an
//! unexpected or mis-shaped tensor fails naming it; a saved directory is complete or absent (written to a
//! temporary folder, then renamed).

use crate::util::fsx;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use tch::{nn, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{}: checkpoint does not match the model:\n  {}", dir.display(), problems.join("\n  "))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
}

/// Maps a key of either layout to the llava-hf (legacy) name the model's variables use.
/// Returns None for keys that are not weights (buffers some exporters include).
pub fn canonical_name(key: &str) -> Option<String> {
    if key.ends_with("position_ids") || key.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    let k = if let Some(rest) = key.strip_prefix("model.language_model.") {
        format!("language_model.model.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.vision_tower.") {
        format!("vision_tower.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.multi_modal_projector.") {
        format!("multi_modal_projector.{rest}")
    } else if key == "lm_head.weight" {
        "language_model.lm_head.weight".to_string()
    } else {
        key.to_string()
    };
    // `vision_tower.encoder…` (no `vision_model.`) is how some exporters write the CLIP tower.
    let k = match k.strip_prefix("vision_tower.") {
        Some(rest) if !rest.starts_with("vision_model.") => {
            format!("vision_tower.vision_model.{rest}")
        }
        _ => k,
    };
    Some(k)
}

/// The safetensors files of a checkpoint directory: the index's shards, or `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| WeightsError::File {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightsError::File {
            path: index.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| WeightsError::File {
                path: index.clone(),
                reason: "no weight_map".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(WeightsError::File {
        path: dir.to_owned(),
        reason: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Loads a checkpoint directory into the variables of `vs` (converting dtype to each variable's), checking
/// that the names and shapes match exactly.
pub fn load(vs: &nn::VarStore, dir: &Path) -> Result<(), WeightsError> {
    let mut vars: HashMap<String, Tensor> = vs.variables();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in checkpoint_files(dir)? {
        let f = std::fs::File::open(&file).map_err(|e| WeightsError::File {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        // SAFETY: the mapping is read-only and lives only for this loop iteration; a checkpoint being
        // rewritten underneath a running job is outside what any loader can guard against.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| WeightsError::File {
            path: file.clone(),
            reason: format!("cannot map: {e}"),
        })?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| WeightsError::File {
            path: file.clone(),
            reason: format!("not a safetensors file: {e}"),
        })?;
        for (key, view) in st.tensors() {
            let Some(name) = canonical_name(&key) else {
                continue;
            };
            if let Some(prev) = seen.insert(name.clone(), file.clone()) {
                problems.push(format!(
                    "{key}: given twice ({} and {})",
                    prev.display(),
                    file.display()
                ));
                continue;
            }
            let Some(var) = vars.get_mut(&name) else {
                problems.push(format!("unexpected tensor {key}"));
                continue;
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                problems.push(format!(
                    "{key}: shape {shape:?} but the model expects {:?}",
                    var.size()
                ));
                continue;
            }
            let Some(kind) = kind_of(view.dtype()) else {
                problems.push(format!("{key}: unsupported dtype {:?}", view.dtype()));
                continue;
            };
            let t = Tensor::from_data_size(view.data(), &shape, kind);
            tch::no_grad(|| var.copy_(&t.to_kind(var.kind())));
        }
    }
    let mut missing: Vec<&String> = vars.keys().filter(|k| !seen.contains_key(*k)).collect();
    missing.sort();
    problems.extend(missing.iter().map(|k| format!("missing tensor {k}")));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WeightsError::Mismatch {
            dir: dir.to_owned(),
            problems,
        })
    }
}

/// Writes the variables of `vs` as `model.safetensors` (llava-hf names) in `dtype` into `dir`, together with
/// `extra` files (config.json, tokenizer files, …), atomically: a temporary sibling folder renamed into place.
pub fn save(
    vs: &nn::VarStore,
    dir: &Path,
    dtype: Kind,
    extra: &[(&str, Vec<u8>)],
) -> Result<(), WeightsError> {
    let err = |path: &Path, reason: String| WeightsError::File {
        path: path.to_owned(),
        reason,
    };
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(parent, e.to_string()))?;
    let tmp = fsx::temp_sibling(dir);
    std::fs::create_dir_all(&tmp).map_err(|e| err(&tmp, e.to_string()))?;
    let result = (|| {
        write_safetensors(vs, &tmp.join("model.safetensors"), dtype)?;
        for (file, bytes) in extra {
            let p = tmp.join(file);
            std::fs::write(&p, bytes).map_err(|e| err(&p, e.to_string()))?;
        }
        fsx::sync_tree(&tmp).map_err(|e| err(&tmp, format!("syncing to disk: {e}")))?;
        fsx::commit(&tmp, dir).map_err(|e| err(dir, e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes every variable of `vs` to one safetensors file (llava-hf names, sorted) in `dtype`.
pub fn write_safetensors(vs: &nn::VarStore, path: &Path, dtype: Kind) -> Result<(), WeightsError> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.detach()
                    .to_kind(dtype)
                    .to_device(tch::Device::Cpu)
                    .contiguous(),
            )
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).map_err(|e| WeightsError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_map_to_llava_hf_names() {
        let cases = [
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                "language_model.model.layers.0.mlp.up_proj.weight",
            ),
            (
                "language_model.model.norm.weight",
                "language_model.model.norm.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
            (
                "language_model.lm_head.weight",
                "language_model.lm_head.weight",
            ),
            (
                "model.vision_tower.vision_model.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.bias",
            ),
            (
                "vision_tower.encoder.layers.1.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
            ),
            (
                "model.multi_modal_projector.linear_2.bias",
                "multi_modal_projector.linear_2.bias",
            ),
        ];
        for (from, to) in cases {
            assert_eq!(canonical_name(from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(
            canonical_name("vision_tower.vision_model.embeddings.position_ids"),
            None
        );
    }
}
