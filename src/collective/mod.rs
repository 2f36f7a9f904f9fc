//! Collectives behind one trait (docs/interfaces.md): the gradient all-reduce and the few other exchanges that the
//! ranks of a training job need.
//!
//! - [`LocalCollective`] — world size 1: every operation is a no-op.
//! - [`RingCollective`] — CPU workers: a TCP ring, bandwidth-optimal all-reduce (reduce-scatter then all-gather),
//!   pipelined in bounded segments, with timeouts so a dead or hung peer becomes an error, never a hang.
//! - [`NcclCollective`] — GPU workers: NCCL, loaded at run time (the crate builds and tests with no CUDA).
//!
//! Invariants every implementation keeps:
//! - after an all-reduce every rank holds bitwise-identical data;
//! - the summation order is a function of (world size, buffer length) only, so results are reproducible;
//! - an error leaves the collective *broken*: later calls fail at once with [`CollectiveError::Broken`]. The job
//!   re-forms the ring (new generation) rather than trying to resynchronise a half-finished exchange.
//!
//! Gradients go through [`Collective::all_reduce_mean_tensors`]: the tensors, in the order given (callers sort
//! them by parameter name), are viewed as one flat stream of values cut into buckets of at most `bucket_bytes`
//! (f32) bytes — [`plan_buckets`]; a tensor larger than a bucket spans several.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

pub mod local;
pub mod nccl;
pub mod ring;

pub use local::LocalCollective;

/// Bytes of one gradient bucket, as PyTorch DDP's default: the unit in which gradients are exchanged and
/// the staging buffer a rank holds during an exchange (counted by the memory plan).
pub const BUCKET_BYTES: usize = 25 << 20;
pub use nccl::NcclCollective;
pub use ring::{RingCollective, RingListener};

/// What can go wrong in a collective. Every variant that involves a peer names its rank.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Could not open the connection to the next rank of the ring before the timeout.
    #[error("cannot connect to rank {peer} at {addr}: {source}")]
    Connect {
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Accepting the connection from the previous rank failed (not a timeout: see [`CollectiveError::Timeout`]).
    #[error("accepting the connection from rank {peer} on {addr} failed: {source}")]
    Accept {
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The peer closed its connection (it exited, crashed, was killed, or dropped its collective).
    #[error("rank {peer} closed the connection during {op}")]
    PeerClosed { peer: usize, op: String },
    /// An I/O error on the connection with a peer in the middle of an operation.
    #[error("connection with rank {peer} failed during {op}: {source}")]
    Io {
        peer: usize,
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// No progress for `timeout` while waiting for a peer.
    #[error("timed out after {timeout:?} during {op}: {detail}")]
    Timeout {
        peer: usize,
        op: String,
        timeout: Duration,
        detail: String,
    },
    /// Peers disagree: buffer length, operation, root, generation, world size or rank (a stale process of an
    /// older generation, a caller bug that gives ranks different buffers, …).
    #[error("rank {peer} disagrees during {op}: {detail}")]
    Mismatch {
        peer: usize,
        op: String,
        detail: String,
    },
    /// NCCL (or the CUDA driver it needs) cannot be used on this machine.
    #[error("NCCL unavailable: {0}")]
    NcclUnavailable(#[from] nccl::Unavailable),
    /// An NCCL or CUDA call failed.
    #[error("NCCL {op} failed: {detail}")]
    Nccl { op: String, detail: String },
    /// A caller error: rank out of range, root out of range, tensor on the wrong device, …
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A libtorch error while moving tensors in or out of the buckets.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    /// The caller gave up on forming the ring (its world was dissolved while it waited for a peer).
    #[error("ring connect abandoned: {0}")]
    Aborted(String),
    /// An earlier operation failed; the collective must be re-formed.
    #[error("collective is unusable after an earlier error ({0}); re-form the ring")]
    Broken(String),
}

/// The operations a training job needs from its ranks.
///
/// Every rank must call the same operations in the same order with buffers of the same length (`root` equal
/// too); implementations check this where they can and return [`CollectiveError::Mismatch`].
///
/// `Send` so a worker can move its collective to the thread that trains; no implementation is `Sync`: one
/// collective is used by one thread at a time (`&mut self`).
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Elementwise sum across ranks, in place; every rank ends with identical bytes.
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError>;

    /// Sum then divide by world size, over tch tensors (CPU or CUDA), flattened into buckets of at most
    /// `bucket_bytes` (as f32), in the order given (callers pass them sorted by parameter name). The default
    /// implementation copies each bucket into a host f32 buffer, calls [`Collective::all_reduce_sum_f32`],
    /// divides by the world size and copies back (converting to each tensor's kind). NCCL overrides it to reduce
    /// on the device. Tensors of any floating kind; the reduction is in f32.
    fn all_reduce_mean_tensors(
        &mut self,
        tensors: &[Tensor],
        bucket_bytes: usize,
    ) -> Result<(), CollectiveError> {
        mean_tensors_on_host(self, tensors, bucket_bytes)
    }

    /// Broadcast from `root`: every rank ends with root's bytes (non-root buffers are resized to root's length).
    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// First half of all-reduce: afterwards this rank's chunk `chunk_range(buf.len(), world, rank)` (returned)
    /// holds the sum over ranks of that chunk; the rest of `buf` is unspecified.
    fn reduce_scatter_sum_f32(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError>;

    /// Second half: each rank contributes its chunk `chunk_range(buf.len(), world, rank)`; afterwards every rank
    /// holds all chunks (identical bytes everywhere). `reduce_scatter_sum_f32` then `all_gather_f32` gives exactly
    /// the bytes of `all_reduce_sum_f32`.
    fn all_gather_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
}

/// The chunk of a `len`-element buffer that `rank` owns among `world` ranks: contiguous, in rank order, sizes
/// differing by at most one (the first `len % world` chunks are one longer).
pub fn chunk_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    assert!(
        world > 0 && rank < world,
        "chunk_range: rank {rank} out of 0..{world}"
    );
    let base = len / world;
    let rem = len % world;
    let start = rank * base + rank.min(rem);
    let size = base + usize::from(rank < rem);
    start..start + size
}

/// One piece of a bucket: elements `range` of tensor `tensor` (flattened), stored at `offset` in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPiece {
    pub tensor: usize,
    pub range: Range<usize>,
    pub offset: usize,
}

/// A bucket: `len` f32 values made of consecutive pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub len: usize,
    pub pieces: Vec<BucketPiece>,
}

/// Cuts the concatenation of tensors with `numels` elements (in that order) into buckets of at most
/// `bucket_bytes / 4` elements (at least one). Empty tensors take no piece. Every bucket but the last is full.
pub fn plan_buckets(numels: &[usize], bucket_bytes: usize) -> Vec<Bucket> {
    let cap = (bucket_bytes / std::mem::size_of::<f32>()).max(1);
    let mut buckets = Vec::new();
    let mut cur = Bucket {
        len: 0,
        pieces: Vec::new(),
    };
    for (t, &n) in numels.iter().enumerate() {
        let mut done = 0;
        while done < n {
            let take = (cap - cur.len).min(n - done);
            cur.pieces.push(BucketPiece {
                tensor: t,
                range: done..done + take,
                offset: cur.len,
            });
            cur.len += take;
            done += take;
            if cur.len == cap {
                buckets.push(std::mem::replace(
                    &mut cur,
                    Bucket {
                        len: 0,
                        pieces: Vec::new(),
                    },
                ));
            }
        }
    }
    if cur.len > 0 {
        buckets.push(cur);
    }
    buckets
}

/// Flat views of the tensors (contiguous ones are views; others are copies written back at the end).
pub(crate) struct FlatTensors {
    originals: Vec<Tensor>,
    flats: Vec<Tensor>,
    copied: Vec<bool>,
}

impl FlatTensors {
    pub(crate) fn new(tensors: &[Tensor]) -> Result<Self, CollectiveError> {
        let mut originals = Vec::with_capacity(tensors.len());
        let mut flats = Vec::with_capacity(tensors.len());
        let mut copied = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if !t.defined() {
                return Err(CollectiveError::InvalidArgument(format!(
                    "tensor {i} is undefined"
                )));
            }
            let kind = t.f_kind()?;
            if !matches!(
                kind,
                Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
            ) {
                return Err(CollectiveError::InvalidArgument(format!(
                    "tensor {i} has kind {kind:?}; only floating-point tensors are averaged"
                )));
            }
            let contiguous = t.is_contiguous();
            let flat = if contiguous {
                t.f_view([-1])?
            } else {
                t.f_contiguous()?.f_view([-1])?
            };
            originals.push(t.shallow_clone());
            flats.push(flat);
            copied.push(!contiguous);
        }
        Ok(Self {
            originals,
            flats,
            copied,
        })
    }

    pub(crate) fn numels(&self) -> Vec<usize> {
        self.flats.iter().map(|f| f.numel()).collect()
    }

    pub(crate) fn piece(&self, p: &BucketPiece) -> Result<Tensor, CollectiveError> {
        Ok(self.flats[p.tensor].f_narrow(0, p.range.start as i64, p.range.len() as i64)?)
    }

    /// Writes the copies of non-contiguous tensors back into them.
    pub(crate) fn finish(mut self) -> Result<(), CollectiveError> {
        for i in 0..self.flats.len() {
            if self.copied[i] {
                let size = self.originals[i].size();
                let src = self.flats[i].f_view(size.as_slice())?;
                self.originals[i].f_copy_(&src)?;
            }
        }
        Ok(())
    }
}

/// The default [`Collective::all_reduce_mean_tensors`]: one reusable host f32 buffer of at most
/// `bucket_bytes`; per bucket copy in, sum across ranks, divide by the world size, copy back.
pub fn mean_tensors_on_host<C: Collective + ?Sized>(
    c: &mut C,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    let world = c.world_size();
    if world == 1 || tensors.is_empty() {
        return Ok(());
    }
    let scale = world as f32;
    through_host_buckets(tensors, bucket_bytes, |buf| {
        c.all_reduce_sum_f32(buf)?;
        for x in buf.iter_mut() {
            *x /= scale;
        }
        Ok(None)
    })
}

/// Runs `op` on every bucket of `tensors` ([`plan_buckets`]) staged in one reusable host f32 buffer: copy in,
/// `op`, copy back — only the bucket positions in the range `op` returns, or all of them.
fn through_host_buckets(
    tensors: &[Tensor],
    bucket_bytes: usize,
    mut op: impl FnMut(&mut [f32]) -> Result<Option<Range<usize>>, CollectiveError>,
) -> Result<(), CollectiveError> {
    tch::no_grad(|| {
        let flats = FlatTensors::new(tensors)?;
        let buckets = plan_buckets(&flats.numels(), bucket_bytes);
        let cap = buckets.iter().map(|b| b.len).max().unwrap_or(0);
        let mut host = vec![0f32; cap];
        for bucket in &buckets {
            let buf = &mut host[..bucket.len];
            copy_bucket_in(&flats, bucket, buf)?;
            let only = op(buf)?;
            copy_bucket_out(&flats, bucket, buf, only.as_ref())?;
        }
        flats.finish()
    })
}

/// The flat slices of the tensors (with `numels` elements, in order) that `rank` owns under ZeRO: per bucket of
/// [`plan_buckets`], the bucket's `chunk_range` — what a reduce-scatter of that bucket leaves reduced on the
/// rank. In bucket order; `(tensor, range)` with non-empty ranges.
pub fn owned_pieces(
    numels: &[usize],
    bucket_bytes: usize,
    world: usize,
    rank: usize,
) -> Vec<(usize, Range<usize>)> {
    let mut out = Vec::new();
    for bucket in plan_buckets(numels, bucket_bytes) {
        let mine = chunk_range(bucket.len, world, rank);
        for p in &bucket.pieces {
            let (a, b) = (p.offset, p.offset + p.range.len());
            let (lo, hi) = (a.max(mine.start), b.min(mine.end));
            if lo < hi {
                let start = p.range.start + (lo - a);
                out.push((p.tensor, start..start + (hi - lo)));
            }
        }
    }
    out
}

/// ZeRO-2 gradient exchange through host f32 buckets: per bucket, reduce-scatter the sum and divide by the
/// world size; only this rank's chunk ([`owned_pieces`]) is written back — the rest of each tensor keeps its
/// local values and must not be used.
pub fn reduce_scatter_mean_tensors(
    c: &mut dyn Collective,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    let world = c.world_size();
    if world == 1 || tensors.is_empty() {
        return Ok(());
    }
    let scale = world as f32;
    through_host_buckets(tensors, bucket_bytes, |buf| {
        let mine = c.reduce_scatter_sum_f32(buf)?;
        for x in buf[mine.clone()].iter_mut() {
            *x /= scale;
        }
        Ok(Some(mine))
    })
}

/// ZeRO parameter exchange through host f32 buckets: each rank contributes its chunk of every bucket
/// ([`owned_pieces`]) and ends with everybody's (bitwise equal on every rank). Exact for bf16 and fp16 tensors
/// (f32 holds their values).
pub fn all_gather_tensors(
    c: &mut dyn Collective,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    if c.world_size() == 1 || tensors.is_empty() {
        return Ok(());
    }
    through_host_buckets(tensors, bucket_bytes, |buf| {
        c.all_gather_f32(buf)?;
        Ok(None)
    })
}

fn copy_bucket_in(
    flats: &FlatTensors,
    bucket: &Bucket,
    buf: &mut [f32],
) -> Result<(), CollectiveError> {
    for p in &bucket.pieces {
        let src = flats.piece(p)?;
        // SAFETY: the blob covers p.range.len() initialised f32 values inside `buf`, which outlives it.
        let mut dst = unsafe { host_view(&mut buf[p.offset..p.offset + p.range.len()])? };
        dst.f_copy_(&src)?;
    }
    Ok(())
}

/// Copies the bucket back into the tensors; with `only`, just the bucket positions in that range.
fn copy_bucket_out(
    flats: &FlatTensors,
    bucket: &Bucket,
    buf: &mut [f32],
    only: Option<&Range<usize>>,
) -> Result<(), CollectiveError> {
    for p in &bucket.pieces {
        let (a, b) = (p.offset, p.offset + p.range.len());
        let (lo, hi) = match only {
            Some(r) => (a.max(r.start), b.min(r.end)),
            None => (a, b),
        };
        if lo >= hi {
            continue;
        }
        let mut dst = flats
            .piece(p)?
            .f_narrow(0, (lo - a) as i64, (hi - lo) as i64)?;
        // SAFETY: as in copy_bucket_in.
        let src = unsafe { host_view(&mut buf[lo..hi])? };
        dst.f_copy_(&src)?;
    }
    Ok(())
}

/// A CPU f32 tensor over `buf` without copying.
///
/// # Safety
/// The tensor must be dropped before `buf` is used again.
unsafe fn host_view(buf: &mut [f32]) -> Result<Tensor, CollectiveError> {
    Ok(Tensor::f_from_blob(
        buf.as_mut_ptr() as *const u8,
        &[buf.len() as i64],
        &[],
        Kind::Float,
        Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in [0usize, 1, 2, 7, 10, 11, 1000, 1001] {
            for world in 1..=5 {
                let mut next = 0;
                for r in 0..world {
                    let c = chunk_range(len, world, r);
                    assert_eq!(c.start, next, "len {len} world {world} rank {r}");
                    assert!(c.len() == len / world || c.len() == len / world + 1);
                    next = c.end;
                }
                assert_eq!(next, len);
            }
        }
        assert_eq!(chunk_range(7, 3, 0), 0..3);
        assert_eq!(chunk_range(7, 3, 1), 3..5);
        assert_eq!(chunk_range(7, 3, 2), 5..7);
    }

    #[test]
    fn buckets_split_tensors_and_respect_the_cap() {
        // cap = 4 elements
        let b = plan_buckets(&[3, 0, 6, 1], 16);
        assert_eq!(b.len(), 3);
        assert_eq!(b.iter().map(|b| b.len).collect::<Vec<_>>(), vec![4, 4, 2]);
        assert_eq!(
            b[0].pieces,
            vec![
                BucketPiece {
                    tensor: 0,
                    range: 0..3,
                    offset: 0
                },
                BucketPiece {
                    tensor: 2,
                    range: 0..1,
                    offset: 3
                }
            ]
        );
        assert_eq!(
            b[1].pieces,
            vec![BucketPiece {
                tensor: 2,
                range: 1..5,
                offset: 0
            }]
        );
        assert_eq!(
            b[2].pieces,
            vec![
                BucketPiece {
                    tensor: 2,
                    range: 5..6,
                    offset: 0
                },
                BucketPiece {
                    tensor: 3,
                    range: 0..1,
                    offset: 1
                }
            ]
        );
        assert!(plan_buckets(&[], 16).is_empty());
        assert!(plan_buckets(&[0, 0], 16).is_empty());
        // A bucket smaller than one f32 still holds one value.
        assert_eq!(plan_buckets(&[2], 1).len(), 2);
        // Every element exactly once.
        let numels = [5usize, 17, 1, 64, 3];
        for cap in [4usize, 20, 36, 400, 4000] {
            let mut seen: Vec<Vec<bool>> = numels.iter().map(|&n| vec![false; n]).collect();
            for bucket in plan_buckets(&numels, cap) {
                assert!(bucket.len * 4 <= cap.max(4));
                let mut off = 0;
                for p in &bucket.pieces {
                    assert_eq!(p.offset, off);
                    off += p.range.len();
                    for i in p.range.clone() {
                        assert!(!seen[p.tensor][i]);
                        seen[p.tensor][i] = true;
                    }
                }
                assert_eq!(off, bucket.len);
            }
            assert!(seen.iter().all(|s| s.iter().all(|&x| x)));
        }
    }
}
