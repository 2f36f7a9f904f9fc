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

/// Element types moved by the engine: plain numbers with no padding, every bit pattern valid.
trait Pod: Copy + 'static {}
impl Pod for u8 {}
impl Pod for f32 {}
impl Pod for f64 {}

fn as_bytes_mut<T: Pod>(buf: &mut [T]) -> &mut [u8] {
    // SAFETY: T is a plain number type (Pod): no padding, any byte pattern is a valid T.
    unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf))
    }
}

/// `dst[i] += src[i]` over the elements of T held in two element-aligned byte slices of equal length.
fn add_into<T: Pod + std::ops::Add<Output = T>>(dst: &mut [u8], src: &[u8]) {
    let size = std::mem::size_of::<T>();
    assert!(dst.len() == src.len() && dst.len() % size == 0);
    assert!(dst.as_ptr() as usize % std::mem::align_of::<T>() == 0);
    assert!(src.as_ptr() as usize % std::mem::align_of::<T>() == 0);
    let n = dst.len() / size;
    // SAFETY: lengths and alignment checked above; T is Pod; the slices do not overlap (distinct buffers).
    let d = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut T, n) };
    let s = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const T, n) };
    for (a, b) in d.iter_mut().zip(s) {
        *a = *a + *b;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Add the received values into the buffer (through the scratch segment).
    Add,
    /// Receive straight into the buffer.
    Copy,
}

/// Send bytes `start..end` of the buffer once `after_recvs` receive items are complete.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SendItem {
    start: usize,
    end: usize,
    after_recvs: usize,
}

/// Receive bytes `start..end` of the buffer once `after_sends` send items are complete (their bytes may be
/// overwritten only after they left).
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecvItem {
    start: usize,
    end: usize,
    mode: Mode,
    after_sends: usize,
}

#[derive(Default, Debug)]
struct Plan {
    sends: Vec<SendItem>,
    recvs: Vec<RecvItem>,
}

/// Segments of chunk `c` in elements.
fn segments(
    len: usize,
    world: usize,
    c: usize,
    seg_elems: usize,
) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk_range(len, world, c);
    let seg = seg_elems.max(1);
    (chunk.start..chunk.end)
        .step_by(seg)
        .map(move |s| s..(s + seg).min(chunk.end))
}

/// The ring schedule for global steps `steps` (a sub-range of `0..2(world-1)`), in bytes.
/// Step `g` sends chunk `(rank-1-g) mod n` and receives chunk `(rank-2-g) mod n`; steps below `n-1` reduce.
fn ring_plan(
    len: usize,
    world: usize,
    rank: usize,
    elem: usize,
    seg_elems: usize,
    steps: Range<usize>,
) -> Plan {
    let n = world;
    let send_chunk = |g: usize| (rank + 2 * n - 1 - g) % n;
    let recv_chunk = |g: usize| (rank + 3 * n - 2 - g) % n;
    let count = |c: usize| segments(len, n, c, seg_elems).count();
    let g0 = steps.start;
    let (mut send_start, mut recv_start) = (Vec::new(), Vec::new());
    let (mut ns, mut nr) = (0, 0);
    for g in steps.clone() {
        send_start.push(ns);
        ns += count(send_chunk(g));
        recv_start.push(nr);
        nr += count(recv_chunk(g));
    }
    let mut plan = Plan {
        sends: Vec::with_capacity(ns),
        recvs: Vec::with_capacity(nr),
    };
    for g in steps {
        for (k, seg) in segments(len, n, send_chunk(g), seg_elems).enumerate() {
            // The chunk sent at step g is the one received at step g-1.
            let after_recvs = if g > g0 {
                recv_start[g - 1 - g0] + k + 1
            } else {
                0
            };
            plan.sends.push(SendItem {
                start: seg.start * elem,
                end: seg.end * elem,
                after_recvs,
            });
        }
        for (k, seg) in segments(len, n, recv_chunk(g), seg_elems).enumerate() {
            // The chunk received at step g was last sent at step g+1-n.
            let after_sends = if g + 1 >= n + g0 {
                send_start[g + 1 - n - g0] + k + 1
            } else {
                0
            };
            let mode = if g + 1 < n { Mode::Add } else { Mode::Copy };
            plan.recvs.push(RecvItem {
                start: seg.start * elem,
                end: seg.end * elem,
                mode,
                after_sends,
            });
        }
    }
    plan
}

/// Broadcast along the chain root, root+1, …, root-1: receive each segment, then forward it.
fn chain_plan(len: usize, world: usize, rank: usize, root: usize, seg: usize) -> Plan {
    let pos = (rank + world - root) % world;
    let seg = seg.max(1);
    let mut plan = Plan::default();
    for (k, s) in (0..len).step_by(seg).enumerate() {
        let end = (s + seg).min(len);
        if pos > 0 {
            plan.recvs.push(RecvItem {
                start: s,
                end,
                mode: Mode::Copy,
                after_sends: 0,
            });
        }
        if pos + 1 < world {
            let after_recvs = if pos > 0 { k + 1 } else { 0 };
            plan.sends.push(SendItem {
                start: s,
                end,
                after_recvs,
            });
        }
    }
    plan
}

fn poll_ms(d: Duration) -> i32 {
    d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

/// Runs `plan` over `bytes`: the send items go to `next`, the receive items come from `prev`, interleaved on
/// non-blocking sockets. `add` adds received elements (`elem` bytes each) into the buffer.
#[allow(clippy::too_many_arguments)]
fn run_plan(
    next: &Link,
    prev: &Link,
    scratch: &mut [u8],
    timeout: Duration,
    op: &str,
    bytes: &mut [u8],
    elem: usize,
    add: fn(&mut [u8], &[u8]),
    plan: &Plan,
) -> Result<(), CollectiveError> {
    let mut e = Engine {
        next,
        prev,
        scratch,
        op,
        bytes,
        elem,
        add,
        plan,
        si: 0,
        soff: 0,
        ri: 0,
        roff: 0,
        radded: 0,
    };
    let mut last_progress = Instant::now();
    loop {
        let (sent, want_out) = e.pump_sends()?;
        let (received, want_in) = e.pump_recvs()?;
        if e.si == plan.sends.len() && e.ri == plan.recvs.len() {
            return Ok(());
        }
        // Only bytes from prev reset the timeout. Writes do not: a hung peer's kernel still takes data now and
        // then (window probes, receive-queue collapsing) long after the peer stopped reading.
        if received {
            last_progress = Instant::now();
        }
        if sent || received {
            continue; // try again before polling
        }
        let waited = last_progress.elapsed();
        if waited >= timeout {
            return Err(e.timeout_error(want_in, want_out, timeout));
        }
        e.wait(want_in, want_out, timeout - waited)?;
    }
}

/// One plan in flight: the links, the buffers, and how far the sends (item `si`, byte `soff`) and receives
/// (item `ri`, byte `roff`, of which `radded` are already added in) have come.
struct Engine<'a> {
    next: &'a Link,
    prev: &'a Link,
    scratch: &'a mut [u8],
    op: &'a str,
    bytes: &'a mut [u8],
    elem: usize,
    add: fn(&mut [u8], &[u8]),
    plan: &'a Plan,
    si: usize,
    soff: usize,
    ri: usize,
    roff: usize,
    radded: usize,
}

impl Engine<'_> {
    fn io_err(&self, peer: usize, source: io::Error) -> CollectiveError {
        CollectiveError::Io {
            peer,
            op: self.op.to_string(),
            source,
        }
    }

    fn closed(&self, peer: usize) -> CollectiveError {
        CollectiveError::PeerClosed {
            peer,
            op: self.op.to_string(),
        }
    }

    /// Writes what the plan allows now. Returns (some bytes left, next would block).
    fn pump_sends(&mut self) -> Result<(bool, bool), CollectiveError> {
        let (plan, mut moved) = (self.plan, false);
        while self.si < plan.sends.len() {
            let it = &plan.sends[self.si];
            if it.start == it.end {
                self.si += 1;
                continue;
            }
            if self.ri < it.after_recvs {
                break;
            }
            match (&self.next.stream).write(&self.bytes[it.start + self.soff..it.end]) {
                Ok(0) => return Err(self.closed(self.next.peer)),
                Ok(k) => {
                    moved = true;
                    self.soff += k;
                    if it.start + self.soff == it.end {
                        self.si += 1;
                        self.soff = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((moved, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(self.next.peer, e)),
            }
        }
        Ok((moved, false))
    }

    /// Reads what the plan allows now, adding as it arrives. Returns (some bytes came, prev would block).
    fn pump_recvs(&mut self) -> Result<(bool, bool), CollectiveError> {
        let (plan, mut moved) = (self.plan, false);
        while self.ri < plan.recvs.len() {
            let it = &plan.recvs[self.ri];
            let len = it.end - it.start;
            if len == 0 {
                self.ri += 1;
                continue;
            }
            if self.si < it.after_sends {
                break;
            }
            let res = match it.mode {
                Mode::Copy => {
                    (&self.prev.stream).read(&mut self.bytes[it.start + self.roff..it.end])
                }
                Mode::Add => (&self.prev.stream).read(&mut self.scratch[self.roff..len]),
            };
            match res {
                Ok(0) => return Err(self.closed(self.prev.peer)),
                Ok(k) => {
                    moved = true;
                    self.roff += k;
                    if it.mode == Mode::Add {
                        self.add_complete(it.start);
                    }
                    if self.roff == len {
                        self.ri += 1;
                        self.roff = 0;
                        self.radded = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((moved, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(self.prev.peer, e)),
            }
        }
        Ok((moved, false))
    }

    /// Adds what arrived while it is still in cache; a partial element waits.
    fn add_complete(&mut self, start: usize) {
        let complete = self.roff - self.roff % self.elem;
        if complete > self.radded {
            (self.add)(
                &mut self.bytes[start + self.radded..start + complete],
                &self.scratch[self.radded..complete],
            );
            self.radded = complete;
        }
    }

    fn timeout_error(&self, want_in: bool, want_out: bool, timeout: Duration) -> CollectiveError {
        let (prev, next) = (self.prev.peer, self.next.peer);
        let detail = match (want_in, want_out) {
            (true, true) => format!("no data from rank {prev} and rank {next} is not taking data"),
            (true, false) => format!("no data from rank {prev}"),
            _ => format!("rank {next} is not taking data"),
        };
        CollectiveError::Timeout {
            peer: if want_in { prev } else { next },
            op: self.op.to_string(),
            timeout,
            detail,
        }
    }

    /// Polls until a link can move (or `remaining` passes). Next never sends on its link after the handshake:
    /// readable there means it hung up. Watched only while we still have bytes for it: once our sends are done,
    /// next may finish and exit normally.
    fn wait(
        &self,
        want_in: bool,
        want_out: bool,
        remaining: Duration,
    ) -> Result<(), CollectiveError> {
        let watch_next = self.si < self.plan.sends.len();
        let mut fds = Vec::with_capacity(2);
        if watch_next {
            let out = if want_out { libc::POLLOUT } else { 0 };
            fds.push(libc::pollfd {
                fd: self.next.stream.as_raw_fd(),
                events: libc::POLLIN | out,
                revents: 0,
            });
        }
        if want_in {
            fds.push(libc::pollfd {
                fd: self.prev.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        debug_assert!(!fds.is_empty(), "ring engine waiting on nothing");
        // SAFETY: fds is a valid array of fds.len() pollfd structs.
        let r = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                poll_ms(remaining),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(self.io_err(self.next.peer, e)),
            };
        }
        if want_in && fds.last().is_some_and(|f| f.revents != 0) {
            return Ok(()); // the read will see data, end of stream or the error
        }
        if watch_next && fds[0].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
            self.probe_next()?;
        }
        Ok(())
    }

    /// Next's link became readable: it hung up, or sent what it never should.
    fn probe_next(&self) -> Result<(), CollectiveError> {
        let mut probe = [0u8; 1];
        match (&self.next.stream).read(&mut probe) {
            Ok(0) => Err(self.closed(self.next.peer)),
            Ok(_) => Err(CollectiveError::Mismatch {
                peer: self.next.peer,
                op: self.op.to_string(),
                detail: "unexpected data on the sending link".into(),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.io_err(self.next.peer, e)),
        }
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn hello(rank: usize, world: usize, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&HELLO_MAGIC);
    put_u32(&mut b, PROTOCOL_VERSION);
    put_u32(&mut b, rank as u32);
    put_u32(&mut b, world as u32);
    put_u64(&mut b, generation);
    b
}

fn reply(ok: bool, rank: usize, world: usize, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(REPLY_LEN);
    b.extend_from_slice(&HELLO_MAGIC);
    put_u32(&mut b, PROTOCOL_VERSION);
    put_u32(&mut b, u32::from(!ok));
    put_u32(&mut b, rank as u32);
    put_u32(&mut b, world as u32);
    put_u64(&mut b, generation);
    b
}

/// What the acceptor expects from a hello; `Err(description)` when it is refused.
fn check_hello(b: &[u8], expect_rank: usize, world: usize, generation: u64) -> Result<(), String> {
    if b[..8] != HELLO_MAGIC {
        return Err("not a ddpo ring peer (bad magic)".into());
    }
    let version = get_u32(b, 8);
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version}, ours {PROTOCOL_VERSION}"
        ));
    }
    let (rank, w, g) = (
        get_u32(b, 12) as usize,
        get_u32(b, 16) as usize,
        get_u64(b, 20),
    );
    let mut wrong = Vec::new();
    if g != generation {
        wrong.push(format!("generation {g}, ours {generation}"));
    }
    if w != world {
        wrong.push(format!("world size {w}, ours {world}"));
    }
    if rank != expect_rank {
        wrong.push(format!("claims rank {rank}, expected rank {expect_rank}"));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!("peer claiming rank {rank}: {}", wrong.join(", ")))
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

/// Where this rank sits in the ring being formed: what every handshake step checks against.
struct Spot {
    rank: usize,
    world: usize,
    generation: u64,
    next_rank: usize,
    prev_rank: usize,
    next_addr: SocketAddr,
    timeout: Duration,
    deadline: Instant,
}

impl Spot {
    fn hs_err(&self, peer: usize, source: io::Error) -> CollectiveError {
        CollectiveError::Io {
            peer,
            op: "ring handshake".into(),
            source,
        }
    }

    fn connect_err(&self, source: io::Error) -> CollectiveError {
        CollectiveError::Connect {
            peer: self.next_rank,
            addr: self.next_addr,
            source,
        }
    }

    /// Step 1: connect to next (its listener is bound before rendezvous; retry while it is not up yet) and
    /// send our hello.
    fn connect_next(
        &self,
        aborted: &dyn Fn() -> Option<CollectiveError>,
    ) -> Result<TcpStream, CollectiveError> {
        let next = loop {
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            let wait = remaining.clamp(Duration::from_millis(1), self.timeout);
            match TcpStream::connect_timeout(&self.next_addr, wait) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() + Duration::from_millis(20) >= self.deadline {
                        return Err(self.connect_err(e));
                    }
                    if let Some(e) = aborted() {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        next.set_nodelay(true).map_err(|e| self.connect_err(e))?;
        next.set_write_timeout(Some(self.timeout))
            .map_err(|e| self.connect_err(e))?;
        (&next)
            .write_all(&hello(self.rank, self.world, self.generation))
            .map_err(|e| self.hs_err(self.next_rank, e))?;
        next.set_nonblocking(true)
            .map_err(|e| self.connect_err(e))?;
        Ok(next)
    }

    /// Step 2: accept prev (checking its hello) and read next's verdict on ours, interleaved, until both are
    /// done, the deadline passes or `aborted` says stop.
    fn accept_prev(
        &self,
        listener: RingListener,
        next: &TcpStream,
        aborted: &dyn Fn() -> Option<CollectiveError>,
    ) -> Result<TcpStream, CollectiveError> {
        let RingListener {
            listener,
            addr: listen_addr,
        } = listener;
        let accept_err = |source| CollectiveError::Accept {
            peer: self.prev_rank,
            addr: listen_addr,
            source,
        };
        listener.set_nonblocking(true).map_err(accept_err)?;
        let mut hs = Handshake {
            prev: None,
            verdict: [0u8; REPLY_LEN],
            got: 0,
            refused: Vec::new(),
        };
        loop {
            if hs.prev.is_none() {
                match listener.accept() {
                    Ok((s, from)) => hs.greet(self, s, from)?,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => return Err(accept_err(e)),
                }
            }
            hs.read_verdict(self, next, &listener)?;
            if let (Some(_), REPLY_LEN) = (&hs.prev, hs.got) {
                return Ok(hs.prev.take().expect("checked"));
            }
            if let Some(e) = aborted() {
                return Err(e);
            }
            if Instant::now() >= self.deadline {
                return Err(hs.timeout_error(self, listen_addr));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Step 2's state: prev once accepted, next's verdict so far, and the connections refused meanwhile.
struct Handshake {
    prev: Option<TcpStream>,
    verdict: [u8; REPLY_LEN],
    got: usize,
    refused: Vec<String>,
}

impl Handshake {
    /// Reads the hello of a connection to our listener: prev's is answered yes and kept; anyone else's is
    /// answered no (or dropped when it says nothing in time) and noted for the timeout message.
    fn greet(
        &mut self,
        spot: &Spot,
        s: TcpStream,
        from: SocketAddr,
    ) -> Result<(), CollectiveError> {
        let remaining = spot.deadline.saturating_duration_since(Instant::now());
        let setup = s
            .set_nonblocking(false)
            .and_then(|_| s.set_nodelay(true))
            .and_then(|_| s.set_read_timeout(Some(remaining.max(Duration::from_millis(1)))))
            .and_then(|_| s.set_write_timeout(Some(spot.timeout)));
        let mut h = [0u8; HELLO_LEN];
        if let Err(e) = setup.and_then(|_| (&s).read_exact(&mut h)) {
            self.refused.push(format!("dropped {from} (no hello: {e})"));
            return Ok(());
        }
        let (rank, world, generation) = (spot.rank, spot.world, spot.generation);
        match check_hello(&h, spot.prev_rank, world, generation) {
            Ok(()) => {
                (&s).write_all(&reply(true, rank, world, generation))
                    .map_err(|e| spot.hs_err(spot.prev_rank, e))?;
                self.prev = Some(s);
            }
            Err(why) => {
                let _ = (&s).write_all(&reply(false, rank, world, generation));
                tracing::warn!(from = %from, "collective ring: refused {why}");
                self.refused.push(format!("refused {from} ({why})"));
            }
        }
        Ok(())
    }

    /// Reads what has arrived of next's verdict on our hello; a refusal is an error.
    fn read_verdict(
        &mut self,
        spot: &Spot,
        next: &TcpStream,
        listener: &TcpListener,
    ) -> Result<(), CollectiveError> {
        if self.got == REPLY_LEN {
            return Ok(());
        }
        match (&*next).read(&mut self.verdict[self.got..]) {
            Ok(0) => Err(CollectiveError::PeerClosed {
                peer: spot.next_rank,
                op: "ring handshake".into(),
            }),
            Ok(k) => {
                self.got += k;
                if self.got < REPLY_LEN {
                    return Ok(());
                }
                let (rank, world, generation) = (spot.rank, spot.world, spot.generation);
                check_verdict(
                    &self.verdict,
                    spot.next_rank,
                    spot.next_addr,
                    rank,
                    world,
                    generation,
                )
                // Answer whoever is already waiting in our backlog before going: a peer that is refused
                // learns why, instead of seeing its connection reset.
                .inspect_err(|_| refuse_pending(listener, rank, world, generation))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(spot.hs_err(spot.next_rank, e)),
        }
    }

    /// The timeout error: who we were still waiting for, and who was refused meanwhile.
    fn timeout_error(&self, spot: &Spot, listen_addr: SocketAddr) -> CollectiveError {
        let (prev_rank, next_rank, next_addr) = (spot.prev_rank, spot.next_rank, spot.next_addr);
        let waiting = match (self.prev.is_none(), self.got < REPLY_LEN) {
            (true, true) => format!(
                "waiting for rank {prev_rank} to connect to {listen_addr} and for rank {next_rank} at \
                 {next_addr} to accept"
            ),
            (true, false) => format!("waiting for rank {prev_rank} to connect to {listen_addr}"),
            _ => format!("waiting for rank {next_rank} at {next_addr} to accept our connection"),
        };
        let detail = if self.refused.is_empty() {
            waiting
        } else {
            format!("{waiting}; {}", self.refused.join("; "))
        };
        CollectiveError::Timeout {
            peer: if self.prev.is_none() {
                prev_rank
            } else {
                next_rank
            },
            op: "ring connect".into(),
            timeout: spot.timeout,
            detail,
        }
    }
}

/// Accepts the connections already queued on `listener` and refuses them (we are not joining).
fn refuse_pending(listener: &TcpListener, rank: usize, world: usize, generation: u64) {
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        match listener.accept() {
            Ok((s, _)) => {
                let mut h = [0u8; HELLO_LEN];
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                if (&s).read_exact(&mut h).is_ok() {
                    let _ = (&s).write_all(&reply(false, rank, world, generation));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn check_verdict(
    v: &[u8],
    next_rank: usize,
    next_addr: SocketAddr,
    rank: usize,
    world: usize,
    generation: u64,
) -> Result<(), CollectiveError> {
    let op = "ring connect".to_string();
    if v[..8] != HELLO_MAGIC || get_u32(v, 8) != PROTOCOL_VERSION {
        return Err(CollectiveError::Mismatch {
            peer: next_rank,
            op,
            detail: format!(
                "{next_addr} is not a ddpo ring peer of protocol version {PROTOCOL_VERSION}"
            ),
        });
    }
    let (status, r, w, g) = (
        get_u32(v, 12),
        get_u32(v, 16) as usize,
        get_u32(v, 20) as usize,
        get_u64(v, 24),
    );
    if status != 0 {
        return Err(CollectiveError::Mismatch {
            peer: next_rank,
            op,
            detail: format!(
                "{next_addr} (rank {r} of {w}, generation {g}) refused us (rank {rank} of {world}, generation \
                 {generation})"
            ),
        });
    }
    if g != generation || w != world || r != next_rank {
        return Err(CollectiveError::Mismatch {
            peer: next_rank,
            op,
            detail: format!(
                "{next_addr} is rank {r} of {w} in generation {g}; expected rank {next_rank} of {world} in \
                 generation {generation}"
            ),
        });
    }
    Ok(())
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
        assert!(check_hello(&h, 1, 3, 8)
            .unwrap_err()
            .contains("generation 7, ours 8"));
        assert!(check_hello(&h, 2, 3, 7)
            .unwrap_err()
            .contains("expected rank 2"));
        assert!(check_hello(&h, 1, 4, 7)
            .unwrap_err()
            .contains("world size 3, ours 4"));
    }
}
