//! Forming the ring: the hello and its verdict, checked on both sides, with connecting and accepting
//! interleaved so that no rank waits for another to accept first.

use super::*;

pub(super) fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub(super) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub(super) fn hello(rank: usize, world: usize, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&HELLO_MAGIC);
    put_u32(&mut b, PROTOCOL_VERSION);
    put_u32(&mut b, rank as u32);
    put_u32(&mut b, world as u32);
    put_u64(&mut b, generation);
    b
}

pub(super) fn reply(ok: bool, rank: usize, world: usize, generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(REPLY_LEN);
    b.extend_from_slice(&HELLO_MAGIC);
    put_u32(&mut b, PROTOCOL_VERSION);
    put_u32(&mut b, u32::from(!ok));
    put_u32(&mut b, rank as u32);
    put_u32(&mut b, world as u32);
    put_u64(&mut b, generation);
    b
}

/// Why an acceptor refused a hello (logged; the peer learns only that it was refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HelloRefusal {
    #[error("not a ddpo ring peer (bad magic)")]
    BadMagic,
    #[error("protocol version {0}, ours {PROTOCOL_VERSION}")]
    Version(u32),
    /// Each disagreement (generation, world size, rank) in words.
    #[error("peer claiming rank {rank}: {}", wrong.join(", "))]
    Disagrees { rank: usize, wrong: Vec<String> },
}

/// What the acceptor expects from a hello.
pub(super) fn check_hello(
    b: &[u8],
    expect_rank: usize,
    world: usize,
    generation: u64,
) -> Result<(), HelloRefusal> {
    if b[..8] != HELLO_MAGIC {
        return Err(HelloRefusal::BadMagic);
    }
    let version = get_u32(b, 8);
    if version != PROTOCOL_VERSION {
        return Err(HelloRefusal::Version(version));
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
        Err(HelloRefusal::Disagrees { rank, wrong })
    }
}

/// Where this rank sits in the ring being formed: what every handshake step checks against.
pub(super) struct Spot {
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) generation: u64,
    pub(super) next_rank: usize,
    pub(super) prev_rank: usize,
    pub(super) next_addr: SocketAddr,
    pub(super) timeout: Duration,
    pub(super) deadline: Instant,
}

impl Spot {
    pub(super) fn hs_err(&self, peer: usize, source: io::Error) -> CollectiveError {
        CollectiveError::Io {
            peer,
            op: "ring handshake".into(),
            source,
        }
    }

    pub(super) fn connect_err(&self, source: io::Error) -> CollectiveError {
        CollectiveError::Connect {
            peer: self.next_rank,
            addr: self.next_addr,
            source,
        }
    }

    /// Step 1: connect to next (its listener is bound before rendezvous; retry while it is not up yet) and
    /// send our hello.
    pub(super) fn connect_next(
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
    pub(super) fn accept_prev(
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
pub(super) struct Handshake {
    pub(super) prev: Option<TcpStream>,
    pub(super) verdict: [u8; REPLY_LEN],
    pub(super) got: usize,
    pub(super) refused: Vec<String>,
}

impl Handshake {
    /// Reads the hello of a connection to our listener: prev's is answered yes and kept; anyone else's is
    /// answered no (or dropped when it says nothing in time) and noted for the timeout message.
    pub(super) fn greet(
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
    pub(super) fn read_verdict(
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
    pub(super) fn timeout_error(&self, spot: &Spot, listen_addr: SocketAddr) -> CollectiveError {
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
pub(super) fn refuse_pending(listener: &TcpListener, rank: usize, world: usize, generation: u64) {
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

pub(super) fn check_verdict(
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
