//! A relay as one node of several on one Redis (docs/PROTOCOL.md section 7):
//! the heartbeat thread that writes this node's offers to the shared
//! directory (`directory`), the subscriber that keeps the other nodes'
//! offers in the local cache, and the worker that does the directory work
//! of pairings (paths, records) off their threads.
//!
//! Invariants: a label is offered only while responders wait for it here and
//! its rendezvous port is listening (the port is opened for it); a pool going
//! between empty and not is published at once, everything else on the
//! heartbeat; a node whose clock is off from Redis's by more than a TOTP step
//! says so (the registrar then refuses registrations).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::RecvTimeoutError;

use crate::directory::{Directory, HEARTBEAT, Offer};
use crate::error::{Error, Result};
use crate::rendezvous;
use crate::state::Shared;
use crate::sys::{CONN_STACK, spawn};

/// Stack of the node's threads: Redis calls, JSON and Lua arguments (as a
/// connection's thread, which calls the store).
const NODE_STACK: usize = CONN_STACK;

/// The node's threads: `withdraw` ends the heartbeat and the subscriber,
/// `stop` the worker.
pub struct Node {
    /// Ends the heartbeat and the subscriber.
    beat_stop: Arc<AtomicBool>,
    /// Ends the worker.
    work_stop: Arc<AtomicBool>,
    /// The heartbeat and the subscriber.
    threads: Vec<JoinHandle<()>>,
    /// The worker.
    worker: Option<JoinHandle<()>>,
}

impl Node {
    /// Starts the heartbeat and the subscriber for `shared`'s directory, if
    /// it has one.
    pub fn start(shared: &Arc<Shared>) -> Result<Option<Node>> {
        let (Some(dir), Some(edges)) = (shared.directory.clone(), shared.edges.clone()) else {
            return Ok(None);
        };
        let stop = Arc::new(AtomicBool::new(false));
        let work_stop = Arc::new(AtomicBool::new(false));
        let (s, st, d) = (shared.clone(), stop.clone(), dir.clone());
        let beat = spawn("node-beat", NODE_STACK, move || {
            let mut next = Instant::now();
            while !st.load(Ordering::SeqCst) {
                let all = Instant::now() >= next;
                if all {
                    next = Instant::now() + HEARTBEAT;
                }
                let _ = d.publish(offers(&s), all);
                if all {
                    d.check_clock();
                }
                // Until the next beat, or a pool's edge (several at once
                // are one write).
                match edges.recv_timeout(next.saturating_duration_since(Instant::now())) {
                    Ok(_) => while edges.try_recv().is_ok() {},
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .map_err(|e| Error::io("spawn thread", e))?;
        let (st, d) = (stop.clone(), dir.clone());
        let sub = spawn("node-sub", NODE_STACK, move || d.subscribe(&st))
            .map_err(|e| Error::io("spawn thread", e))?;
        let (st, d) = (work_stop.clone(), dir.clone());
        let work = spawn("node-work", NODE_STACK, move || d.work(&st))
            .map_err(|e| Error::io("spawn thread", e))?;
        log::info!(
            "node {} (boot {}) joined the directory at {}",
            dir.node,
            dir.boot,
            shared.config.store.describe()
        );
        Ok(Some(Node {
            beat_stop: stop,
            work_stop,
            threads: vec![beat, sub],
            worker: Some(work),
        }))
    }

    /// Stops the heartbeat and the subscriber (within a heartbeat) and
    /// withdraws this node's entries; the worker goes on recording pairings.
    pub fn withdraw(&mut self, dir: &Directory) {
        self.beat_stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        dir.withdraw();
    }

    /// Stops the worker (after the last pairings were recorded).
    pub fn stop(mut self) {
        self.work_stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Threads not joined (a second shutdown, a failed start) end within
        // a heartbeat.
        self.beat_stop.store(true, Ordering::SeqCst);
        self.work_stop.store(true, Ordering::SeqCst);
    }
}

/// This node's offers: every label with live responders waiting, its
/// rendezvous port opened for it.
fn offers(shared: &Arc<Shared>) -> BTreeMap<String, Offer> {
    let mut offers = BTreeMap::new();
    if shared.stopping() || shared.withdrawn() {
        return offers;
    }
    for label in shared.labels.all() {
        let waiting = label.prune();
        if waiting == 0 {
            continue;
        }
        match rendezvous::port_for(shared, &label) {
            Ok(port) => {
                offers.insert(label.name.clone(), Offer { port, waiting });
            }
            Err(e) => log::warn!("{}: not offered to other nodes: {e}", label.name),
        }
    }
    offers
}
