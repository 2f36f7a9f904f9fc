//! Training data: the good rows of a split, a seeded per-epoch shuffle, and random access to examples
//! (row group reads with a small cache), with cached reference log-probs attached and checked.
//!
//! Invariants:
//! - The row list is deterministic (shards sorted, rows ascending) and, in cached mode, is exactly the rows
//!   the reference cache holds; an epoch's order is a pure function of (seed, epoch), so a resumed run sees
//!   the same batches.
//! - An example's ids must equal the cached ids (`refcache::attach`); a stale cache is an error, never a
//!   silent mismatch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::OnBadRow;
use crate::data::collate::{collate, Batch};
use crate::data::pipeline::{Example, ExampleStream, Preprocessor};
use crate::data::reader::{RawPair, ShardReader};
use crate::data::{DataError, RowError};
use crate::refcache::{self, CachedPair, RefCache};
use crate::util::prng::SplitMix;

use super::TrainError;

/// A good row: shard index in the split's shard list, row number in that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowRef {
    pub shard: usize,
    pub row: u64,
}

/// Row groups kept decoded; shuffled access touches many groups, so keep a few.
const GROUP_CACHE: usize = 8;

pub struct PairSource {
    shards: Vec<PathBuf>,
    readers: Vec<ShardReader>,
    pre: Preprocessor,
    cached: Option<Vec<HashMap<u64, CachedPair>>>,
    rows: Vec<RowRef>,
    groups: Vec<(GroupKey, Vec<Result<RawPair, RowError>>)>,
}

/// (shard index, row group) of a decoded row group.
type GroupKey = (usize, usize);

impl std::fmt::Debug for PairSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairSource")
            .field("shards", &self.shards)
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl PairSource {
    /// Cached mode: the rows are those in the reference cache.
    pub fn cached(
        shards: Vec<PathBuf>,
        pre: Preprocessor,
        cache: &RefCache,
    ) -> Result<Self, TrainError> {
        let mut per_shard = Vec::with_capacity(shards.len());
        let mut rows = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            let pairs = cache.load_shard(s)?;
            rows.extend(pairs.iter().map(|p| RowRef {
                shard: i,
                row: p.row,
            }));
            per_shard.push(pairs.into_iter().map(|p| (p.row, p)).collect());
        }
        Self::build(shards, pre, Some(per_shard), rows)
    }

    /// Online mode (no cache): one pass over the split finds the good rows (bad ones are reported once).
    pub fn online(
        shards: Vec<PathBuf>,
        pre: Preprocessor,
        policy: OnBadRow,
    ) -> Result<Self, TrainError> {
        let mut rows = Vec::new();
        let mut stream = ExampleStream::new(&pre, shards.clone(), policy);
        for ex in stream.by_ref() {
            let ex = ex?;
            rows.push(RowRef {
                shard: ex.shard,
                row: ex.row,
            });
        }
        drop(stream);
        Self::build(shards, pre, None, rows)
    }

    fn build(
        shards: Vec<PathBuf>,
        pre: Preprocessor,
        cached: Option<Vec<HashMap<u64, CachedPair>>>,
        rows: Vec<RowRef>,
    ) -> Result<Self, TrainError> {
        let readers = shards
            .iter()
            .map(|s| ShardReader::open(s, 64))
            .collect::<Result<Vec<_>, DataError>>()?;
        Ok(Self {
            shards,
            readers,
            pre,
            cached,
            rows,
            groups: Vec::new(),
        })
    }

    pub fn rows(&self) -> &[RowRef] {
        &self.rows
    }

    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    pub fn preprocessor(&self) -> &Preprocessor {
        &self.pre
    }

    fn raw(&mut self, r: RowRef) -> Result<RawPair, TrainError> {
        let reader = &self.readers[r.shard];
        let g = reader.group_of(r.row).ok_or_else(|| {
            TrainError::Data(DataError::Row(RowError {
                shard: self.shards[r.shard].clone(),
                row: r.row,
                reason: "row number beyond the end of the shard (shard changed since caching?)"
                    .into(),
            }))
        })?;
        let key = (r.shard, g);
        if let Some(pos) = self.groups.iter().position(|(k, _)| *k == key) {
            let entry = self.groups.remove(pos);
            self.groups.push(entry);
        } else {
            let rows = reader.read_group(g);
            if self.groups.len() >= GROUP_CACHE {
                self.groups.remove(0);
            }
            self.groups.push((key, rows));
        }
        let (_, rows) = self.groups.last().expect("just pushed");
        let first = rows
            .iter()
            .map(|x| match x {
                Ok(p) => p.row,
                Err(e) => e.row,
            })
            .next()
            .unwrap_or(0);
        match &rows[(r.row - first) as usize] {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err(TrainError::Data(DataError::Row(e.clone()))),
        }
    }

    /// The processed example for a row, with reference log-probs attached in cached mode.
    pub fn example(&mut self, r: RowRef) -> Result<Example, TrainError> {
        let raw = self.raw(r)?;
        let shard = self.shards[r.shard].clone();
        let mut ex = self.pre.process(r.shard, &raw).map_err(|reason| {
            TrainError::Data(DataError::Row(RowError {
                shard: shard.clone(),
                row: r.row,
                reason: reason.to_string(),
            }))
        })?;
        if let Some(cached) = &self.cached {
            let c = cached[r.shard]
                .get(&r.row)
                .expect("rows come from the cache");
            refcache::attach(&mut ex, c, &shard)?;
        }
        Ok(ex)
    }
}

/// Which rows a rank trains on at each step. A pure function of its fields, so the data can be prepared
/// ahead of the step and a resumed run sees the same batches.
#[derive(Debug, Clone)]
pub struct FeedPlan {
    /// Rows in the split (`PairSource::rows`).
    pub rows: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub steps_per_epoch: usize,
    pub seed: u64,
    pub world: usize,
    pub rank: usize,
    /// Steps `start..stop` are fed.
    pub start: usize,
    pub stop: usize,
    pub shared_prefix: bool,
}

impl FeedPlan {
    /// Indices (into the split's rows) of this rank's share of `step`'s global batch, given the epoch order.
    pub fn my_rows(&self, order: &[usize], step: usize) -> Vec<usize> {
        let pos = step % self.steps_per_epoch;
        let global = &order[pos * self.batch_size..(pos + 1) * self.batch_size];
        crate::collective::chunk_range(global.len(), self.world, self.rank)
            .map(|i| global[i])
            .collect()
    }
}

/// A step's micro-batches, collated on the CPU.
#[derive(Debug)]
pub struct StepData {
    pub step: usize,
    pub batches: Vec<Batch>,
}

/// Reads, decodes, preprocesses, tokenizes, diffs and collates the coming steps' micro-batches in a
/// background thread, `depth` steps ahead (a bounded queue), so the step does not wait for data. The
/// first error ends the feed and is handed to the step that needed the data.
#[derive(Debug)]
pub struct Feed {
    rx: Option<Receiver<Result<StepData, TrainError>>>,
    thread: Option<JoinHandle<()>>,
    /// Set when the consumer goes away: the thread stops between examples instead of finishing a step
    /// nobody will take (a slow filesystem must not delay a failing job's exit).
    stop: Arc<AtomicBool>,
}

impl Feed {
    pub fn start(mut src: PairSource, plan: FeedPlan, depth: usize) -> Result<Feed, TrainError> {
        let (tx, rx) = sync_channel(depth.max(1));
        let (pad, hw) = (src.preprocessor().pad_id(), src.preprocessor().image_hw());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ddpo-data".into())
            .spawn(move || {
                let mut order: Option<(usize, Vec<usize>)> = None;
                for step in plan.start..plan.stop {
                    let epoch = step / plan.steps_per_epoch;
                    if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
                        order = Some((epoch, epoch_order(plan.rows, plan.seed, epoch)));
                    }
                    let mine: Vec<RowRef> = plan
                        .my_rows(&order.as_ref().expect("set").1, step)
                        .into_iter()
                        .map(|i| src.rows()[i])
                        .collect();
                    let batches: Result<Vec<Batch>, TrainError> = mine
                        .chunks(plan.micro_batch_size.max(1))
                        .map(|micro| {
                            let exs = micro
                                .iter()
                                .map(|&r| {
                                    if stopped.load(Ordering::Relaxed) {
                                        return Err(TrainError::Setup("data feed stopped".into()));
                                    }
                                    src.example(r)
                                })
                                .collect::<Result<Vec<_>, _>>()?;
                            Ok(collate(&exs, pad, hw, plan.shared_prefix))
                        })
                        .collect();
                    let failed = batches.is_err();
                    if tx
                        .send(batches.map(|batches| StepData { step, batches }))
                        .is_err()
                        || failed
                    {
                        return;
                    }
                }
            })
            .map_err(|e| TrainError::Setup(format!("cannot start the data thread: {e}")))?;
        Ok(Feed {
            rx: Some(rx),
            thread: Some(thread),
            stop,
        })
    }

    /// `step`'s micro-batches and the seconds spent waiting for them.
    pub fn next(&mut self, step: usize) -> Result<(Vec<Batch>, f64), TrainError> {
        let t = Instant::now();
        let got = match self.rx.as_ref().expect("open until dropped").recv() {
            Ok(got) => got?,
            Err(_) => {
                // The thread ended without a word: it panicked (an assertion in collation); say why.
                let why = match self.thread.take().map(|t| t.join()) {
                    Some(Err(panic)) => panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into()),
                    _ => "no reason given".into(),
                };
                return Err(TrainError::Setup(format!(
                    "the data thread ended before step {}: {why}",
                    step + 1
                )));
            }
        };
        assert_eq!(got.step, step, "the feed runs in step order");
        Ok((got.batches, t.elapsed().as_secs_f64()))
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // The flag stops a thread between examples; closing the queue ends one blocked on a full queue.
        self.stop.store(true, Ordering::Relaxed);
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The order of `n` rows in `epoch`: a Fisher–Yates shuffle seeded by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 7, 0));
        assert_ne!(a, epoch_order(100, 7, 1));
        assert_ne!(a, epoch_order(100, 8, 0));
    }
}
