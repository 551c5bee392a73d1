//! The relay process: the well-known listener, one thread per connection (TLS
//! handshake and request head under one deadline, then one answer), routing by
//! `Host` to the registrar or the rendezvous, the limits, the housekeeper, and a
//! shutdown that provably ends.
//!
//! Invariants:
//! - the accept loop only accepts, counts and spawns: handshakes run in the
//!   connection's thread, so a slow peer never stalls an accept;
//! - connections on the well-known port are capped in total and per address,
//!   relayed pairs (and mobile connections waiting for one) in total; at a limit
//!   the newcomer is closed and the log says so once per burst;
//! - every thread has an explicit stack size;
//! - `shutdown` sets a flag, wakes every accept loop by connecting to it, lets
//!   live pairs run for the grace period and then shuts their sockets down.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::auth::Guard;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::{self, DeadlineStream, Head, Response};
use crate::label;
use crate::metrics::Metrics;
use crate::pool::Labels;
use crate::registrar;
use crate::rendezvous;
use crate::store::Store;

/// Stack of a well-known-port connection thread: a TLS handshake (ring) and one
/// request. Measured need is well under this; 256 KiB leaves room.
pub const CONN_STACK: usize = 256 * 1024;
/// Stack of the accept loop and the housekeeper.
pub const SMALL_STACK: usize = 64 * 1024;
/// Listen backlog of the well-known port (std's default is 128).
pub const BACKLOG: i32 = 1024;
/// Time allowed to write an answer after the head was read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Housekeeping period: idle rendezvous ports, dead responders, refusal counts.
pub const TICK: Duration = Duration::from_secs(1);
/// Handshake-and-head deadline of a connection that takes one of the last
/// quarter of `max_connections` (a legitimate client needs milliseconds).
pub const CROWDED_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// A burst of refusals is summed up after this long without one.
pub const REFUSAL_QUIET: Duration = Duration::from_secs(5);

/// State shared by every thread of one relay.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// The accounts.
    pub store: Store,
    /// Throttle and replay rule.
    pub guard: Guard,
    /// TLS for the well-known port, unless `tls = false`. Each connection takes
    /// the current one at accept; SIGHUP swaps in a new one (`reload_tls`), so
    /// connections already open keep theirs.
    tls: Option<RwLock<Arc<rustls::ServerConfig>>>,
    /// Per-label pools, rendezvous ports and records.
    pub labels: Labels,
    /// Relayed pairs, for the limit and for shutdown.
    pub pairs: Pairs,
    /// Connections on the well-known port, for the limits.
    conns: ConnLimit,
    /// Set once shutdown begins.
    stopping: AtomicBool,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Refusals logged once per burst.
    pub refusals: RefusalLog,
    /// When the relay started.
    pub started: Instant,
}

impl Shared {
    /// The TLS configuration new connections get, unless `tls = false`.
    fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls
            .as_ref()
            .map(|t| t.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Re-reads `cert` and `key` (through symlinks, as certbot's `live/` files
    /// are) for the connections accepted from now on. On an error the current
    /// certificate stays and the error says why; with `tls = false` nothing
    /// happens. Waiting responders and live pairs are not touched: they hold no
    /// TLS state of the well-known port.
    pub fn reload_tls(&self) -> Result<bool> {
        let Some(slot) = &self.tls else {
            return Ok(false);
        };
        let fresh = crate::cert::server_config(&self.config.cert, &self.config.key)?;
        *slot.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(true)
    }

    /// Connections open now on the well-known port.
    pub fn conns_open(&self) -> usize {
        lock(&self.conns.open).0
    }

    /// True once shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// A listener on a free port of `port_range`: a random start, then every port
    /// in turn; a busy port is skipped.
    pub fn bind_free_port(&self) -> Result<TcpListener> {
        let (first, last) = self.config.port_range;
        let span = u32::from(last - first) + 1;
        let mut r = [0u8; 4];
        crate::store::random_bytes(&mut r)?;
        let start = u32::from_le_bytes(r) % span;
        for i in 0..span {
            let port = first as u32 + (start + i) % span;
            let port = u16::try_from(port).unwrap_or(last);
            if let Ok(l) = listen(SocketAddr::new(self.config.bind_host, port)) {
                return Ok(l);
            }
        }
        Err(Error::NoFreePort)
    }
}

/// Locks `m`; a lock poisoned by a panicking thread is taken as it is (every
/// table here stays consistent between statements).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns a named thread with an explicit stack.
pub fn spawn(name: &str, stack: usize, f: impl FnOnce() + Send + 'static) -> Result<()> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(f)
        .map(|_| ())
        .map_err(|e| Error::io("spawn thread", e))
}

/// Wakes a blocking `accept` on `addr` by connecting to it once.
pub fn wake(addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, addr.port()), Duration::from_secs(1));
}

/// A pair's two sockets, shared with its relay threads.
type PairSockets = (Arc<TcpStream>, Arc<TcpStream>);
/// Live pairs by id; `None` until the pair's sockets are attached.
type LivePairs = HashMap<u64, Option<PairSockets>>;

/// Live pairs (and mobile connections waiting to be paired), capped at `max`.
pub struct Pairs {
    /// Cap (`max_pairs`).
    max: usize,
    /// Next permit number.
    next: AtomicU64,
    /// Permit number to the pair's sockets (once paired).
    live: Mutex<LivePairs>,
    /// Pairs per mobile address (`source`), capped at `max_pairs_per_ip`.
    per_ip: ConnLimit,
}

impl Pairs {
    fn new(max: usize, max_per_ip: usize) -> Pairs {
        Pairs {
            max,
            next: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            per_ip: ConnLimit {
                // The total is `live`'s to count.
                max: usize::MAX,
                max_per_ip,
                open: Mutex::new((0, HashMap::new())),
            },
        }
    }

    /// Pairs now.
    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn close_all(&self) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for (a, b) in live.values().flatten() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Shared {
    /// A pair slot for a mobile from `ip`, or the limit that refused it
    /// (`max_pairs`, `max_pairs_per_ip`).
    pub fn acquire_pair(
        self: &Arc<Shared>,
        ip: IpAddr,
    ) -> std::result::Result<PairPermit, &'static str> {
        let mut live = self.pairs.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= self.pairs.max {
            return Err("max_pairs");
        }
        self.pairs
            .per_ip
            .acquire(ip)
            .map_err(|_| "max_pairs_per_ip")?;
        let id = self.pairs.next.fetch_add(1, Ordering::Relaxed);
        live.insert(id, None);
        Ok(PairPermit {
            shared: self.clone(),
            id,
            ip,
        })
    }
}

/// The address a per-address limit counts: an IPv6 address by its /64 (one
/// host commonly has a whole /64), an IPv4-mapped one as IPv4.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !0u128 << 64).into()),
        },
        v4 => v4,
    }
}

/// A pair slot held by a pairing thread; freed on drop.
pub struct PairPermit {
    /// The relay it belongs to.
    shared: Arc<Shared>,
    /// Its number.
    id: u64,
    /// The mobile's address.
    ip: IpAddr,
}

impl PairPermit {
    /// Records the pair's sockets so shutdown can close them.
    pub fn attach(&self, a: &Arc<TcpStream>, b: &Arc<TcpStream>) {
        self.live().insert(self.id, Some((a.clone(), b.clone())));
    }

    fn live(&self) -> std::sync::MutexGuard<'_, LivePairs> {
        self.shared
            .pairs
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for PairPermit {
    fn drop(&mut self) {
        self.live().remove(&self.id);
        self.shared.pairs.per_ip.release(self.ip);
    }
}

/// Connections open on the well-known port, in total and per address.
struct ConnLimit {
    /// Cap in total.
    max: usize,
    /// Cap per address.
    max_per_ip: usize,
    /// Total and per-address counts.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection slot of the well-known port, given back on drop.
struct ConnSlot {
    /// The relay whose count holds it.
    shared: Arc<Shared>,
    /// The peer's address.
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.shared.conns.release(self.ip);
    }
}

impl ConnLimit {
    /// Takes a slot for `ip` and returns how many are open now, or says which
    /// limit refused it.
    fn acquire(&self, ip: IpAddr) -> std::result::Result<usize, &'static str> {
        let ip = source(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.max {
            return Err("max_connections");
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        open.0 += 1;
        Ok(open.0)
    }

    fn release(&self, ip: IpAddr) {
        let ip = source(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&ip);
            }
        }
    }
}

/// Logs the first refusal of a burst per limit, and the count when it ends.
#[derive(Default)]
pub struct RefusalLog {
    /// Limit name to refusals since the first was logged, and the last one's time.
    bursts: Mutex<HashMap<&'static str, (u64, Instant)>>,
}

impl RefusalLog {
    /// Notes a refusal by `limit`; only the first of a burst is logged.
    pub fn note(&self, limit: &'static str, detail: &str) {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        match bursts.get_mut(limit) {
            Some((n, at)) => {
                *n += 1;
                *at = Instant::now();
            }
            None => {
                log::warn!("{limit} reached: refused {detail}; further refusals are counted");
                bursts.insert(limit, (0, Instant::now()));
            }
        }
    }

    /// Ends bursts quiet for `REFUSAL_QUIET`, logging their counts.
    fn flush(&self) {
        let mut bursts = self.bursts.lock().unwrap_or_else(|p| p.into_inner());
        bursts.retain(|limit, (n, at)| {
            if at.elapsed() < REFUSAL_QUIET {
                return true;
            }
            if *n > 0 {
                log::warn!("{limit}: {n} more refusals in that burst");
            }
            false
        });
    }
}

/// Where a request goes, by its `Host`.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The registrar host.
    Registrar,
    /// `LABEL.servers_domain`, with the label validated and lower case.
    Label(String),
}

/// Routes a `Host` value: case-insensitive, any `:port` ignored.
pub fn route(host: Option<&str>, config: &Config) -> Result<Route> {
    let host = host
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::BadRequest("no Host header".into()))?;
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == config.registrar_name {
        return Ok(Route::Registrar);
    }
    if let Some(label) = name.strip_suffix(&format!(".{}", config.servers_domain))
        && let Ok(label) = label::validate(label)
    {
        return Ok(Route::Label(label));
    }
    Err(Error::MisdirectedHost(host.chars().take(100).collect()))
}

/// A running relay. Dropping it shuts it down without grace.
pub struct Server {
    /// State shared with every thread.
    shared: Arc<Shared>,
    /// The well-known listener's address.
    local_addr: SocketAddr,
    /// The accept loop.
    accept: Mutex<Option<JoinHandle<()>>>,
    /// Dropping this stops the housekeeper.
    housekeeper_stop: Mutex<Option<Sender<()>>>,
    /// The housekeeper.
    housekeeper: Mutex<Option<JoinHandle<()>>>,
    /// The status listener, when `status_listen` is set.
    status: Mutex<Option<crate::status::StatusServer>>,
    /// Its address.
    status_addr: Option<SocketAddr>,
}

impl Server {
    /// Opens the store, loads TLS, binds the well-known port and starts serving.
    pub fn bind(config: Config) -> Result<Server> {
        let store = Store::open(&config.store)?;
        let tls = if config.tls {
            Some(RwLock::new(crate::cert::server_config(
                &config.cert,
                &config.key,
            )?))
        } else {
            None
        };
        let addr = SocketAddr::new(config.bind_host, config.port);
        let listener =
            listen(addr).map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let shared = Arc::new(Shared {
            guard: Guard::new(config.auth_fail_budget, config.auth_fail_refill),
            labels: Labels::new(config.max_waiting),
            pairs: Pairs::new(config.max_pairs, config.max_pairs_per_ip),
            conns: ConnLimit {
                max: config.max_connections,
                max_per_ip: config.max_connections_per_ip,
                open: Mutex::new((0, HashMap::new())),
            },
            stopping: AtomicBool::new(false),
            metrics: Metrics::default(),
            refusals: RefusalLog::default(),
            started: Instant::now(),
            store,
            tls,
            config,
        });
        let s = shared.clone();
        let accept = thread::Builder::new()
            .name("accept".into())
            .stack_size(SMALL_STACK)
            .spawn(move || accept_loop(&s, &listener))
            .map_err(|e| Error::io("spawn thread", e))?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let s = shared.clone();
        let housekeeper = thread::Builder::new()
            .name("housekeeper".into())
            .stack_size(SMALL_STACK)
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(TICK) {
                    rendezvous::close_idle(&s);
                    for label in s.labels.all() {
                        label.prune();
                    }
                    s.refusals.flush();
                }
            })
            .map_err(|e| Error::io("spawn thread", e))?;
        let status = match shared.config.status_listen {
            Some(addr) => Some(crate::status::StatusServer::bind(addr, shared.clone())?),
            None => None,
        };
        Ok(Server {
            status_addr: status.as_ref().map(|s| s.local_addr()),
            status: Mutex::new(status),
            shared,
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

    /// The state shared by the relay's threads (status pages, tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, closes rendezvous ports and waiting responders, lets live
    /// pairs run up to `grace`, then shuts them down. Returns when done.
    pub fn shutdown(&self, grace: Duration) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        drop(self.status.lock().unwrap_or_else(|p| p.into_inner()).take());
        wake(self.local_addr);
        if let Some(h) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
        drop(
            self.housekeeper_stop
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(h) = self
            .housekeeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        for label in self.shared.labels.all() {
            if let Some(rv) = label
                .rendezvous
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                rv.close();
            }
            label.clear();
        }
        let deadline = Instant::now() + grace;
        while self.shared.pairs.count() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let left = self.shared.pairs.count();
        if left > 0 {
            log::warn!("shutdown: closing {left} pairs still relaying after the grace period");
            self.shared.pairs.close_all();
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.shared.pairs.count() > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// Binds `addr` with a larger backlog than std's (the well-known port, fixed
/// rendezvous ports).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping() {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                shared.refusals.note("accept", &e.to_string());
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let open = match shared.conns.acquire(peer.ip()) {
            Ok(open) => open,
            Err(limit) => {
                shared.refusals.note(limit, &peer.to_string());
                shared.metrics.refused(limit);
                continue;
            }
        };
        let slot = ConnSlot {
            shared: shared.clone(),
            ip: peer.ip(),
        };
        // The last quarter of the slots get a short deadline, so handshake and
        // head drips from a few addresses cannot hold the port.
        let config = &shared.config;
        let deadline = if open * 4 > config.max_connections * 3 {
            config.head_timeout.min(CROWDED_HEAD_TIMEOUT)
        } else {
            config.head_timeout
        };
        let s = shared.clone();
        let spawned = spawn("conn", CONN_STACK, move || {
            let _slot = slot;
            handle_conn(&s, stream, peer, deadline);
        });
        if let Err(e) = spawned {
            // The closure, and the slot with it, was dropped.
            shared.refusals.note("threads", &format!("{peer}: {e}"));
        }
    }
}

/// One connection on the well-known port: handshake, head, answer, close.
fn handle_conn(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr, head_timeout: Duration) {
    // Handshake flights, the answer and close_notify are small writes in a row:
    // without this, Nagle holds each one for the peer's delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let io = DeadlineStream {
        inner: tcp,
        deadline: Instant::now() + head_timeout,
    };
    let done = match shared.tls_config() {
        Some(tls) => serve_tls(shared, tls, io, peer),
        None => serve(shared, io, peer),
    };
    if let Err(e) = done {
        match e {
            Error::BadRequest(ref why) if why.starts_with("connection closed") => {
                log::debug!("{peer}: {e}")
            }
            _ => log::info!("{peer}: {e}"),
        }
    }
}

fn serve_tls(
    shared: &Arc<Shared>,
    config: Arc<rustls::ServerConfig>,
    io: DeadlineStream,
    peer: SocketAddr,
) -> Result<()> {
    let conn = rustls::ServerConnection::new(config).map_err(|e| Error::Tls(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, io);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| Error::io("handshake", e))?;
    }
    serve(shared, &mut tls, peer)?;
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    Ok(())
}

/// Reads the head, answers it, logs one line. Errors here are the peer's; they
/// were answered when there was a head to answer.
fn serve<S: std::io::Read + std::io::Write + HasDeadline>(
    shared: &Arc<Shared>,
    mut io: S,
    peer: SocketAddr,
) -> Result<()> {
    let head = match http::read_head(&mut io, shared.config.max_head) {
        Ok(h) => h,
        Err(e @ (Error::HeadTooLarge(_) | Error::BadRequest(_))) if !matches!(&e, Error::BadRequest(w) if w.starts_with("connection closed")) =>
        {
            io.extend_deadline();
            let r = Response::from_error(&e);
            shared.metrics.request(r.status);
            let _ = r.write_to(&mut io);
            log::info!("{peer}: {} {}", r.status, r.note);
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
        response.note
    );
    if response.status < 400 {
        log::info!("{line}");
    } else {
        log::warn!("{line}");
    }
    response
        .write_to(&mut io)
        .map_err(|e| Error::io("answer", e))
}

/// A request target as logged: the path, and "?…" in place of a query, which
/// may carry the hidden service's users' secrets (`?code=`, `?token=`); control
/// characters and non-ASCII escaped, so a peer cannot forge log lines.
pub fn loggable_target(target: &str) -> String {
    let path = match target.split_once('?') {
        Some((path, _)) => return format!("{}?…", escape(path)),
        None => target,
    };
    escape(path)
}

/// A peer's text as a log field: printable ASCII as it is, the rest escaped
/// (`\n`, `\u{1b}`), at most 200 characters.
pub fn escape(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().nth(200).is_some() {
        out.push('…');
    }
    out
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

/// Routes a request head to its answer.
fn answer(shared: &Arc<Shared>, head: &Head, peer: SocketAddr) -> Result<Response> {
    match route(head.host.as_deref(), &shared.config)? {
        Route::Registrar => registrar::handle(shared, head, peer),
        Route::Label(name) => {
            let label = shared
                .labels
                .get(&name)
                .ok_or_else(|| Error::NoResponder(name.clone()))?;
            // None waiting, and none arrived or paired within pair_wait: 503.
            // (A label whose hidden server is refilling its pool after a pairing
            // gets the 307; the connection then waits up to pair_wait.)
            if label.prune() == 0 && !label.active_within(shared.config.pair_wait) {
                return Err(Error::NoResponder(name));
            }
            let port = rendezvous::port_for(shared, &label)?;
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
    }
}

/// A stream whose deadline can be pushed out for writing the answer.
trait HasDeadline {
    fn extend_deadline(&mut self);
}

impl HasDeadline for DeadlineStream {
    fn extend_deadline(&mut self) {
        self.deadline = Instant::now() + WRITE_TIMEOUT;
    }
}

impl HasDeadline for &mut rustls::StreamOwned<rustls::ServerConnection, DeadlineStream> {
    fn extend_deadline(&mut self) {
        self.sock.deadline = Instant::now() + WRITE_TIMEOUT;
    }
}

/// `taas serve`: first-start set-up, the relay, signals, a graceful stop.
pub fn run(config: Config) -> Result<()> {
    // The CA key is read here at most once, to sign the registrar's
    // certificate at a first start, and dropped before the relay binds.
    let made = crate::cert::ensure_default(&config)?;
    if made.any() {
        log::info!("first start: made {}", made.describe(&config));
    }
    if !config.tls {
        log::warn!("tls = false: serving plain HTTP; TOTP tokens cross the network in clear");
    }
    raise_fd_limit();
    let grace = config.shutdown_grace;
    let server = Server::bind(config)?;
    let c = &server.shared.config;
    log::info!(
        "taas {} listening on {} (public {}), registrar {}, labels under {}, store {}, config {}",
        crate::version(),
        server.local_addr(),
        c.public_addr(server.local_addr().port()),
        c.registrar_name,
        c.servers_domain,
        c.store.describe(),
        c.source
    );
    log_accounts(&server.shared.store);
    // Accounts are read from the store at each registration; SIGHUP re-reads
    // it now, so the operator sees at once whether an edit took, and re-reads
    // the certificate (a certbot deploy hook runs `systemctl reload taas`).
    wait_for_signal(|| {
        log_accounts(&server.shared.store);
        reload_certificate(&server.shared);
    })?;
    log::info!(
        "stopping: live pairs have {} s to finish",
        grace.as_secs_f64()
    );
    server.shutdown(grace);
    log::info!("stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard one: every relayed pair holds
/// two sockets and two pipes (six descriptors).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::info!("open files limit raised from {soft} to {hard}"),
            Err(e) => log::warn!("open files limit stays {soft}: {e}"),
        },
        Ok((soft, _)) => log::info!("open files limit {soft}"),
        Err(e) => log::warn!("open files limit unknown: {e}"),
    }
}

/// SIGHUP: the certificate for new connections, or why the old one stays.
fn reload_certificate(shared: &Shared) {
    let c = &shared.config;
    match shared.reload_tls() {
        Ok(true) => log::info!(
            "SIGHUP: certificate {} and key {} re-read; new connections get them",
            c.cert.display(),
            c.key.display()
        ),
        Ok(false) => {}
        Err(e) => log::warn!("SIGHUP: keeping the certificate loaded before: {e}"),
    }
}

/// Logs how many accounts the store holds (or why it cannot say).
fn log_accounts(store: &Store) {
    match store.list() {
        Ok(list) if list.is_empty() => {
            log::info!("no accounts yet: add one with `taas users add LABEL`")
        }
        Ok(list) => log::info!("accounts in the store: {}", list.len()),
        Err(e) => log::warn!("{e}"),
    }
}

/// Blocks until SIGTERM or SIGINT. SIGHUP reopens the log file (logrotate)
/// and then calls `on_hup`.
pub fn wait_for_signal(on_hup: impl Fn()) -> Result<()> {
    wait_on(signals()?, on_hup)
}

/// Takes SIGTERM, SIGINT and SIGHUP from their default actions (from now on a
/// SIGHUP no longer ends the process), for `wait_on`.
pub fn signals() -> Result<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Error::io("signal set-up", e))
}

/// `wait_for_signal` with signals taken earlier by `signals`.
pub fn wait_on(mut signals: signal_hook::iterator::Signals, on_hup: impl Fn()) -> Result<()> {
    use signal_hook::consts::SIGHUP;
    for sig in signals.forever() {
        if sig == SIGHUP {
            crate::logging::reopen();
            log::info!("SIGHUP: log file reopened");
            on_hup();
        } else {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_limits_count_ipv6_by_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source(ip("2001:db8:1:2::9"))
        );
        assert_ne!(source(ip("2001:db8:1:3::1")), source(ip("2001:db8:1:2::1")));
        let limit = ConnLimit {
            max: 10,
            max_per_ip: 1,
            open: Mutex::new((0, HashMap::new())),
        };
        assert_eq!(limit.acquire(ip("2001:db8::1")), Ok(1));
        assert_eq!(
            limit.acquire(ip("2001:db8::2")),
            Err("max_connections_per_ip")
        );
        limit.release(ip("2001:db8::1"));
        assert!(limit.acquire(ip("2001:db8::2")).is_ok());
    }

    #[test]
    fn peer_text_is_escaped_in_log_fields() {
        assert_eq!(escape("demo.taas.localhost"), "demo.taas.localhost");
        assert_eq!(escape("a\r\nINFO forged"), "a\\r\\nINFO forged");
        assert_eq!(escape("\u{1b}[31m"), "\\u{1b}[31m");
        assert_eq!(loggable_target("/x\n?secret=1"), "/x\\n?…");
        assert!(escape(&"x".repeat(500)).len() <= 204);
    }

    #[test]
    fn host_routing() {
        let c = Config::default();
        assert_eq!(
            route(Some("registrar.localhost"), &c).unwrap(),
            Route::Registrar
        );
        assert_eq!(
            route(Some("REGISTRAR.localhost:8443"), &c).unwrap(),
            Route::Registrar
        );
        assert_eq!(
            route(Some("Demo.taas.localhost:1"), &c).unwrap(),
            Route::Label("demo".into())
        );
        assert_eq!(
            route(Some("demo.taas.localhost."), &c).unwrap(),
            Route::Label("demo".into())
        );
        for bad in [
            "example.com",
            "a.b.taas.localhost",
            "taas.localhost",
            "-x.taas.localhost",
            "[::1]:80",
        ] {
            assert!(
                matches!(route(Some(bad), &c), Err(Error::MisdirectedHost(_))),
                "{bad}"
            );
        }
        assert!(matches!(route(None, &c), Err(Error::BadRequest(_))));
    }
}
