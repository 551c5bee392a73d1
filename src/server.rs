//! The relay process: the well-known listener, one thread per connection (TLS
//! handshake and request head under one deadline, then one answer), the answer
//! (`route` → `registrar` | `rendezvous`), the housekeeper, and a shutdown that
//! provably ends.
//!
//! Invariants:
//! - the accept loop only accepts, counts and spawns: handshakes run in the
//!   connection's thread, so a slow peer never stalls an accept;
//! - a connection holds its place under `max_connections` and
//!   `max_connections_per_ip` as a guard (`limits::Slot`), given back when its
//!   thread ends or fails to start; the last quarter of the places get a short
//!   handshake-and-head deadline, so drips from a few addresses cannot hold the
//!   port;
//! - nothing below this module imports it;
//! - `shutdown` sets a flag, wakes every accept loop by connecting to it, lets
//!   live pairs run for the grace period and then shuts their sockets down.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::config::Config;
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::http::{self, DeadlineStream, Head, Response, Serving, WRITE_TIMEOUT};
use crate::limits::Limit;
use crate::logging::{escape, loggable_target};
use crate::node::Node;
use crate::registrar;
use crate::rendezvous;
use crate::route::{Route, route};
use crate::state::{Shared, Snapshot};
use crate::status;
use crate::store::{Store, StoreSpec};
use crate::sys::{CONN_STACK, SMALL_STACK, lock, spawn, wake};
use crate::tls;

/// Housekeeping period: idle rendezvous ports, dead responders, refusal counts.
pub const TICK: Duration = Duration::from_secs(1);
/// Handshake-and-head deadline of a connection that takes one of the last
/// quarter of `max_connections` (a legitimate client needs milliseconds).
pub const CROWDED_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The certificate of the well-known port, unless `tls = false`. Each
/// connection takes the current configuration at accept; `Server::reload_tls`
/// swaps in a new one, so connections already open keep theirs.
type Tls = Option<Arc<tls::ServerCert>>;

/// A running relay. Dropping it shuts it down without grace.
pub struct Server {
    /// State shared with every thread.
    shared: Arc<Shared>,
    /// TLS for the well-known port.
    tls: Tls,
    /// The well-known listener's address.
    local_addr: SocketAddr,
    /// The accept loop.
    accept: Mutex<Option<JoinHandle<()>>>,
    /// Dropping this stops the housekeeper.
    housekeeper_stop: Mutex<Option<Sender<()>>>,
    /// The housekeeper.
    housekeeper: Mutex<Option<JoinHandle<()>>>,
    /// The status listener, when `status_listen` is set.
    status: Mutex<Option<Serving>>,
    /// Its address.
    status_addr: Option<SocketAddr>,
    /// The node's threads, when `node` is set.
    node: Mutex<Option<Node>>,
}

impl Server {
    /// Opens the store, loads TLS, binds the well-known port and starts serving.
    pub fn bind(config: Config) -> Result<Server> {
        let store = Store::open(&config.store)?;
        let tls: Tls = match config.tls {
            true => Some(Arc::new(tls::ServerCert::load(&config.cert, &config.key)?)),
            false => None,
        };
        let addr = SocketAddr::new(config.bind_host, config.port);
        let (listener, local_addr) = http::bind("the well-known port", addr)?;
        let directory = match (&config.node, &config.store) {
            (Some(node), StoreSpec::Redis(url)) => Some(Arc::new(Directory::join(
                url,
                node,
                &config.public_host,
                local_addr.port(),
            )?)),
            _ => None,
        };
        let shared = Arc::new(Shared::new(config, store, directory));
        let node = Node::start(&shared)?;
        let (s, t) = (shared.clone(), tls.clone());
        let accept = spawn("accept", SMALL_STACK, move || accept_loop(&s, &listener, t))
            .map_err(|e| Error::io("spawn thread", e))?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let s = shared.clone();
        let housekeeper = spawn("housekeeper", SMALL_STACK, move || {
            while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(TICK) {
                rendezvous::close_idle(&s);
                for label in s.labels.all() {
                    label.prune();
                }
                s.flush_refusals();
            }
        })
        .map_err(|e| Error::io("spawn thread", e))?;
        let status = match shared.config.status_listen {
            Some(addr) => Some(status::bind(addr, shared.clone())?),
            None => None,
        };
        Ok(Server {
            node: Mutex::new(node),
            status_addr: status.as_ref().map(Serving::local_addr),
            status: Mutex::new(status),
            shared,
            tls,
            local_addr,
            accept: Mutex::new(Some(accept)),
            housekeeper_stop: Mutex::new(Some(stop_tx)),
            housekeeper: Mutex::new(Some(housekeeper)),
        })
    }

    /// The well-known port's address (tests bind port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The status listener's address, when `status_listen` is set.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// The validated configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The account store it reads.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// What it holds now: labels, pairs, connections.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Its counters, as `GET /metrics` shows them.
    pub fn metrics(&self) -> String {
        self.shared.metrics_text()
    }

    /// Re-reads `cert` and `key` (through symlinks, as certbot's `live/` files
    /// are) for the connections accepted from now on; false with `tls = false`.
    /// On an error the current certificate stays and the error says why.
    /// Waiting responders and live pairs hold no TLS state: they are not touched.
    pub fn reload_tls(&self) -> Result<bool> {
        match &self.tls {
            Some(cert) => cert.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Stops accepting, closes rendezvous ports and waiting responders, lets live
    /// pairs run up to `grace`, then shuts them down. Returns when done.
    pub fn shutdown(&self, grace: Duration) {
        // A node first withdraws its offers, then keeps its ports for
        // `pair_wait` (mobiles sent here just before are still paired).
        let mut node = lock(&self.node).take();
        if let (Some(node), Some(dir)) = (node.as_mut(), &self.shared.directory) {
            self.shared.withdraw();
            node.withdraw(dir);
            if !grace.is_zero() {
                thread::sleep(self.shared.config.pair_wait.min(grace));
            }
        }
        if !self.shared.stop() {
            return;
        }
        drop(lock(&self.status).take());
        wake(self.local_addr);
        if let Some(h) = lock(&self.accept).take() {
            let _ = h.join();
        }
        drop(lock(&self.housekeeper_stop).take());
        if let Some(h) = lock(&self.housekeeper).take() {
            let _ = h.join();
        }
        rendezvous::close_all(&self.shared);
        let pairs = &self.shared.pairs;
        let drained = |within: Duration, poll: Duration| {
            let deadline = Instant::now() + within;
            while pairs.count() > 0 && Instant::now() < deadline {
                thread::sleep(poll);
            }
            pairs.count()
        };
        let left = drained(grace, Duration::from_millis(20));
        if left > 0 {
            log::warn!("shutdown: closing {left} pairs still relaying after the grace period");
            pairs.close_all();
            drained(Duration::from_secs(2), Duration::from_millis(10));
        }
        if let Some(node) = node {
            node.stop();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener, tls: Tls) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                shared.refuse(Limit::Accept, &e.to_string());
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (slot, open) = match shared.conns.acquire(peer.ip()) {
            Ok(taken) => taken,
            Err(limit) => {
                shared.refuse(limit, &peer.to_string());
                continue;
            }
        };
        let config = &shared.config;
        let head_timeout = if open * 4 > config.max_connections * 3 {
            config.head_timeout.min(CROWDED_HEAD_TIMEOUT)
        } else {
            config.head_timeout
        };
        let s = shared.clone();
        let tls = tls.as_ref().map(|t| t.current());
        let spawned = spawn("conn", CONN_STACK, move || {
            let _slot = slot;
            handle_conn(&s, tls, stream, peer, head_timeout);
        });
        if let Err(e) = spawned {
            // The closure, and the slot with it, was dropped.
            shared.refuse(Limit::Threads, &format!("{peer}: {e}"));
        }
    }
}

/// A connection on the well-known port, plain or TLS.
enum Conn {
    /// `tls = false`.
    Plain(DeadlineStream),
    /// After the handshake (boxed: the TLS state is large).
    Tls(Box<tls::ServerStream>),
}

impl Conn {
    /// Gives the connection `WRITE_TIMEOUT` from now to take the answer.
    fn extend_deadline(&mut self) {
        let at = Instant::now() + WRITE_TIMEOUT;
        match self {
            Conn::Plain(s) => s.deadline = at,
            Conn::Tls(s) => s.sock.deadline = at,
        }
    }

    /// Ends the connection cleanly (TLS: `close_notify`).
    fn finish(self) {
        if let Conn::Tls(mut s) = self {
            s.conn.send_close_notify();
            let _ = s.conn.complete_io(&mut s.sock);
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// One connection on the well-known port: handshake, head, answer, close.
fn handle_conn(
    shared: &Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
    tcp: TcpStream,
    peer: SocketAddr,
    head_timeout: Duration,
) {
    // Handshake flights, the answer and close_notify are small writes in a row:
    // without this, Nagle holds each one for the peer's delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let io = DeadlineStream {
        inner: tcp,
        deadline: Instant::now() + head_timeout,
    };
    let conn = match tls {
        Some(config) => tls::accept(&config, io).map(|s| Conn::Tls(Box::new(s))),
        None => Ok(Conn::Plain(io)),
    };
    let done = conn.and_then(|mut conn| {
        serve(shared, &mut conn, peer)?;
        conn.finish();
        Ok(())
    });
    match done {
        Ok(()) => {}
        // A client that gave up, or the accept loop's wake-up.
        Err(e @ Error::ClosedEarly) => log::debug!("{peer}: {e}"),
        Err(e) => log::info!("{peer}: {e}"),
    }
}

/// Reads the head, answers it, logs one line. Errors here are the peer's; they
/// were answered when there was a head to answer.
fn serve(shared: &Arc<Shared>, io: &mut Conn, peer: SocketAddr) -> Result<()> {
    let head = match http::read_head(io, shared.config.max_head) {
        Ok(h) => h,
        Err(e @ (Error::HeadTooLarge(_) | Error::BadRequest(_))) => {
            io.extend_deadline();
            let r = Response::from_error(&e);
            shared.metrics.request(r.status);
            let _ = r.write_to(io);
            log::info!("{peer}: {} {}", r.status, escape(&r.note));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let response = answer(shared, &head, peer).unwrap_or_else(|e| Response::from_error(&e));
    io.extend_deadline();
    shared.metrics.request(response.status);
    let line = format!(
        "{} {}{} from {peer}{}: {} {}",
        escape(&head.method),
        head.host.as_deref().map_or_else(|| "-".to_string(), escape),
        loggable_target(&head.target),
        id_of(&head),
        response.status,
        escape(&response.note)
    );
    if response.status < 400 {
        log::info!("{line}");
    } else {
        log::warn!("{line}");
    }
    response.write_to(io).map_err(|e| Error::io("answer", e))
}

/// The answer to a head: by its `Host`, the registrar's or the rendezvous'. The
/// registrar is handed the rendezvous' port opener for fixed-port labels.
fn answer(shared: &Arc<Shared>, head: &Head, peer: SocketAddr) -> Result<Response> {
    match route(head.host.as_deref(), &shared.config)? {
        Route::Registrar => registrar::handle(shared, head, peer, rendezvous::port_for),
        Route::Label(name) => rendezvous::redirect(shared, name, head, peer),
    }
}

/// " id X" when the head carries TOTP credentials (the ID is not a secret).
fn id_of(head: &Head) -> String {
    head.authorization
        .as_deref()
        .and_then(|v| crate::auth::parse_authorization(v).ok())
        .map_or_else(String::new, |c| {
            format!(" id {}", c.username.escape_debug())
        })
}
