//! TCP ring collectives for CPU workers.
//!
//! # Forming the ring
//! Each rank binds a listener first ([`RingCollective::listen`], port 0 is fine) so its address can be
//! published at rendezvous; then [`RingCollective::connect`] connects to rank `(r+1) % n` ("next") and accepts
//! from rank `(r-1) % n` ("prev"). The connector sends a hello (protocol version, rank, world size,
//! generation); the acceptor answers with its own values and a verdict. A connection whose hello does not match
//! (wrong generation — a stale process of an older job generation —, world size or rank) is refused and the
//! acceptor keeps waiting for the right peer; the refused process gets [`CollectiveError::Mismatch`] at once.
//! Connecting and accepting are interleaved, so no rank waits for another to accept first.
//!
//! # All-reduce
//! The bandwidth-optimal ring algorithm: the buffer is cut into `n` chunks ([`chunk_range`]); in `n-1`
//! reduce-scatter steps each rank sends one chunk to next and adds the chunk received from prev into its own
//! buffer, after which rank `r` holds the full sum of chunk `r`; `n-1` all-gather steps then pass the finished
//! chunks around. Global step `g` (`0 ≤ g < 2(n-1)`) sends chunk `(r-1-g) mod n` and receives chunk
//! `(r-2-g) mod n`. Each chunk is further cut into segments of at most `segment_bytes` (default 1 MiB) and the
//! steps are pipelined segment by segment: segment `k` of step `g+1` is sent as soon as segment `k` of step `g`
//! has arrived. Sending and receiving proceed together on non-blocking sockets driven by `poll(2)` in the
//! calling thread, so the only extra memory is one segment of receive scratch, whatever the buffer size.
//!
//! Determinism: chunk `c`'s sum is accumulated along the ring starting at rank `c+1`:
//! `x[c+n] + (… + (x[c+2] + x[c+1]))` (indices mod n), on exactly one rank (rank `c`), and the all-gather copies
//! those bytes to every rank; so the result depends only on (world size, length) and is bitwise identical on all
//! ranks.
//!
//! # Failures
//! Every operation starts with a small header exchange (operation, element size, length, root, call number,
//! generation) so ranks that disagree fail with [`CollectiveError::Mismatch`] instead of exchanging garbage.
//! While waiting, the socket to next is also watched for hang-up, so a peer that dies is reported by both its
//! neighbours by rank. The timeout is a no-progress timeout: an operation fails when no byte has arrived from
//! prev for `timeout` (a 256 MB all-reduce may take longer than `timeout` in total; a rank that only sends,
//! the broadcast root, must finish within `timeout`). Bytes taken by next do not count: a hung peer's kernel
//! still accepts data now and then long after the peer stopped reading. After any error the collective is
//! broken (every later call fails); on a mismatch it also shuts its sockets so the other ranks fail fast.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{chunk_range, Collective, CollectiveError};

mod engine;
mod handshake;

use engine::*;
use handshake::*;

/// Receive scratch and pipelining unit: 1 MiB.
pub const DEFAULT_SEGMENT_BYTES: usize = 1 << 20;

const HELLO_MAGIC: [u8; 8] = *b"DDPORING";
const PROTOCOL_VERSION: u32 = 1;
const HELLO_LEN: usize = 8 + 4 + 4 + 4 + 8;
const REPLY_LEN: usize = 8 + 4 + 4 + 4 + 4 + 8;
const HEADER_MAGIC: u32 = 0x4444_5252;
const HEADER_LEN: usize = 40;

/// A bound listener, created before rendezvous so that its address can be published.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// The address peers connect to (publish this one; bind to a concrete interface, not 0.0.0.0, so it is
    /// reachable as given).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    peer: usize,
}

/// A TCP ring over the ranks of one job generation. See the module documentation.
#[derive(Debug)]
pub struct RingCollective {
    rank: usize,
    world: usize,
    generation: u64,
    timeout: Duration,
    /// (next, prev); `None` for world size 1.
    links: Option<(Link, Link)>,
    calls: u64,
    segment_bytes: usize,
    /// Receive scratch for the reduce steps (u64 for alignment), `segment_bytes` long once used.
    scratch: Vec<u64>,
    broken: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    ReduceScatterF32 = 3,
    AllGatherF32 = 4,
    Broadcast = 5,
    Barrier = 6,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceF32 => "all_reduce_sum_f32",
            Op::AllReduceF64 => "all_reduce_sum_f64",
            Op::ReduceScatterF32 => "reduce_scatter_sum_f32",
            Op::AllGatherF32 => "all_gather_f32",
            Op::Broadcast => "broadcast_bytes",
            Op::Barrier => "barrier",
        }
    }

    fn from_code(c: u8) -> Option<Op> {
        Some(match c {
            1 => Op::AllReduceF32,
            2 => Op::AllReduceF64,
            3 => Op::ReduceScatterF32,
            4 => Op::AllGatherF32,
            5 => Op::Broadcast,
            6 => Op::Barrier,
            _ => return None,
        })
    }
}

impl RingCollective {
    /// Binds a listener (port 0 is fine) before rendezvous so its address can be published.
    pub fn listen(addr: SocketAddr) -> Result<RingListener, CollectiveError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            CollectiveError::InvalidArgument(format!(
                "cannot listen on {addr} for the collective ring: {e}"
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| {
            CollectiveError::InvalidArgument(format!(
                "listener on {addr} has no local address: {e}"
            ))
        })?;
        Ok(RingListener { listener, addr })
    }

    /// Forms the ring: rank r connects to rank (r+1)%n's address and accepts from rank (r-1)%n; a handshake
    /// checks rank, world size and `generation` so a stale process from an older generation can't join; every
    /// operation and the connect itself respect `timeout` (a dead or hung peer becomes an error, never a hang).
    /// `peers[i]` is rank i's listener address; the world size is `peers.len()`.
    pub fn connect(
        listener: RingListener,
        rank: usize,
        peers: &[SocketAddr],
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::connect_or_abort(
            listener,
            rank,
            peers,
            generation,
            timeout,
            &AtomicBool::new(false),
        )
    }

    /// [`RingCollective::connect`] that also gives up, with [`CollectiveError::Aborted`], as soon as `abort` is
    /// set while it waits for a peer: a worker whose world the coordinator dissolved (a member left before
    /// joining) stops waiting then instead of at the timeout.
    pub fn connect_or_abort(
        listener: RingListener,
        rank: usize,
        peers: &[SocketAddr],
        generation: u64,
        timeout: Duration,
        abort: &AtomicBool,
    ) -> Result<Self, CollectiveError> {
        let aborted = || {
            abort.load(Ordering::Relaxed).then(|| {
                CollectiveError::Aborted(format!(
                    "generation {generation} was dissolved while rank {rank} formed the ring"
                ))
            })
        };
        let world = peers.len();
        if rank >= world {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank {rank} out of range for {world} peer addresses"
            )));
        }
        if timeout.is_zero() {
            return Err(CollectiveError::InvalidArgument(
                "collective timeout must be positive".into(),
            ));
        }
        // Far enough for "never", near enough that `Instant + timeout` cannot overflow.
        let timeout = timeout.min(Duration::from_secs(365 * 24 * 3600));
        let mut ring = RingCollective {
            rank,
            world,
            generation,
            timeout,
            links: None,
            calls: 0,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            scratch: Vec::new(),
            broken: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let spot = Spot {
            rank,
            world,
            generation,
            next_rank: (rank + 1) % world,
            prev_rank: (rank + world - 1) % world,
            next_addr: peers[(rank + 1) % world],
            timeout,
            deadline: Instant::now() + timeout,
        };
        let next = spot.connect_next(&aborted)?;
        let prev = spot.accept_prev(listener, &next, &aborted)?;
        for s in [&next, &prev] {
            s.set_nonblocking(true)
                .map_err(|e| spot.hs_err(spot.next_rank, e))?;
        }
        ring.links = Some((
            Link {
                stream: next,
                peer: spot.next_rank,
            },
            Link {
                stream: prev,
                peer: spot.prev_rank,
            },
        ));
        tracing::debug!(rank, world, generation, "collective ring formed");
        Ok(ring)
    }

    /// The pipelining unit and receive-scratch size (default [`DEFAULT_SEGMENT_BYTES`]). Ranks may differ.
    pub fn set_segment_bytes(&mut self, bytes: usize) {
        self.segment_bytes = bytes.max(64);
        self.scratch = Vec::new();
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one operation: refuses if broken, marks broken on error (and on a mismatch shuts the sockets so the
    /// other ranks fail fast instead of waiting for the timeout).
    fn guarded<R>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<R, CollectiveError>,
    ) -> Result<R, CollectiveError> {
        if let Some(why) = &self.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let r = f(self);
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
            if matches!(e, CollectiveError::Mismatch { .. }) {
                if let Some((next, prev)) = &self.links {
                    let _ = next.stream.shutdown(Shutdown::Both);
                    let _ = prev.stream.shutdown(Shutdown::Both);
                }
            }
        }
        r
    }

    fn op_name(&self, op: Op) -> String {
        format!("{} (call {})", op.name(), self.calls)
    }

    fn run<T: Pod>(
        &mut self,
        op: Op,
        buf: &mut [T],
        add: fn(&mut [u8], &[u8]),
        plan: &Plan,
    ) -> Result<(), CollectiveError> {
        let name = self.op_name(op);
        let (next, prev) = self.links.as_ref().expect("world > 1 has links");
        let need = self.segment_bytes.div_ceil(8);
        if plan.recvs.iter().any(|r| r.mode == Mode::Add) && self.scratch.len() < need {
            self.scratch = vec![0u64; need];
        }
        let scratch = as_bytes_mut_u64(&mut self.scratch[..]);
        run_plan(
            next,
            prev,
            scratch,
            self.timeout,
            &name,
            as_bytes_mut(buf),
            std::mem::size_of::<T>(),
            add,
            plan,
        )
    }

    /// The header exchange that starts every operation: each rank sends its view to next and checks prev's.
    fn begin(
        &mut self,
        op: Op,
        elem: usize,
        len: usize,
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.calls += 1;
        let mut h = Vec::with_capacity(2 * HEADER_LEN);
        put_u32(&mut h, HEADER_MAGIC);
        h.push(op as u8);
        h.push(elem as u8);
        h.extend_from_slice(&[0, 0]);
        put_u32(&mut h, root as u32);
        put_u32(&mut h, 0);
        put_u64(&mut h, self.calls);
        put_u64(&mut h, len as u64);
        put_u64(&mut h, self.generation);
        debug_assert_eq!(h.len(), HEADER_LEN);
        h.resize(2 * HEADER_LEN, 0);
        let plan = Plan {
            sends: vec![SendItem {
                start: 0,
                end: HEADER_LEN,
                after_recvs: 0,
            }],
            recvs: vec![RecvItem {
                start: HEADER_LEN,
                end: 2 * HEADER_LEN,
                mode: Mode::Copy,
                after_sends: 0,
            }],
        };
        self.run(op, &mut h[..], add_into::<u8>, &plan)?;
        let (ours, theirs) = h.split_at(HEADER_LEN);
        let prev = (self.rank + self.world - 1) % self.world;
        let mismatch = |detail: String| CollectiveError::Mismatch {
            peer: prev,
            op: self.op_name(op),
            detail,
        };
        if get_u32(theirs, 0) != HEADER_MAGIC {
            return Err(mismatch("garbled operation header".into()));
        }
        let their_op = Op::from_code(theirs[4]);
        if theirs[4] != ours[4] || theirs[5] != ours[5] {
            let t = their_op.map(Op::name).unwrap_or("an unknown operation");
            return Err(mismatch(format!("it runs {t}, we run {}", op.name())));
        }
        let pairs = [
            ("root", 8, 4),
            ("call number", 16, 8),
            ("buffer length", 24, 8),
            ("generation", 32, 8),
        ];
        for (what, at, size) in pairs {
            let (a, b) = if size == 4 {
                (u64::from(get_u32(ours, at)), u64::from(get_u32(theirs, at)))
            } else {
                (get_u64(ours, at), get_u64(theirs, at))
            };
            if a != b {
                return Err(mismatch(format!("{what} {b}, ours {a}")));
            }
        }
        Ok(())
    }

    fn all_reduce_steps<T: Pod + std::ops::Add<Output = T>>(
        &mut self,
        op: Op,
        buf: &mut [T],
        steps: Range<usize>,
    ) -> Result<(), CollectiveError> {
        let elem = std::mem::size_of::<T>();
        self.begin(op, elem, buf.len(), 0)?;
        let seg_elems = (self.segment_bytes / elem).max(1);
        let plan = ring_plan(buf.len(), self.world, self.rank, elem, seg_elems, steps);
        self.run(op, buf, add_into::<T>, &plan)
    }
}

fn as_bytes_mut_u64(buf: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is valid.
    unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf))
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let steps = 0..2 * (self.world - 1);
        self.guarded(|s| s.all_reduce_steps(Op::AllReduceF32, buf, steps))
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let steps = 0..2 * (self.world - 1);
        self.guarded(|s| s.all_reduce_steps(Op::AllReduceF64, buf, steps))
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return self.guarded(|s| {
                Err(CollectiveError::InvalidArgument(format!(
                    "broadcast root {root} out of 0..{}",
                    s.world
                )))
            });
        }
        if self.world == 1 {
            return Ok(());
        }
        self.guarded(|s| {
            s.begin(Op::Broadcast, 1, 0, root)?;
            // The length first, along the same chain, then the bytes.
            let mut len = (buf.len() as u64).to_le_bytes();
            let plan = chain_plan(8, s.world, s.rank, root, 8);
            s.run(Op::Broadcast, &mut len[..], add_into::<u8>, &plan)?;
            if s.rank != root {
                let n = u64::from_le_bytes(len) as usize;
                buf.clear();
                buf.resize(n, 0);
            }
            let plan = chain_plan(buf.len(), s.world, s.rank, root, s.segment_bytes);
            s.run(Op::Broadcast, &mut buf[..], add_into::<u8>, &plan)
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        // An all-reduce of one value per rank: nobody's result is complete before everybody contributed.
        let mut v = vec![1f32; self.world];
        let steps = 0..2 * (self.world - 1);
        self.guarded(|s| s.all_reduce_steps(Op::Barrier, &mut v[..], steps))?;
        debug_assert!(v.iter().all(|&x| x == self.world as f32));
        Ok(())
    }

    fn reduce_scatter_sum_f32(&mut self, buf: &mut [f32]) -> Result<Range<usize>, CollectiveError> {
        let mine = chunk_range(buf.len(), self.world, self.rank);
        if self.world == 1 {
            return Ok(mine);
        }
        let steps = 0..self.world - 1;
        self.guarded(|s| s.all_reduce_steps(Op::ReduceScatterF32, buf, steps))?;
        Ok(mine)
    }

    fn all_gather_f32(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let steps = self.world - 1..2 * (self.world - 1);
        self.guarded(|s| s.all_reduce_steps(Op::AllGatherF32, buf, steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates the plan of every rank in lockstep-free fashion (items complete in dependency order) and
    /// checks the arithmetic: every rank ends with the ring-order sum, and no item reads bytes that are not ready.
    fn simulate(len: usize, world: usize, seg: usize) -> Vec<Vec<f64>> {
        let mut data: Vec<Vec<f64>> = (0..world)
            .map(|r| {
                (0..len)
                    .map(|i| ((r * 7919 + i * 31) % 1000) as f64)
                    .collect()
            })
            .collect();
        let plans: Vec<Plan> = (0..world)
            .map(|r| ring_plan(len, world, r, 8, seg, 0..2 * (world - 1)))
            .collect();
        let mut si = vec![0usize; world];
        let mut ri = vec![0usize; world];
        // In-flight messages from rank r to r+1 (values captured at send time).
        let mut wire: Vec<std::collections::VecDeque<Vec<f64>>> = vec![Default::default(); world];
        loop {
            let mut moved = false;
            for r in 0..world {
                let p = &plans[r];
                if si[r] < p.sends.len() && ri[r] >= p.sends[si[r]].after_recvs {
                    let it = &p.sends[si[r]];
                    wire[r].push_back(data[r][it.start / 8..it.end / 8].to_vec());
                    si[r] += 1;
                    moved = true;
                }
                let prev = (r + world - 1) % world;
                if ri[r] < p.recvs.len() && si[r] >= p.recvs[ri[r]].after_sends {
                    if let Some(msg) = wire[prev].pop_front() {
                        let it = &p.recvs[ri[r]];
                        assert_eq!(msg.len(), (it.end - it.start) / 8);
                        for (k, v) in msg.into_iter().enumerate() {
                            let x = &mut data[r][it.start / 8 + k];
                            *x = if it.mode == Mode::Add { *x + v } else { v };
                        }
                        ri[r] += 1;
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
        for r in 0..world {
            assert_eq!(si[r], plans[r].sends.len(), "rank {r} stuck sending");
            assert_eq!(ri[r], plans[r].recvs.len(), "rank {r} stuck receiving");
        }
        data
    }

    #[test]
    fn ring_plan_computes_the_sum_for_every_rank() {
        for world in 2..=5 {
            for len in [0usize, 1, world - 1, world, 7, 33, 100] {
                for seg in [1usize, 2, 3, 64] {
                    let out = simulate(len, world, seg);
                    for i in 0..len {
                        let want: f64 = (0..world)
                            .map(|r| ((r * 7919 + i * 31) % 1000) as f64)
                            .sum();
                        for (r, d) in out.iter().enumerate() {
                            assert_eq!(
                                d[i], want,
                                "world {world} len {len} seg {seg} rank {r} elem {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chain_plan_relays() {
        let p = chain_plan(10, 3, 0, 0, 4);
        assert!(p.recvs.is_empty());
        assert_eq!(p.sends.len(), 3);
        let p = chain_plan(10, 3, 1, 0, 4);
        assert_eq!((p.sends.len(), p.recvs.len()), (3, 3));
        assert_eq!(p.sends[2].after_recvs, 3);
        let p = chain_plan(10, 3, 2, 0, 4);
        assert!(p.sends.is_empty());
        assert_eq!(p.recvs.len(), 3);
    }

    #[test]
    fn hello_checks() {
        let h = hello(1, 3, 7);
        assert!(check_hello(&h, 1, 3, 7).is_ok());
        let refusal =
            |e: usize, w: usize, g: u64| check_hello(&h, e, w, g).unwrap_err().to_string();
        assert!(refusal(1, 3, 8).contains("generation 7, ours 8"));
        assert!(refusal(2, 3, 7).contains("expected rank 2"));
        assert!(refusal(1, 4, 7).contains("world size 3, ours 4"));
        let mut bad = h.clone();
        bad[0] ^= 1;
        assert_eq!(check_hello(&bad, 1, 3, 7), Err(HelloRefusal::BadMagic));
    }
}
