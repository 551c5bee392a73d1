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
//! opening); a thread in accept never waits on a peer: the one that accepts a
//! connection pairs it itself and starts the port's next accepting thread
//! before it first waits on a peer (or once the mobile's first octets are
//! passed on), or goes on accepting itself; a connection beyond `max_pairs` is
//! closed at once; a mobile connection takes a responder only once it has
//! something to relay.

use std::borrow::Cow;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    let target = &*origin_form(&head.target);
    let label = shared.labels.get(&name);
    let waiting_here = label.as_ref().map_or(0, |l| l.prune());
    // Local responders always win; else another node's, when it has some.
    if waiting_here == 0
        && let Some(r) = elsewhere(shared, &name, target, peer)
    {
        return Ok(r);
    }
    let label = label.ok_or_else(|| Error::NoResponder(name.clone()))?;
    if waiting_here == 0 && !label.active_within(shared.config.pair_wait) {
        return Err(Error::NoResponder(name));
    }
    let port = port_for(shared, &label)?;
    label.remember_redirect(peer.ip(), target);
    let mut r = Response::text(307, "");
    r.headers.push((
        "Location",
        shared.config.rendezvous_url(&label.name, port, target),
    ));
    r.note = format!("rendezvous {port}");
    Ok(r)
}

/// The path and query of a request target (RFC 9112 section 3.2): itself in
/// origin form; what follows the authority in absolute form
/// (`http://host/p?q`, `http://host?q` as `/?q`); else (`*`, authority form,
/// no path) `/`.
fn origin_form(target: &str) -> Cow<'_, str> {
    if target.starts_with('/') {
        return Cow::Borrowed(target);
    }
    let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
        let head = target.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    });
    let Some(rest) = after_scheme else {
        return Cow::Borrowed("/");
    };
    match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => Cow::Borrowed(&rest[i..]),
        Some(i) => Cow::Owned(format!("/{}", &rest[i..])),
        None => Cow::Borrowed("/"),
    }
}

/// A cross-node 307 for `name` to another node with responders waiting
/// (docs/PROTOCOL.md section 7), when this relay is a node and may give one:
/// the path is stored for that node first, so its pairing keeps it.
fn elsewhere(shared: &Shared, name: &str, target: &str, peer: SocketAddr) -> Option<Response> {
    let dir = shared.directory.as_ref()?;
    if !shared.config.cross_node_redirects {
        return None;
    }
    let remote = dir.pick(name)?;
    if let Err(e) = dir.remember_path(name, peer.ip(), pool::kept_path(target)) {
        // The pairing there will show an empty path; the mobile still gets in.
        log::warn!(
            "{name}: path of {peer}'s 307 to node {} not stored: {e}",
            remote.node
        );
    }
    dir.counters.redirects_given.fetch_add(1, Ordering::Relaxed);
    let mut r = Response::text(307, "");
    let url = shared
        .config
        .node_url(name, &remote.node, &remote.host, remote.offer.port, target);
    r.headers.push(("Location", url));
    r.note = format!(
        "node {} rendezvous {} ({} waiting there)",
        remote.node, remote.offer.port, remote.offer.waiting
    );
    Some(r)
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
    let port = Port {
        shared: shared.clone(),
        label: label.clone(),
        open: open.clone(),
        listener: Arc::new(listener),
    };
    spawn("rendezvous", PAIR_STACK, move || accept_loop(port))
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

/// An open rendezvous port, as its accepting thread holds it.
#[derive(Clone)]
struct Port {
    shared: Arc<Shared>,
    label: Arc<Label>,
    open: Arc<OpenPort>,
    listener: Arc<TcpListener>,
}

/// Accepts on the port until it closes. The thread that accepts a connection
/// pairs and relays it itself, and starts the port's next accepting thread
/// once the mobile's first octets have been passed on, or before it first
/// waits on a peer: so those octets wait for no thread start, and the port is
/// without a thread in accept only for that while. A thread that never
/// started its successor (the mobile left or was refused, or no thread could
/// be had: that connection is closed) goes on accepting itself.
fn accept_loop(mut port: Port) {
    loop {
        let accepted = port.listener.accept();
        if port.open.is_closed() || port.shared.stopping() {
            break;
        }
        let (mobile, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                let what = format!("rendezvous {}: {e}", port.open.port);
                port.shared.refuse(Limit::Accept, &what);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        port.open.touch();
        let permit = match port.shared.acquire_pair(peer.ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                let what = format!("{} from {peer}", port.label.name);
                port.shared.refuse(limit, &what);
                continue;
            }
        };
        let (shared, label) = (port.shared.clone(), port.label.clone());
        let mut next = Some(port);
        pair(&shared, &label, mobile, peer, permit, &mut || {
            start_next(&mut next)
        });
        match next {
            Some(p) => port = p,
            None => return,
        }
    }
    port.shared.metrics.rendezvous_open(-1);
}

/// Starts the port's next accepting thread, once; the port is theirs then
/// (this thread keeps no listener open). When no thread can be had, the port
/// stays here.
fn start_next(next: &mut Option<Port>) -> std::io::Result<()> {
    let Some(port) = next.take() else {
        return Ok(());
    };
    let theirs = port.clone();
    match spawn("rendezvous", PAIR_STACK, move || accept_loop(theirs)) {
        Ok(_) => Ok(()),
        Err(e) => {
            *next = Some(port);
            Err(e)
        }
    }
}

/// Records a pairing here at once and, when this relay is a node, in the
/// shared list, after taking the path of another node's 307 when this node
/// gave none (then patched in here too). The directory work runs on the
/// node's worker, so the pair's first octets wait on no Redis call, and is
/// skipped while Redis is known down.
fn record(shared: &Shared, label: &Arc<Label>, pairing: Pairing, peer: SocketAddr) {
    let Some(dir) = shared.directory.as_ref().filter(|d| d.is_up()) else {
        label.record(pairing);
        return;
    };
    label.record(pairing.clone());
    let label = label.clone();
    dir.later(Box::new(move |dir| {
        let mut pairing = pairing;
        if pairing.pathname.is_empty()
            && let Some(path) = dir.take_path(&label.name, peer.ip())
        {
            dir.counters
                .redirects_received
                .fetch_add(1, Ordering::Relaxed);
            log::info!(
                "pair {}: mobile {peer} was sent by another node for {:?}",
                label.name,
                loggable_target(&path)
            );
            label.patch_path(&pairing, &path);
            pairing.pathname = path;
        }
        match serde_json::to_string(&pairing) {
            Ok(json) => {
                if let Err(e) = dir.record_pairing(&label.name, &json) {
                    log::warn!("pair {}: not recorded for the other nodes: {e}", label.name);
                }
            }
            Err(e) => log::warn!("pair {}: not recorded: {e}", label.name),
        }
    }));
}

/// A connection that never paired: counted as a stale redirect when another
/// node had sent it here (its offer was out of date).
fn unpaired(shared: &Shared, label: &Label, peer: SocketAddr) {
    let Some(dir) = shared.directory.as_ref().filter(|d| d.is_up()) else {
        return;
    };
    let name = label.name.clone();
    dir.later(Box::new(move |dir| {
        if dir.take_path(&name, peer.ip()).is_some() {
            dir.counters.stale_redirects.fetch_add(1, Ordering::Relaxed);
            log::info!("{name}: {peer} was sent here by another node and never paired");
        }
    }));
}

/// Pairs one mobile connection once it has something to relay, and relays it
/// to the end: at once with the oldest responder that already spoke (its
/// octets wait at the relay), else with the oldest responder when the mobile's
/// first octet arrives. A connection silent for `first_octet_timeout` is
/// closed without having taken a responder. `go_on` starts the port's next
/// accepting thread: called before anything here waits on a peer, else by the
/// relay once the mobile's first octets have been passed on; when it fails,
/// the connection is closed.
fn pair(
    shared: &Shared,
    label: &Arc<Label>,
    mobile: TcpStream,
    peer: SocketAddr,
    permit: PairPermit,
    go_on: &mut dyn FnMut() -> std::io::Result<()>,
) {
    let no_thread = |e: std::io::Error| {
        shared.refuse(Limit::Threads, &format!("{} from {peer}: {e}", label.name));
    };
    let (responder, ready) = match label.take_speaking() {
        Some(r) => (
            r,
            relay::Ready {
                mobile: false,
                hidden: true,
            },
        ),
        None => {
            let limit = shared.config.first_octet_timeout;
            let mut state = peer_state(&mobile, Duration::ZERO);
            if state == PeerState::Quiet {
                if let Err(e) = go_on() {
                    return no_thread(e);
                }
                state = peer_state(&mobile, limit);
            }
            match state {
                PeerState::Speaking => {}
                PeerState::Gone => {
                    log::info!("{}: {peer} left without sending anything", label.name);
                    return unpaired(shared, label, peer);
                }
                PeerState::Quiet => {
                    log::info!(
                        "{}: {peer} sent nothing within {} ({} s); closed",
                        label.name,
                        Limit::FirstOctetTimeout,
                        limit.as_secs_f64()
                    );
                    shared.metrics.refused(Limit::FirstOctetTimeout);
                    return unpaired(shared, label, peer);
                }
            }
            let taken = match label.take(Duration::ZERO) {
                Some(r) => Some(r),
                None => match go_on() {
                    Ok(()) => label.take(shared.config.pair_wait),
                    Err(e) => return no_thread(e),
                },
            };
            let Some(r) = taken else {
                log::warn!(
                    "{}: no responder for {peer} within {} ({} s); closed",
                    label.name,
                    Limit::PairWait,
                    shared.config.pair_wait.as_secs_f64()
                );
                shared.metrics.refused(Limit::PairWait);
                return unpaired(shared, label, peer);
            };
            (
                r,
                relay::Ready {
                    mobile: true,
                    hidden: false,
                },
            )
        }
    };
    if !is_alive(&mobile) {
        // The mobile client left while waiting: the responder is not spent.
        log::info!("{}: {peer} left before pairing; responder kept", label.name);
        label.push(responder);
        return;
    }
    let hidden = responder.stream;
    // The responder has both since its plug accepted it.
    let _ = mobile.set_nodelay(true);
    let _ = set_keepalive(&mobile);
    let (mobile, hidden) = (Arc::new(mobile), Arc::new(hidden));
    permit.attach(&mobile, &hidden);
    let pairing = Pairing {
        responder: pool::ip_port(responder.peer),
        initiator: pool::ip_port(peer),
        pathname: label.redirect_path(peer.ip()),
        timestamp: now_millis(),
    };
    log::info!(
        "pair {}: mobile {peer} <-> hidden {} path {:?}",
        label.name,
        responder.peer,
        loggable_target(&pairing.pathname)
    );
    record(shared, label, pairing, peer);
    shared.metrics.pair_opened();
    let started = Instant::now();
    let next_thread = relay::Hook {
        toward: relay::Toward::Hidden,
        by: started,
        after: Duration::ZERO,
        call: go_on,
    };
    let (moved, err) = relay::run_with(
        mobile,
        hidden,
        shared.config.copier,
        shared.config.idle_timeout,
        ready,
        next_thread,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_307_keeps_the_path_and_query_of_any_request_target_form() {
        for (target, want) in [
            ("/a/b?x=1", "/a/b?x=1"),
            ("http://cam.taas.localhost/abs?y=1", "/abs?y=1"),
            ("HTTPS://cam.taas.localhost:8443/p", "/p"),
            ("http://cam.taas.localhost?q=1", "/?q=1"),
            ("http://cam.taas.localhost", "/"),
            ("*", "/"),
            ("cam.taas.localhost:443", "/"),
            ("ftp://x/y", "/"),
        ] {
            assert_eq!(origin_form(target), want, "{target}");
        }
    }
}
