//! The data path: schedules of segment sends and receives (the ring all-reduce's steps, the broadcast
//! chain) and the engine that runs one over non-blocking sockets with `poll(2)`.

use super::*;

/// Element types moved by the engine: plain numbers with no padding, every bit pattern valid.
pub(super) trait Pod: Copy + 'static {}
impl Pod for u8 {}
impl Pod for f32 {}
impl Pod for f64 {}

pub(super) fn as_bytes_mut<T: Pod>(buf: &mut [T]) -> &mut [u8] {
    // SAFETY: T is a plain number type (Pod): no padding, any byte pattern is a valid T.
    unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf))
    }
}

/// `dst[i] += src[i]` over the elements of T held in two element-aligned byte slices of equal length.
pub(super) fn add_into<T: Pod + std::ops::Add<Output = T>>(dst: &mut [u8], src: &[u8]) {
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
pub(super) enum Mode {
    /// Add the received values into the buffer (through the scratch segment).
    Add,
    /// Receive straight into the buffer.
    Copy,
}

/// Send bytes `start..end` of the buffer once `after_recvs` receive items are complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SendItem {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) after_recvs: usize,
}

/// Receive bytes `start..end` of the buffer once `after_sends` send items are complete (their bytes may be
/// overwritten only after they left).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RecvItem {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) mode: Mode,
    pub(super) after_sends: usize,
}

#[derive(Default, Debug)]
pub(super) struct Plan {
    pub(super) sends: Vec<SendItem>,
    pub(super) recvs: Vec<RecvItem>,
}

/// Segments of chunk `c` in elements.
pub(super) fn segments(
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
pub(super) fn ring_plan(
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
pub(super) fn chain_plan(len: usize, world: usize, rank: usize, root: usize, seg: usize) -> Plan {
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

pub(super) fn poll_ms(d: Duration) -> i32 {
    d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

/// Runs `plan` over `bytes`: the send items go to `next`, the receive items come from `prev`, interleaved on
/// non-blocking sockets. `add` adds received elements (`elem` bytes each) into the buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_plan(
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
pub(super) struct Engine<'a> {
    pub(super) next: &'a Link,
    pub(super) prev: &'a Link,
    pub(super) scratch: &'a mut [u8],
    pub(super) op: &'a str,
    pub(super) bytes: &'a mut [u8],
    pub(super) elem: usize,
    pub(super) add: fn(&mut [u8], &[u8]),
    pub(super) plan: &'a Plan,
    pub(super) si: usize,
    pub(super) soff: usize,
    pub(super) ri: usize,
    pub(super) roff: usize,
    pub(super) radded: usize,
}

impl Engine<'_> {
    pub(super) fn io_err(&self, peer: usize, source: io::Error) -> CollectiveError {
        CollectiveError::Io {
            peer,
            op: self.op.to_string(),
            source,
        }
    }

    pub(super) fn closed(&self, peer: usize) -> CollectiveError {
        CollectiveError::PeerClosed {
            peer,
            op: self.op.to_string(),
        }
    }

    /// Writes what the plan allows now. Returns (some bytes left, next would block).
    pub(super) fn pump_sends(&mut self) -> Result<(bool, bool), CollectiveError> {
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
    pub(super) fn pump_recvs(&mut self) -> Result<(bool, bool), CollectiveError> {
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
    pub(super) fn add_complete(&mut self, start: usize) {
        let complete = self.roff - self.roff % self.elem;
        if complete > self.radded {
            (self.add)(
                &mut self.bytes[start + self.radded..start + complete],
                &self.scratch[self.radded..complete],
            );
            self.radded = complete;
        }
    }

    pub(super) fn timeout_error(
        &self,
        want_in: bool,
        want_out: bool,
        timeout: Duration,
    ) -> CollectiveError {
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
    pub(super) fn wait(
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
    pub(super) fn probe_next(&self) -> Result<(), CollectiveError> {
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
