//! Rendezvous (docs/PROTOCOL.md section 2): a request for `LABEL.servers_domain`
//! is answered 307 to the label's rendezvous port, opened when a mobile client is
//! first sent there, given out in every 307 while open, and closed after
//! `rendezvous_idle` with no waiting responder and no new connection. A label
//! with a fixed port (`LABEL:PORT`) listens there from its first registration
//! until the relay stops. Each connection accepted there is paired once it has
//! something to relay: at accept with the oldest responder that already spoke,
//! else with the oldest at its first octet (within `first_octet_timeout`; a
//! responder is awaited up to `pair_wait`), and relayed.
//!
//! Invariants: at most one open port per label (the label's lock is held while
//! opening); the accept loop only accepts and spawns, it never waits on a peer; a
//! connection beyond `max_pairs` is closed at once; a mobile connection takes a
//! responder only once it has something to relay.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::http::{Head, Response};
use crate::limits::Limit;
use crate::logging::loggable_target;
use crate::pool::{self, Label, OpenPort, Pairing};
use crate::relay;
use crate::state::{PairPermit, Shared};
use crate::sys::{
    PAIR_STACK, PeerState, is_alive, listen, lock, now_millis, peer_state, set_keepalive, spawn,
};

/// The answer to a request for `LABEL.servers_domain`: a 307 to the label's
/// rendezvous port, or 503 when no responder waits and none arrived or was
/// paired within `pair_wait` (a label whose hidden server is refilling its pool
/// after a pairing gets the 307; the connection then waits up to `pair_wait`).
pub fn redirect(
    shared: &Arc<Shared>,
    name: String,
    head: &Head,
    peer: SocketAddr,
) -> Result<Response> {
    let label = shared
        .labels
        .get(&name)
        .ok_or_else(|| Error::NoResponder(name.clone()))?;
    if label.prune() == 0 && !label.active_within(shared.config.pair_wait) {
        return Err(Error::NoResponder(name));
    }
    let port = port_for(shared, &label)?;
    let target = if head.target.starts_with('/') {
        head.target.as_str()
    } else {
        "/"
    };
    label.remember_redirect(peer.ip(), target);
    let mut r = Response::text(307, "");
    r.headers.push((
        "Location",
        shared.config.rendezvous_url(&label.name, port, target),
    ));
    r.note = format!("rendezvous {port}");
    Ok(r)
}

/// The label's rendezvous port, opened if needed, and marked used: its fixed
/// port when it has one (`LABEL:PORT`), else a free port of `port_range`.
pub fn port_for(shared: &Arc<Shared>, label: &Arc<Label>) -> Result<u16> {
    let mut slot = lock(&label.rendezvous);
    if shared.stopping() {
        // Shutdown has closed every port (under this lock): open no new one.
        return Err(Error::Limit("draining"));
    }
    let fixed = label.fixed_port();
    if let Some(open) = slot.as_ref() {
        if fixed.is_none_or(|port| port == open.port) {
            open.touch();
            return Ok(open.port);
        }
        // The account now gives the label another fixed port.
        log::info!(
            "rendezvous {} closed for {}: fixed port changed",
            open.port,
            label.name
        );
        open.close();
        *slot = None;
    }
    let listener = match fixed {
        Some(port) => listen(SocketAddr::new(shared.config.bind_host, port)).map_err(|err| {
            Error::FixedPortUnavailable {
                label: label.name.clone(),
                port,
                err,
            }
        })?,
        None => shared.bind_free_port()?,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("rendezvous bind", e))?;
    let open = Arc::new(OpenPort::new(addr));
    let (s, l, o) = (shared.clone(), label.clone(), open.clone());
    spawn("rendezvous", PAIR_STACK, move || {
        accept_loop(&s, &l, &o, listener)
    })
    .map_err(|e| Error::io("spawn thread", e))?;
    log::info!("rendezvous {} open for {}", open.port, label.name);
    shared.metrics.rendezvous_open(1);
    *slot = Some(open.clone());
    Ok(open.port)
}

/// Closes the rendezvous ports of labels idle longer than `rendezvous_idle` with
/// no waiting responder (called by the housekeeper). A fixed port stays open
/// until the relay stops.
pub fn close_idle(shared: &Shared) {
    for label in shared.labels.all() {
        if label.fixed_port().is_some() {
            continue;
        }
        let mut slot = lock(&label.rendezvous);
        let idle = slot
            .as_ref()
            .is_some_and(|open| open.idle_for() >= shared.config.rendezvous_idle);
        if idle
            && label.waiting() == 0
            && let Some(open) = slot.take()
        {
            log::info!("rendezvous {} closed for {}: idle", open.port, label.name);
            open.close();
        }
    }
}

/// Closes every rendezvous port and every waiting responder (shutdown).
pub fn close_all(shared: &Shared) {
    for label in shared.labels.all() {
        if let Some(open) = lock(&label.rendezvous).take() {
            open.close();
        }
        label.clear();
    }
}

fn accept_loop(shared: &Arc<Shared>, label: &Arc<Label>, open: &OpenPort, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if open.is_closed() || shared.stopping() {
            break;
        }
        let (mobile, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                shared.refuse(Limit::Accept, &format!("rendezvous {}: {e}", open.port));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        open.touch();
        let permit = match shared.acquire_pair(peer.ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                shared.refuse(limit, &format!("{} from {peer}", label.name));
                continue;
            }
        };
        let (s, l) = (shared.clone(), label.clone());
        if let Err(e) = spawn("pair", PAIR_STACK, move || {
            pair(&s, &l, mobile, peer, permit)
        }) {
            shared.refuse(Limit::Threads, &format!("{} from {peer}: {e}", label.name));
        }
    }
    shared.metrics.rendezvous_open(-1);
}

/// Pairs one mobile connection once it has something to relay, and relays it
/// to the end: at once with the oldest responder that already spoke (its
/// octets wait at the relay), else with the oldest responder when the mobile's
/// first octet arrives. A connection silent for `first_octet_timeout` is
/// closed without having taken a responder.
fn pair(shared: &Shared, label: &Label, mobile: TcpStream, peer: SocketAddr, permit: PairPermit) {
    let responder = match label.take_speaking() {
        Some(r) => r,
        None => {
            let limit = shared.config.first_octet_timeout;
            match peer_state(&mobile, limit) {
                PeerState::Speaking => {}
                PeerState::Gone => {
                    log::info!("{}: {peer} left without sending anything", label.name);
                    return;
                }
                PeerState::Quiet => {
                    log::info!(
                        "{}: {peer} sent nothing within {} ({} s); closed",
                        label.name,
                        Limit::FirstOctetTimeout,
                        limit.as_secs_f64()
                    );
                    shared.metrics.refused(Limit::FirstOctetTimeout);
                    return;
                }
            }
            let Some(r) = label.take(shared.config.pair_wait) else {
                log::warn!(
                    "{}: no responder for {peer} within {} ({} s); closed",
                    label.name,
                    Limit::PairWait,
                    shared.config.pair_wait.as_secs_f64()
                );
                shared.metrics.refused(Limit::PairWait);
                return;
            };
            r
        }
    };
    if !is_alive(&mobile) {
        // The mobile client left while waiting: the responder is not spent.
        log::info!("{}: {peer} left before pairing; responder kept", label.name);
        label.push(responder);
        return;
    }
    let hidden = responder.stream;
    for s in [&mobile, &hidden] {
        let _ = s.set_nodelay(true);
        let _ = set_keepalive(s);
    }
    let (mobile, hidden) = (Arc::new(mobile), Arc::new(hidden));
    permit.attach(&mobile, &hidden);
    let record = Pairing {
        responder: pool::ip_port(responder.peer),
        initiator: pool::ip_port(peer),
        pathname: label.redirect_path(peer.ip()),
        timestamp: now_millis(),
    };
    log::info!(
        "pair {}: mobile {peer} <-> hidden {} path {:?}",
        label.name,
        responder.peer,
        loggable_target(&record.pathname)
    );
    label.record(record);
    shared.metrics.pair_opened();
    let started = Instant::now();
    let (moved, err) = relay::run_until_idle(
        mobile,
        hidden,
        shared.config.copier,
        shared.config.idle_timeout,
    );
    // The pair leaves the table (pairs active) before it counts as closed.
    drop(permit);
    shared.metrics.pair_closed(moved.up, moved.down);
    if err.as_ref().is_some_and(relay::is_idle_timeout) {
        shared.metrics.pair_idle_closed();
    }
    let how = err.map_or_else(String::new, |e| format!(" ({e})"));
    log::info!(
        "closed {}: mobile {peer} <-> hidden {}: {} up, {} down in {:.1} s{how}",
        label.name,
        responder.peer,
        moved.up,
        moved.down,
        started.elapsed().as_secs_f64()
    );
}
