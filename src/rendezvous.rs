//! Rendezvous (PROTOCOL.md section 2): one port per label, opened when a mobile
//! client is first sent to it, given out in every 307 while open, and closed after
//! `rendezvous_idle` with no waiting responder and no new connection. A label
//! with a fixed port (`LABEL:PORT`) listens there from its first registration
//! until the relay stops. Each
//! connection accepted there is paired with the oldest live waiting responder
//! (waiting up to `pair_wait`) and relayed.
//!
//! Invariants: at most one open port per label (the label's lock is held while
//! opening); a thread in accept never waits on a peer: the one that accepts a
//! connection starts the port's next accepting thread before it first waits
//! on one (or once the mobile's first octets are passed on), or goes on
//! accepting itself; a connection beyond `max_pairs` is closed at once.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::pool::{self, Label, Pairing};
use crate::relay;
use crate::server::{PairPermit, Shared, spawn, wake};

/// Stack of a rendezvous thread: accepts, then pairs, logs and relays the
/// connection it accepted (`relay::run`,
/// whose buffers, when used, are on the heap). Kept under a quarter of
/// `CONN_STACK`: glibc hands a new thread a cached stack up to four times the
/// size asked, and a stack that served a TLS handshake keeps its touched pages.
pub const PAIR_STACK: usize = 48 * 1024;

/// An open rendezvous port.
pub struct Rendezvous {
    /// The port given out in 307s.
    pub port: u16,
    /// The bound address (to wake the accept loop when closing).
    addr: SocketAddr,
    /// Last 307 or accepted connection.
    last_used: Mutex<Instant>,
    /// Set when closing; the accept loop ends at its next wake-up.
    closed: AtomicBool,
}

impl Rendezvous {
    /// Marks the port as used now.
    pub fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Time since last use.
    pub fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Stops the accept loop (the listener is dropped there).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        wake(self.addr);
    }
}

/// The label's rendezvous port, opened if needed, and marked used: its fixed
/// port when it has one (`LABEL:PORT`), else a free port of `port_range`.
pub fn port_for(shared: &Arc<Shared>, label: &Arc<Label>) -> Result<u16> {
    let mut slot = label.rendezvous.lock().unwrap_or_else(|p| p.into_inner());
    let fixed = label.fixed_port();
    if let Some(rv) = slot.as_ref() {
        if fixed.is_none_or(|port| port == rv.port) {
            rv.touch();
            return Ok(rv.port);
        }
        // The account now gives the label another fixed port.
        log::info!(
            "rendezvous {} closed for {}: fixed port changed",
            rv.port,
            label.name
        );
        rv.close();
        *slot = None;
    }
    let listener = match fixed {
        Some(port) => crate::server::listen(SocketAddr::new(shared.config.bind_host, port))
            .map_err(|err| crate::Error::FixedPortUnavailable {
                label: label.name.clone(),
                port,
                err,
            })?,
        None => shared.bind_free_port()?,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| crate::Error::io("rendezvous bind", e))?;
    let rv = Arc::new(Rendezvous {
        port: addr.port(),
        addr,
        last_used: Mutex::new(Instant::now()),
        closed: AtomicBool::new(false),
    });
    let port = Port {
        shared: shared.clone(),
        label: label.clone(),
        rv: rv.clone(),
        listener: Arc::new(listener),
    };
    spawn("rendezvous", PAIR_STACK, move || accept_loop(port))?;
    log::info!("rendezvous {} open for {}", rv.port, label.name);
    shared.metrics.rendezvous_open(1);
    *slot = Some(rv.clone());
    Ok(rv.port)
}

/// Closes the rendezvous ports of labels idle longer than `rendezvous_idle` with
/// no waiting responder (called by the housekeeper). A fixed port stays open
/// until the relay stops.
pub fn close_idle(shared: &Shared) {
    for label in shared.labels.all() {
        if label.fixed_port().is_some() {
            continue;
        }
        let mut slot = label.rendezvous.lock().unwrap_or_else(|p| p.into_inner());
        let idle = slot
            .as_ref()
            .is_some_and(|rv| rv.idle_for() >= shared.config.rendezvous_idle);
        if idle
            && label.waiting() == 0
            && let Some(rv) = slot.take()
        {
            log::info!("rendezvous {} closed for {}: idle", rv.port, label.name);
            rv.close();
        }
    }
}

/// An open rendezvous port, as its accepting thread holds it.
#[derive(Clone)]
struct Port {
    shared: Arc<Shared>,
    label: Arc<Label>,
    rv: Arc<Rendezvous>,
    listener: Arc<TcpListener>,
}

/// Accepts on the port until it closes. The thread that accepts a connection
/// pairs and relays it itself, and starts the port's next accepting thread
/// once the mobile's first octets have been passed on, or before it first
/// waits on a peer: so those octets wait for no thread start, and the port is
/// without a thread in accept only for that while. A thread that never
/// started its successor (the mobile left or was refused, or no thread could
/// be had: that pair is closed) goes on accepting itself.
fn accept_loop(mut port: Port) {
    loop {
        let accepted = port.listener.accept();
        if port.rv.closed.load(Ordering::SeqCst) || port.shared.stopping() {
            break;
        }
        let (mobile, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                port.shared
                    .refusals
                    .note("accept on rendezvous port", &e.to_string());
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        port.rv.touch();
        let permit = match port.shared.acquire_pair(peer.ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                port.shared
                    .refusals
                    .note(limit, &format!("{} from {peer}", port.label.name));
                port.shared.metrics.refused(limit);
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
        Ok(()) => Ok(()),
        Err(e) => {
            *next = Some(port);
            Err(std::io::Error::other(format!(
                "no thread to accept on: {e}"
            )))
        }
    }
}

/// Pairs one mobile connection once it has something to relay, and relays it
/// to the end: at once with the oldest responder that already spoke (its
/// octets wait at the relay), else with the oldest responder when the mobile's
/// first octet arrives. A connection silent for `first_octet_timeout` is
/// closed without having taken a responder. `go_on` starts the port's next
/// accepting thread: called before anything here waits on a peer, else by the
/// relay once the first octets have been passed on; when it fails, the
/// connection is closed.
fn pair(
    shared: &Shared,
    label: &Label,
    mobile: TcpStream,
    peer: SocketAddr,
    permit: PairPermit,
    go_on: &mut dyn FnMut() -> std::io::Result<()>,
) {
    let no_thread = |e: std::io::Error| log::error!("{}: {peer} closed: {e}", label.name);
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
            let arrived = match pool::peer_state(&mobile) {
                pool::PeerState::Speaking => FirstOctet::Arrived,
                pool::PeerState::Gone => FirstOctet::Gone,
                pool::PeerState::Quiet => match go_on() {
                    Ok(()) => first_octet(&mobile, limit),
                    Err(e) => return no_thread(e),
                },
            };
            match arrived {
                FirstOctet::Arrived => {}
                FirstOctet::Gone => {
                    log::info!("{}: {peer} left without sending anything", label.name);
                    return;
                }
                FirstOctet::TimedOut => {
                    log::info!(
                        "{}: {peer} sent nothing within first_octet_timeout ({} s); closed",
                        label.name,
                        limit.as_secs_f64()
                    );
                    shared.metrics.refused("first_octet_timeout");
                    return;
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
                    "{}: no responder for {peer} within pair_wait ({} s); closed",
                    label.name,
                    shared.config.pair_wait.as_secs_f64()
                );
                shared.metrics.refused("pair_wait");
                return;
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
    if !pool::is_alive(&mobile) {
        // The mobile client left while waiting: the responder is not spent.
        log::info!("{}: {peer} left before pairing; responder kept", label.name);
        label.push(responder);
        return;
    }
    let hidden = responder.stream;
    // The responder has both since its plug accepted it.
    let _ = mobile.set_nodelay(true);
    let _ = pool::set_keepalive(&mobile);
    let (mobile, hidden) = (Arc::new(mobile), Arc::new(hidden));
    permit.attach(&mobile, &hidden);
    let record = Pairing {
        responder: pool::ip_port(responder.peer),
        initiator: pool::ip_port(peer),
        pathname: label.redirect_path(peer.ip()),
        timestamp: pool::now_millis(),
    };
    log::info!(
        "pair {}: mobile {peer} <-> hidden {} path {:?}",
        label.name,
        responder.peer,
        crate::server::loggable_target(&record.pathname)
    );
    label.record(record);
    shared.metrics.pair_opened();
    let started = Instant::now();
    let next_thread = relay::Hook {
        toward: relay::Toward::Hidden,
        by: started,
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
    shared.metrics.pair_closed(moved.up, moved.down);
    if err
        .as_ref()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    {
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

/// How the wait for a mobile's first octet ended.
enum FirstOctet {
    /// An octet is there (not consumed).
    Arrived,
    /// The mobile closed or reset.
    Gone,
    /// Nothing within the limit.
    TimedOut,
}

/// Waits up to `limit` for `mobile`'s first octet, without consuming it.
fn first_octet(mobile: &TcpStream, limit: Duration) -> FirstOctet {
    if mobile.set_read_timeout(Some(limit)).is_err() {
        return FirstOctet::Gone;
    }
    let got = match mobile.peek(&mut [0u8; 1]) {
        Ok(0) => FirstOctet::Gone,
        Ok(_) => FirstOctet::Arrived,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            FirstOctet::TimedOut
        }
        Err(_) => FirstOctet::Gone,
    };
    match mobile.set_read_timeout(None) {
        Ok(()) => got,
        Err(_) => FirstOctet::Gone,
    }
}
