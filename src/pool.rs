//! Per-label state (docs/PROTOCOL.md sections 1 to 3): the pool of waiting
//! responders, the handle of the label's rendezvous port, the last 307s given out
//! and the pairing records. What `plug` puts in and `rendezvous` takes out.
//!
//! Invariants:
//! - a label holds at most `max_waiting` responders and open plugs together: a
//!   plug slot is refused past it (the registration gets 503 before any plug
//!   opens), so a full pool never evicts; order is first in, first paired;
//! - a responder whose peer closed or reset is never handed out: `take` and `prune`
//!   peek without consuming (early octets of an `--eager` agent stay for the mobile
//!   client) and drop the dead;
//! - no thread sits on a waiting responder: it is a socket in a channel;
//! - pairing records are the last `MAX_PAIRINGS`; remembered 307s the last
//!   `MAX_REDIRECTS`.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use serde::{Deserialize, Serialize};

use crate::sys::{PeerState, lock, peer_states, wake};

/// Pairing records kept per label (docs/PROTOCOL.md section 3).
pub const MAX_PAIRINGS: usize = 100;
/// 307s remembered per label, to give a pairing the path that led to it.
pub const MAX_REDIRECTS: usize = 64;
/// How long a 307's path is remembered for its connection to arrive.
pub const REDIRECT_MEMORY: Duration = Duration::from_secs(30);
/// Longest path (with query) a 307 is remembered with for its pairing's
/// record, here and in a node's shared directory; a longer one is cut at a
/// character boundary (the 307 itself keeps the whole).
pub const MAX_KEPT_PATH: usize = 1024;

/// `path` as a pairing's record keeps it: at most `MAX_KEPT_PATH` octets.
pub fn kept_path(path: &str) -> &str {
    let mut end = path.len().min(MAX_KEPT_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// A hidden server's connection, waiting in a pool.
pub struct Responder {
    /// The socket accepted on the plug.
    pub stream: TcpStream,
    /// The hidden server's address.
    pub peer: SocketAddr,
}

impl Responder {
    /// Is the peer still there? A non-blocking peek: EOF or an error means no;
    /// no data or early data means yes. Nothing is consumed.
    pub fn is_alive(&self) -> bool {
        crate::sys::is_alive(&self.stream)
    }
}

/// Each of `responders` with its state, found in one poll for all.
fn with_states(responders: Vec<Responder>) -> impl Iterator<Item = (Responder, PeerState)> {
    let streams: Vec<&TcpStream> = responders.iter().map(|r| &r.stream).collect();
    let states = peer_states(&streams);
    responders.into_iter().zip(states)
}

/// A label's open rendezvous port, as the label keeps it (`rendezvous` opens it
/// and runs its accept loop).
pub struct OpenPort {
    /// The port given out in 307s.
    pub port: u16,
    /// The bound address (to wake the accept loop when closing).
    addr: SocketAddr,
    /// Last 307 or accepted connection.
    last_used: Mutex<Instant>,
    /// Set when closing; the accept loop ends at its next wake-up.
    closed: AtomicBool,
}

impl OpenPort {
    /// The handle of a port just bound at `addr`.
    pub fn new(addr: SocketAddr) -> OpenPort {
        OpenPort {
            port: addr.port(),
            addr,
            last_used: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
        }
    }

    /// Marks the port as used now.
    pub fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    /// Time since last use.
    pub fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }

    /// Stops the accept loop (the listener is dropped there).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        wake(self.addr);
    }

    /// Has `close` been called?
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// One pairing, as `GET /pairings/LABEL` returns it (fields in this order).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pairing {
    /// "IP PORT" of the hidden server side.
    pub responder: String,
    /// "IP PORT" of the mobile side.
    pub initiator: String,
    /// Path of the request that got the 307; empty for a direct connection.
    pub pathname: String,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// Everything the relay keeps for one label.
pub struct Label {
    /// The label, lower case.
    pub name: String,
    /// Sending end of the pool (plugs put responders in).
    tx: Sender<Responder>,
    /// Receiving end of the pool (rendezvous takes them out, oldest first).
    rx: Receiver<Responder>,
    /// Serialises pushes and prunes so eviction keeps FIFO order.
    push_lock: Mutex<()>,
    /// The rendezvous port, while open.
    pub rendezvous: Mutex<Option<Arc<OpenPort>>>,
    /// Recent 307s: mobile address, path with query, when.
    redirects: Mutex<VecDeque<(IpAddr, String, Instant)>>,
    /// The last `MAX_PAIRINGS` pairings, oldest first.
    pairings: Mutex<VecDeque<Pairing>>,
    /// When a responder last arrived or was paired.
    last_active: Mutex<Option<Instant>>,
    /// Plugs open for this label (with the pool, bounded by `max_waiting`).
    plugs: AtomicUsize,
    /// The fixed rendezvous port (`LABEL:PORT`), as the last registration's
    /// account said.
    fixed_port: Mutex<Option<u16>>,
    /// Told the label's name when its pool goes between empty and not (a
    /// node's directory publishes that at once).
    edges: Option<Sender<String>>,
}

/// A plug counted against its label's `max_waiting`, until dropped.
pub struct PlugSlot(Arc<Label>);

impl Drop for PlugSlot {
    fn drop(&mut self) {
        self.0.plugs.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Label {
    /// Responders and open plugs one label may hold together (`max_waiting`, the
    /// pool's capacity). One leaked token cannot take the port range from every
    /// other label, and a hidden server that wants more gets 503, not a loop.
    pub fn max_waiting(&self) -> usize {
        self.tx.capacity().unwrap_or(1).max(1)
    }

    /// A plug slot of this label, or `None` when its pool and open plugs hold
    /// `max_waiting`. At a full label the dead responders are dropped first, so a
    /// refusal is never caused by a stale pool.
    pub fn plug_slot(self: &Arc<Label>) -> Option<PlugSlot> {
        let max = self.max_waiting();
        // Under the push lock: prune and take_speaking empty the channel for a
        // moment while they hold it, and a count taken then would read 0.
        let take = || {
            let _guard = lock(&self.push_lock);
            let waiting = self.rx.len();
            self.plugs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n + waiting < max).then_some(n + 1)
                })
                .is_ok()
        };
        if take() {
            return Some(PlugSlot(self.clone()));
        }
        self.prune();
        take().then(|| PlugSlot(self.clone()))
    }

    /// Plugs open now.
    pub fn plugs_open(&self) -> usize {
        self.plugs.load(Ordering::SeqCst)
    }

    /// Sets the fixed rendezvous port the owner's account gives this label.
    pub fn set_fixed_port(&self, port: Option<u16>) {
        *lock(&self.fixed_port) = port;
    }

    /// The fixed rendezvous port, if the label has one.
    pub fn fixed_port(&self) -> Option<u16> {
        *lock(&self.fixed_port)
    }

    /// A label with an empty pool of capacity `max_waiting`.
    pub fn new(name: &str, max_waiting: usize) -> Label {
        let (tx, rx) = bounded(max_waiting);
        Label {
            name: name.to_string(),
            tx,
            rx,
            push_lock: Mutex::new(()),
            rendezvous: Mutex::new(None),
            redirects: Mutex::new(VecDeque::new()),
            pairings: Mutex::new(VecDeque::new()),
            plugs: AtomicUsize::new(0),
            last_active: Mutex::new(None),
            fixed_port: Mutex::new(None),
            edges: None,
        }
    }

    /// Tells `edges` (if any) that the pool went between empty and not; never
    /// waits (a full channel drops it: the next heartbeat catches up).
    fn edge(&self) {
        if let Some(tx) = &self.edges {
            let _ = tx.try_send(self.name.clone());
        }
    }

    fn touch(&self) {
        *lock(&self.last_active) = Some(Instant::now());
    }

    /// Did a responder arrive or get paired within `window`? A hidden server that
    /// was just paired is registering again: a mobile client sent to the
    /// rendezvous port now is paired with that responder within `pair_wait`.
    pub fn active_within(&self, window: Duration) -> bool {
        lock(&self.last_active).is_some_and(|t| t.elapsed() < window)
    }

    /// Adds a responder. Plug slots keep the pool from filling; should it be full
    /// all the same (a plug that outlived a refusal), the oldest is closed to
    /// make room. Returns the evicted responder's peer, if any.
    pub fn push(&self, responder: Responder) -> Option<SocketAddr> {
        let _guard = lock(&self.push_lock);
        self.touch();
        let mut evicted = None;
        let mut item = responder;
        let was_empty = self.rx.is_empty();
        // Two rounds suffice: only this lock's holder adds, so after one eviction
        // there is room unless the capacity is zero (never: max_waiting >= 1).
        for _ in 0..2 {
            match self.tx.try_send(item) {
                Ok(()) => {
                    if was_empty {
                        self.edge();
                    }
                    return evicted;
                }
                Err(TrySendError::Full(back)) => {
                    item = back;
                    if let Ok(old) = self.rx.try_recv() {
                        evicted = Some(old.peer);
                    }
                }
                Err(TrySendError::Disconnected(_)) => return evicted,
            }
        }
        evicted
    }

    /// The oldest live responder, waiting up to `wait` for one to arrive. Dead
    /// ones met on the way are dropped.
    pub fn take(&self, wait: Duration) -> Option<Responder> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(r) if r.is_alive() => {
                    self.touch();
                    if self.rx.is_empty() {
                        self.edge();
                    }
                    return Some(r);
                }
                Ok(r) => log::info!("{}: dropped dead responder {}", self.name, r.peer),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The oldest live responder that holds early octets (a hidden side that
    /// speaks first, e.g. `--eager`: its banner waits at the relay), if any.
    /// Dead ones met on the way are dropped; the others keep their order.
    pub fn take_speaking(&self) -> Option<Responder> {
        let _guard = lock(&self.push_lock);
        let mut found = None;
        let rest: Vec<Responder> = with_states(self.rx.try_iter().collect())
            .filter_map(|(r, state)| match state {
                PeerState::Gone => None,
                PeerState::Speaking if found.is_none() => {
                    found = Some(r);
                    None
                }
                _ => Some(r),
            })
            .collect();
        for r in rest {
            // Room is certain: these were just taken out and pushes are locked out.
            let _ = self.tx.try_send(r);
        }
        if found.is_some() {
            self.touch();
            if self.rx.is_empty() {
                self.edge();
            }
        }
        found
    }

    /// Drops dead responders, keeping the order of the live; returns how many wait.
    pub fn prune(&self) -> usize {
        let _guard = lock(&self.push_lock);
        let before = self.rx.len();
        let live: Vec<Responder> = with_states(self.rx.try_iter().collect())
            .filter_map(|(r, state)| (state != PeerState::Gone).then_some(r))
            .collect();
        let n = live.len();
        if n == 0 && before > 0 {
            self.edge();
        }
        for r in live {
            // Room is certain: these were just taken out and pushes are locked out.
            let _ = self.tx.try_send(r);
        }
        n
    }

    /// Responders waiting now (dead ones included until pruned).
    pub fn waiting(&self) -> usize {
        self.rx.len()
    }

    /// Closes every waiting responder (shutdown).
    pub fn clear(&self) {
        let before = self.rx.len();
        while self.rx.try_recv().is_ok() {}
        if before > 0 {
            self.edge();
        }
    }

    /// Remembers that `mobile` was sent to the rendezvous port for `path`.
    pub fn remember_redirect(&self, mobile: IpAddr, path: &str) {
        let mut q = lock(&self.redirects);
        if q.len() >= MAX_REDIRECTS {
            q.pop_front();
        }
        q.push_back((mobile, kept_path(path).to_string(), Instant::now()));
    }

    /// The path of the oldest recent 307 given to `mobile`, or "" (a direct
    /// connection to the rendezvous port).
    pub fn redirect_path(&self, mobile: IpAddr) -> String {
        let mut q = lock(&self.redirects);
        q.retain(|(_, _, at)| at.elapsed() < REDIRECT_MEMORY);
        match q.iter().position(|(ip, _, _)| *ip == mobile) {
            Some(i) => q.remove(i).map(|(_, path, _)| path).unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Adds a pairing record, keeping the last `MAX_PAIRINGS`.
    pub fn record(&self, p: Pairing) {
        let mut q = lock(&self.pairings);
        while q.len() >= MAX_PAIRINGS {
            q.pop_front();
        }
        q.push_back(p);
    }

    /// Sets the path of the kept record of `pairing` (found by its mobile
    /// side and time) to `path`: learnt after the record was made.
    pub fn patch_path(&self, pairing: &Pairing, path: &str) {
        let mut q = lock(&self.pairings);
        if let Some(p) = q
            .iter_mut()
            .rev()
            .find(|p| p.initiator == pairing.initiator && p.timestamp == pairing.timestamp)
        {
            p.pathname = path.to_string();
        }
    }

    /// Pairing records kept.
    pub fn pairing_count(&self) -> usize {
        lock(&self.pairings).len()
    }

    /// The pairing records, oldest first.
    pub fn pairings(&self) -> Vec<Pairing> {
        let q = lock(&self.pairings);
        q.iter().cloned().collect()
    }
}

/// All labels the relay has seen a registration for (so bounded by the accounts).
pub struct Labels {
    /// Label name to its state.
    map: Mutex<HashMap<String, Arc<Label>>>,
    /// Pool capacity for new labels.
    max_waiting: usize,
    /// Given to every label (`Label::edges`).
    edges: Option<Sender<String>>,
}

impl Labels {
    /// An empty table; each label tells `edges` when its pool goes between
    /// empty and not.
    pub fn new(max_waiting: usize, edges: Option<Sender<String>>) -> Labels {
        Labels {
            map: Mutex::new(HashMap::new()),
            max_waiting,
            edges,
        }
    }

    /// The label's state, created on first use (registrations only: the caller
    /// has authenticated an owner of `name`).
    pub fn get_or_create(&self, name: &str) -> Arc<Label> {
        let mut map = lock(&self.map);
        map.entry(name.to_string())
            .or_insert_with(|| {
                let mut label = Label::new(name, self.max_waiting);
                label.edges = self.edges.clone();
                Arc::new(label)
            })
            .clone()
    }

    /// The label's state if a registration ever created it.
    pub fn get(&self, name: &str) -> Option<Arc<Label>> {
        let map = lock(&self.map);
        map.get(name).cloned()
    }

    /// Every label's state.
    pub fn all(&self) -> Vec<Arc<Label>> {
        let map = lock(&self.map);
        map.values().cloned().collect()
    }
}

/// "IP PORT", the pairing record's address form.
pub fn ip_port(addr: SocketAddr) -> String {
    format!("{} {}", addr.ip(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_kept_path_is_cut_at_a_character_boundary() {
        assert_eq!(kept_path("/a?b"), "/a?b");
        let long = format!("/{}", "é".repeat(MAX_KEPT_PATH));
        let kept = kept_path(&long);
        assert!(kept.len() <= MAX_KEPT_PATH && kept.len() >= MAX_KEPT_PATH - 1);
        assert!(long.starts_with(kept));
    }

    fn pair(l: &TcpListener) -> (TcpStream, Responder) {
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (stream, peer) = l.accept().unwrap();
        (client, Responder { stream, peer })
    }

    #[test]
    fn fifo_eviction_and_dead_skipping() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let label = Label::new("demo", 2);
        let (c1, r1) = pair(&l);
        let (c2, r2) = pair(&l);
        let (_c3, r3) = pair(&l);
        let (p1, p2, p3) = (r1.peer, r2.peer, r3.peer);
        assert_eq!(label.push(r1), None);
        assert_eq!(label.push(r2), None);
        assert_eq!(label.push(r3), Some(p1), "oldest evicted at a full pool");
        drop(c1);
        drop(c2); // r2 is now dead: it must be skipped.
        std::thread::sleep(Duration::from_millis(50));
        let got = label.take(Duration::from_millis(10)).unwrap();
        assert_eq!(got.peer, p3);
        assert_ne!(got.peer, p2);
        assert!(label.take(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn plug_slots_and_pool_share_max_waiting() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let label = Arc::new(Label::new("demo", 3));
        let (c1, r1) = pair(&l);
        label.push(r1);
        let a = label.plug_slot().expect("1 waiting + 0 plugs < 3");
        let b = label.plug_slot().expect("1 waiting + 1 plug < 3");
        assert!(label.plug_slot().is_none(), "1 waiting + 2 plugs = 3");
        drop(a);
        let a = label.plug_slot().expect("a plug slot was given back");
        assert!(label.plug_slot().is_none());
        // A dead responder frees its place at the next refusal.
        drop(c1);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut slot = None;
        while slot.is_none() && Instant::now() < deadline {
            slot = label.plug_slot();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(slot.is_some(), "the dead responder was pruned");
        assert_eq!(label.waiting(), 0);
        drop((a, b));
        assert_eq!(label.plugs_open(), 1);
    }

    #[test]
    fn peek_keeps_early_octets() {
        use std::io::{Read, Write};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut c, r) = pair(&l);
        c.write_all(b"220 banner").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let label = Label::new("demo", 2);
        label.push(r);
        assert_eq!(label.prune(), 1);
        let mut got = label.take(Duration::ZERO).unwrap();
        let mut buf = [0u8; 10];
        got.stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"220 banner");
    }

    #[test]
    fn pairings_keep_last_hundred_and_redirect_paths_match_by_address() {
        let label = Label::new("demo", 1);
        for i in 0..150 {
            label.record(Pairing {
                responder: "a 1".into(),
                initiator: "b 2".into(),
                pathname: format!("/{i}"),
                timestamp: i,
            });
        }
        let all = label.pairings();
        assert_eq!(all.len(), MAX_PAIRINGS);
        assert_eq!(all[0].pathname, "/50");
        assert_eq!(all[99].pathname, "/149");
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        label.remember_redirect(ip, "/first?q=1");
        label.remember_redirect(ip, "/second");
        assert_eq!(label.redirect_path(ip), "/first?q=1");
        assert_eq!(label.redirect_path("10.0.0.8".parse().unwrap()), "");
        assert_eq!(label.redirect_path(ip), "/second");
    }
}
