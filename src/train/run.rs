//! [`Run`]: what one rank holds while it trains, and the small operations on it that every phase uses
//! (its share of a list, metric reduction, the replica check, metrics rows, checkpoints).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::{self, TrainerState};
use super::data::PairSource;
use super::optim::AdamW;
use super::TrainError;
use crate::collective::Collective;
use crate::config::Config;
use crate::data::synth::truth::SceneGroup;
use crate::ddpo::MetricSums;
use crate::model::llava::Llava;

/// Everything one run holds.
pub(super) struct Run<'a> {
    pub cfg: &'a Config,
    pub device: Device,
    pub model: Llava,
    pub vs: nn::VarStore,
    /// The LoRA adapters' variables, when `lora.rank` > 0 (the base in `vs` is then frozen).
    pub lora: Option<nn::VarStore>,
    pub reference: Option<(nn::VarStore, Llava)>,
    pub opt: AdamW,
    pub eval: Option<PairSource>,
    /// The eval split's scenes, by row id, when `train.eval_generate` > 0.
    pub scenes: Option<HashMap<String, Vec<SceneGroup>>>,
    /// Zero gradients standing in, in the gradient exchange, for parameters that receive none (the vision
    /// layers after the feature layer), so every rank's buckets have the same layout.
    pub zero_grads: BTreeMap<String, Tensor>,
    /// See [`super::TrainReport::gradient_bytes_at_update`].
    pub gradient_bytes_at_update: usize,
    /// Open on rank 0 only: one writer for the job's metrics.
    pub metrics: Option<std::fs::File>,
    pub state: TrainerState,
    pub comm: &'a mut dyn Collective,
}

impl Run<'_> {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// This rank's contiguous share of a list (equal shares; callers make lengths divisible).
    pub fn my_share<T: Copy>(&self, all: &[T]) -> Vec<T> {
        crate::collective::chunk_range(all.len(), self.world(), self.rank())
            .map(|i| all[i])
            .collect()
    }

    /// Data parallelism keeps one model on every rank: every `cluster.replica_check_every` steps and before
    /// every checkpoint each rank compares a fingerprint of its weights (after `step` updates) with rank 0's,
    /// so a divergence (a bug, a bad node) stops the job instead of silently training different models.
    pub fn check_replicas_agree(&mut self, step: usize) -> Result<(), TrainError> {
        let mut fp = [0f64; 2];
        for (_, p) in self.opt.params() {
            // Reductions accumulate in float64 without materialising a float64 copy of the weights.
            let p = p.detach();
            fp[0] += p.sum(Kind::Double).double_value(&[]);
            fp[1] += p.norm_scalaropt_dtype(2.0, Kind::Double).double_value(&[]);
        }
        let mine: Vec<u8> = fp.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut root = mine.clone();
        self.comm.broadcast_bytes(&mut root, 0)?;
        if root != mine {
            return Err(TrainError::Setup(format!(
                "rank {} holds different weights from rank 0 after step {} (fingerprint {:?} vs {:?})",
                self.rank(),
                step,
                fp,
                root
            )));
        }
        Ok(())
    }

    /// Sums metric sums (and a count of non-finite ranks) over all ranks.
    pub fn reduce_sums(
        &mut self,
        sums: &MetricSums,
        bad: f64,
    ) -> Result<(MetricSums, f64), TrainError> {
        let mut v = sums.to_vec();
        v.push(bad);
        self.comm.all_reduce_sum_f64(&mut v)?;
        let bad = v.pop().expect("pushed");
        Ok((MetricSums::from_slice(&v), bad))
    }

    /// Appends one row to metrics.jsonl (rank 0; a no-op elsewhere).
    pub fn write_metrics(&mut self, row: &serde_json::Value) -> Result<(), TrainError> {
        let path = self.cfg.train.output_dir.join("metrics.jsonl");
        let Some(f) = self.metrics.as_mut() else {
            return Ok(());
        };
        writeln!(f, "{row}")
            .and_then(|_| f.flush())
            .map_err(|source| TrainError::Io { path, source })
    }

    /// Rank 0 writes; every rank waits until it is complete. A failure on rank 0 reaches the others as an
    /// error too (they stop at the barrier's timeout or on rank 0's closed connection).
    pub fn checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let dir = checkpoint::checkpoint_dir(&self.cfg.train.output_dir, self.state.step);
        if self.world() > 1 && self.cfg.cluster.replica_check_every > 0 {
            // A checkpoint holds rank 0's weights only: make sure they are everybody's.
            self.check_replicas_agree(self.state.step)?;
        }
        // Sharded state is gathered by every rank together; unsharded, rank 0 has it all.
        let opt_state = if self.opt.is_sharded() || self.rank() == 0 {
            self.opt.gather_state(&mut *self.comm, 0)?
        } else {
            Vec::new()
        };
        if self.rank() == 0 {
            checkpoint::save(
                &self.cfg.train.output_dir,
                &self.vs,
                &self.cfg.model.path,
                &opt_state,
                self.lora.as_ref().map(|l| (l, &self.cfg.lora)),
                &self.state,
                self.cfg.train.keep_last,
            )?;
        }
        self.comm.barrier()?;
        Ok(dir)
    }
}
