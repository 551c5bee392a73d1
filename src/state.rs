//! What every step of one relay reads: the validated configuration, the store and
//! its guard, the labels, the pairs, the connection counts, the counters; and a
//! snapshot of them for `/status`, `/metrics` and tests.
//!
//! Invariants: this module imports none of the steps (`registrar`, `plug`,
//! `rendezvous`, `status`, `server`): they import it; a pair slot
//! (`PairPermit`) and a connection slot (`limits::Slot`) are given back when
//! dropped, so the counts the limits read are never left high by an error path;
//! "pairs active" means one thing, pairs whose sockets are relaying, and both
//! `/status` and `/metrics` read it from the pairs table.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_channel::{Receiver, bounded};

use crate::auth::Guard;
use crate::config::Config;
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::limits::{Limit, PerAddress, RefusalLog, Slot};
use crate::metrics::Metrics;
use crate::pool::Labels;
use crate::store::Store;
use crate::sys::{listen, lock, random_bytes};

/// State shared by every thread of one relay.
pub struct Shared {
    /// The validated configuration.
    pub(crate) config: Config,
    /// The accounts.
    pub(crate) store: Store,
    /// Throttle and replay rule.
    pub(crate) guard: Guard,
    /// Per-label pools, rendezvous port handles and records.
    pub(crate) labels: Labels,
    /// Relayed pairs, for the limits and for shutdown.
    pub(crate) pairs: Pairs,
    /// Connections on the well-known port (`max_connections`, `…_per_ip`).
    pub(crate) conns: Arc<PerAddress>,
    /// Set once shutdown begins.
    stopping: AtomicBool,
    /// Set when a node has withdrawn from the directory, before it stops:
    /// no more registrations, `/ready` says so, ports still pair.
    withdrawn: AtomicBool,
    /// Counters for `/metrics`.
    pub(crate) metrics: Metrics,
    /// Refusals logged once per burst.
    refusals: RefusalLog,
    /// When the relay started.
    started: Instant,
    /// The shared directory, when this relay is a node of several (`node`).
    pub(crate) directory: Option<Arc<Directory>>,
    /// Labels whose pool went between empty and not (the node's heartbeat
    /// thread publishes them at once); with `directory` only.
    pub(crate) edges: Option<Receiver<String>>,
}

/// Pool edges queued for the directory before the oldest is dropped (the
/// next heartbeat re-writes everything anyway).
const MAX_EDGES: usize = 1024;

/// A pair's two sockets, shared with its relay thread.
type PairSockets = (Arc<TcpStream>, Arc<TcpStream>);
/// Live pairs by permit number; `None` until the pair's sockets are attached.
type LivePairs = HashMap<u64, Option<PairSockets>>;

/// Live pairs, and mobile connections waiting to be paired.
pub struct Pairs {
    /// Next permit number.
    next: AtomicU64,
    /// Permit number to the pair's sockets (once paired).
    live: Mutex<LivePairs>,
    /// Pairs in total (`max_pairs`) and per mobile address (`max_pairs_per_ip`).
    slots: Arc<PerAddress>,
}

impl Pairs {
    /// Pairs and waiting mobile connections now (what `max_pairs` counts).
    pub fn count(&self) -> usize {
        self.live().len()
    }

    /// Pairs relaying now (their sockets attached).
    pub fn active(&self) -> usize {
        self.live().values().filter(|p| p.is_some()).count()
    }

    /// Shuts every relaying pair's sockets down (the end of a shutdown's grace).
    pub fn close_all(&self) {
        for (a, b) in self.live().values().flatten() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    fn live(&self) -> MutexGuard<'_, LivePairs> {
        lock(&self.live)
    }
}

/// A pair slot held by a pairing thread; freed on drop.
pub struct PairPermit {
    /// The relay it belongs to.
    shared: Arc<Shared>,
    /// Its number.
    id: u64,
    /// Its place under `max_pairs` and `max_pairs_per_ip`.
    _slot: Slot,
}

impl PairPermit {
    /// Records the pair's sockets: it is active now, and shutdown can close it.
    pub fn attach(&self, a: &Arc<TcpStream>, b: &Arc<TcpStream>) {
        self.shared
            .pairs
            .live()
            .insert(self.id, Some((a.clone(), b.clone())));
    }
}

impl Drop for PairPermit {
    fn drop(&mut self) {
        self.shared.pairs.live().remove(&self.id);
    }
}

/// What the relay holds now, for operators and tests.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every label a registration created, by name.
    pub labels: Vec<LabelCounts>,
    /// Pair slots held: pairs relaying, and mobile connections waiting for a
    /// responder (what `max_pairs` counts).
    pub pair_slots: usize,
    /// Pairs relaying.
    pub pairs_active: usize,
    /// Connections open on the well-known port.
    pub conns_open: usize,
    /// Seconds since the relay started.
    pub uptime_seconds: u64,
}

/// One label's counts.
#[derive(Clone, Debug, Default)]
pub struct LabelCounts {
    /// The label.
    pub name: String,
    /// Responders waiting (dead ones included until pruned).
    pub waiting: usize,
    /// Plugs open.
    pub plugs_open: usize,
    /// Pairing records kept.
    pub pairings: usize,
}

impl Snapshot {
    /// The counts of `label`, if a registration created it.
    pub fn label(&self, name: &str) -> Option<&LabelCounts> {
        self.labels.iter().find(|l| l.name == name)
    }
}

impl Shared {
    /// The state of a relay about to start.
    pub fn new(config: Config, store: Store, directory: Option<Arc<Directory>>) -> Shared {
        let c = &config;
        let (edges_tx, edges) = match directory {
            Some(_) => {
                let (tx, rx) = bounded(MAX_EDGES);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Shared {
            guard: Guard::new(c.auth_fail_budget, c.auth_fail_refill, directory.clone()),
            labels: Labels::new(c.max_waiting, edges_tx),
            pairs: Pairs {
                next: AtomicU64::new(0),
                live: Mutex::new(HashMap::new()),
                slots: PerAddress::new(
                    (c.max_pairs, Limit::MaxPairs),
                    (c.max_pairs_per_ip, Limit::MaxPairsPerIp),
                ),
            },
            conns: PerAddress::new(
                (c.max_connections, Limit::MaxConnections),
                (c.max_connections_per_ip, Limit::MaxConnectionsPerIp),
            ),
            stopping: AtomicBool::new(false),
            withdrawn: AtomicBool::new(false),
            metrics: Metrics::default(),
            refusals: RefusalLog::default(),
            started: Instant::now(),
            store,
            config,
            directory,
            edges,
        }
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// True once a node has withdrawn its offers (shutdown is near).
    pub fn withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::SeqCst)
    }

    /// Marks the node withdrawn: registrations are refused from now on.
    pub fn withdraw(&self) {
        self.withdrawn.store(true, Ordering::SeqCst);
    }

    /// Begins shutdown; false when it had begun already.
    pub fn stop(&self) -> bool {
        !self.stopping.swap(true, Ordering::SeqCst)
    }

    /// A newcomer refused by `limit`: counted, and logged once per burst.
    pub fn refuse(&self, limit: Limit, detail: &str) {
        self.metrics.refused(limit);
        self.refusals.note(limit, detail);
    }

    /// Ends quiet refusal bursts (the housekeeper).
    pub fn flush_refusals(&self) {
        self.refusals.flush();
    }

    /// A listener on a free port of `port_range`: a random start, then every port
    /// in turn; a busy port is skipped.
    pub fn bind_free_port(&self) -> Result<TcpListener> {
        let (first, last) = self.config.port_range;
        let span = u32::from(last - first) + 1;
        let mut r = [0u8; 4];
        random_bytes(&mut r)?;
        let start = u32::from_le_bytes(r) % span;
        for i in 0..span {
            let port = u16::try_from(u32::from(first) + (start + i) % span).unwrap_or(last);
            if let Ok(l) = listen(SocketAddr::new(self.config.bind_host, port)) {
                return Ok(l);
            }
        }
        Err(Error::NoFreePort)
    }

    /// A pair slot for a mobile from `ip`, or the limit that refused it
    /// (`max_pairs`, `max_pairs_per_ip`).
    pub fn acquire_pair(self: &Arc<Shared>, ip: IpAddr) -> std::result::Result<PairPermit, Limit> {
        let (slot, _) = self.pairs.slots.acquire(ip)?;
        let id = self.pairs.next.fetch_add(1, Ordering::Relaxed);
        self.pairs.live().insert(id, None);
        Ok(PairPermit {
            shared: self.clone(),
            id,
            _slot: slot,
        })
    }

    /// The counts now.
    pub fn snapshot(&self) -> Snapshot {
        let mut labels: Vec<LabelCounts> = self
            .labels
            .all()
            .iter()
            .map(|l| LabelCounts {
                name: l.name.clone(),
                waiting: l.waiting(),
                plugs_open: l.plugs_open(),
                pairings: l.pairing_count(),
            })
            .collect();
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot {
            labels,
            pair_slots: self.pairs.count(),
            pairs_active: self.pairs.active(),
            conns_open: self.conns.open(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }

    /// The `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let snap = self.snapshot();
        let waiting: Vec<(String, usize)> = snap
            .labels
            .into_iter()
            .map(|l| (l.name, l.waiting))
            .collect();
        let mut text = self.metrics.render(&waiting, snap.pairs_active);
        if let Some(dir) = &self.directory {
            text.push_str(&dir.metrics_text());
        }
        text
    }
}
