//! The hidden side (`taas expose`): keeps `pool` registrations waiting at each
//! relay node it knows, for one label, and pipes each relayed connection to a
//! local TCP service.
//!
//! The relays are the `--relay` addresses given, or else every address the
//! provisioning file's `server.hostname` resolves to (`Registrar::relays`); only
//! the TCP connect target differs between them: `Host`, TLS SNI and the
//! certificate check are the registrar's name wherever the agent connects.
//! Each relay has its own `pool` slots, independent of the others': a relay
//! that is down backs its own slots off and slows no other.
//!
//! Each slot is one thread that loops: register (docs/PROTOCOL.md
//! section 1), connect to the plug, wait for the mobile client's first octet.
//! Then that thread connects to the local service and pipes the connection
//! itself, and a new thread takes the slot over and registers again
//! `REFILL_PAUSE` after the service's first answer is on its way back (at most
//! `REFILL_DELAY` on): the mobile's first octets, and that answer on its way
//! through the relay, wait for no thread start and share the CPU with no TLS
//! handshake (with `--eager` or `--tls`, a pipe thread takes the
//! connection and the slot registers again at once). So a burst of mobile
//! connections is met by all slots re-registering at once, not one after another.
//!
//! Invariants:
//! - failures back off exponentially with jitter, capped at `MAX_BACKOFF`; 401 and
//!   403 retry slowly (`AUTH_RETRY`) and say the clock is the usual cause; 429
//!   waits its `Retry-After`; a 3xx is followed (at most `MAX_REDIRECTS` hops);
//! - the registrar's answer is read as its framing says (`Content-Length`,
//!   `chunked`, or to the close), at most `MAX_ANSWER` octets, and no further:
//!   a malformed one is an error like a network failure (logged, backed off);
//! - a failing run is logged at its first failure and then as a count, once per
//!   `REPORT_EVERY`, not once per retry; every line about a slot names its relay
//!   (`relay 127.0.0.2:8443: slot 0: …`);
//! - the local service being down closes that one mobile connection only;
//! - with `eager`, the local service is connected as soon as the responder is in
//!   place, so a server that speaks first (SMTP, FTP) is heard: its octets wait
//!   in the relay until a mobile client is paired. The slot registers again when
//!   the mobile side first sends, or when the connection ends.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::http::{Answer, DeadlineStream, read_answer};
use crate::provision::Provision;
use crate::relay;
use crate::sys::{AGENT_STACK, PeerState, peer_state, random_bytes, set_keepalive, spawn};
use crate::tls;
use crate::totp::Totp;

pub mod terminate;

pub use terminate::LabelCert;

/// Longest wait between two failed registrations.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Wait after a 401 or 403 (retrying fast cannot help and burns the throttle).
pub const AUTH_RETRY: Duration = Duration::from_secs(30);
/// Redirects followed for one registration.
pub const MAX_REDIRECTS: usize = 3;
/// Deadline of one registration exchange (connect, TLS, request, answer).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for connecting to the plug or the local service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting slot looks at the stop flag.
pub const WAIT_TICK: Duration = Duration::from_secs(1);
/// A failing run is summed up this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Longest wait (then `REFILL_PAUSE`), once a mobile client's first octets have
/// arrived, before the slot registers again: until the local service's first answer is on its way
/// back, so that the registration's TLS handshake (CPU on both sides) does not
/// compete with it (`make bench`: connect → first byte, via taas expose).
pub const REFILL_DELAY: Duration = Duration::from_millis(20);
/// And then this long, so that the answer's way on through the relay (and the
/// mobile's next octets) meet no thread start or handshake either.
pub const REFILL_PAUSE: Duration = Duration::from_millis(2);
/// A waiting connection the relay closes sooner than this counts as a failure
/// (backed off), so an agent whose pool exceeds the relay's `max_waiting` does
/// not re-register in a loop.
pub const SHORT_WAIT: Duration = Duration::from_secs(2);

/// Where and how to register: read from a provisioning file.
#[derive(Clone)]
pub struct Registrar {
    /// Address to connect to (`server.hostname`, `server.port`).
    pub connect: String,
    /// `server.hostname`, as the file has it.
    hostname: String,
    /// `server.port`.
    port: u16,
    /// Host name for `Host` and TLS SNI (`issuer`'s host).
    pub name: String,
    /// TLS client configuration; `None` for a relay without TLS.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The account ID.
    id: String,
    /// The account's TOTP.
    totp: Totp,
}

/// Why a registration did not give a plug.
#[derive(Debug)]
pub enum RegisterError {
    /// The relay answered something else than 200.
    Refused {
        /// Its status.
        status: u16,
        /// `Retry-After`, seconds.
        retry_after: Option<u64>,
        /// `Location` of a 3xx.
        location: Option<String>,
        /// First line of its body.
        body: String,
    },
    /// Network or TLS failure.
    Net(Error),
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterError::Refused { status, body, .. } => {
                write!(f, "relay answered {status}: {body}")
            }
            RegisterError::Net(e) => write!(f, "{e}"),
        }
    }
}

impl Registrar {
    /// From a provisioning file: trusts exactly its `ca` when it has one, else the
    /// system roots; plain HTTP when its `issuer` is `http://`.
    pub fn from_provision(p: &Provision) -> Result<Registrar> {
        let tls = if p.issuer.starts_with("http://") {
            None
        } else {
            Some(tls::client_config(p.server.ca.as_deref())?)
        };
        let host = &p.server.hostname;
        let connect = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", p.server.port)
        } else {
            format!("{host}:{}", p.server.port)
        };
        Ok(Registrar {
            connect,
            hostname: host.clone(),
            port: p.server.port,
            name: p.registrar_name().to_string(),
            tls,
            id: p.id().to_string(),
            totp: p.totp()?,
        })
    }

    /// Every relay node of the provisioning file: each address its
    /// `server.hostname` resolves to (A and AAAA), once, with `server.port`, as
    /// `HOST:PORT`. Failing to resolve is an error naming the host.
    pub fn relays(&self) -> Result<Vec<String>> {
        let all = resolve_all(&self.hostname, self.port)?;
        Ok(all.iter().map(SocketAddr::to_string).collect())
    }

    /// The same registrar with a TLS session cache of its own. Relay nodes
    /// share the registrar's name but not their sessions: with one cache the
    /// slots of one node would offer the other node's tickets, and fall back to
    /// a full handshake each time.
    fn with_own_sessions(&self) -> Registrar {
        let mut own = self.clone();
        if let Some(cfg) = &self.tls {
            let mut cfg = (**cfg).clone();
            cfg.resumption = rustls::client::Resumption::default();
            own.tls = Some(Arc::new(cfg));
        }
        own
    }

    /// Registers `label` at `server.hostname:server.port` and returns the
    /// plug's address, following redirects.
    pub fn register(&self, label: &str) -> std::result::Result<SocketAddr, RegisterError> {
        self.register_via(&self.connect, label)
    }

    /// Registers `label` by connecting to `relay` (HOST:PORT), with `Host`, SNI
    /// and certificate check for the registrar's name all the same, and returns
    /// the plug's address, following redirects.
    pub fn register_via(
        &self,
        relay: &str,
        label: &str,
    ) -> std::result::Result<SocketAddr, RegisterError> {
        let mut target = (relay.to_string(), self.name.clone());
        for _ in 0..=MAX_REDIRECTS {
            match self.register_at(&target.0, &target.1, label) {
                Err(RegisterError::Refused {
                    status: 301 | 302 | 303 | 307 | 308,
                    location: Some(loc),
                    ..
                }) => {
                    target = parse_location(&loc).ok_or_else(|| {
                        RegisterError::Net(Error::BadRequest(format!("bad Location {loc:?}")))
                    })?;
                    log::info!("relay {relay}: registration redirected to {}", target.0);
                }
                other => return other,
            }
        }
        Err(RegisterError::Net(Error::BadRequest(
            "too many redirects".into(),
        )))
    }

    fn register_at(
        &self,
        connect: &str,
        name: &str,
        label: &str,
    ) -> std::result::Result<SocketAddr, RegisterError> {
        let net = RegisterError::Net;
        let token = self.totp.generate(crate::sys::unix_time());
        let request = format!(
            "PUT /register/{label} HTTP/1.1\r\nHost: {name}\r\nAuthorization: TOTP username=\"{}\", response=\"{token}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.id
        );
        let Answer {
            status,
            headers,
            body,
        } = exchange(connect, name, self.tls.as_ref(), request.as_bytes()).map_err(net)?;
        if status == 200 {
            // Exactly `HOST:PORT`; a trailing newline (older relays) is fine too.
            let addr = body.trim();
            return addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| net(Error::BadAnswer(format!("bad plug address {addr:?}"))));
        }
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        Err(RegisterError::Refused {
            status,
            retry_after: header("retry-after").and_then(|v| v.parse().ok()),
            location: header("location"),
            // The relay's text, for the log: escaped.
            body: crate::logging::escape(body.lines().next().unwrap_or("")),
        })
    }
}

/// A `--relay` value, checked (`parse_host_port`).
pub fn parse_relay(value: &str) -> Result<String> {
    parse_host_port("--relay", value)
}

/// A `flag` value (`--relay`, `--to`), checked: `HOST:PORT` with HOST an IPv4
/// address, an IPv6 address in brackets or a DNS name (resolved at each
/// connection), and PORT 1 to 65535. Anything else is a usage error naming
/// the flag and the value.
pub fn parse_host_port(flag: &str, value: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::Usage(format!(
            "bad {flag} {value:?}: {why} (expected HOST:PORT, e.g. 192.0.2.7:443 or [2001:db8::7]:443)"
        ))
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .and_then(|h| h.parse::<Ipv6Addr>().ok())
            .ok_or_else(|| bad("not an IPv6 address in brackets"))?;
        return Ok(SocketAddr::from((ip, port)).to_string());
    }
    if host.contains(':') {
        return Err(bad("an IPv6 address goes in brackets"));
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ip = host
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("not an IPv4 address"))?;
        return Ok(SocketAddr::from((ip, port)).to_string());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(bad("the host is neither an IP address nor a DNS name"));
    }
    Ok(format!("{host}:{port}"))
}

/// Every address `host` (a name, or an IP address, IPv6 with or without
/// brackets) resolves to, with `port`, each once, in the resolver's order.
fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let resolve = |err| Error::Resolve {
        host: host.to_string(),
        err,
    };
    let found = (bare, port).to_socket_addrs().map_err(resolve)?;
    let all = each_once(found);
    if all.is_empty() {
        return Err(resolve(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        )));
    }
    Ok(all)
}

/// `items` without repeats, in their first order.
fn each_once<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// `https://host[:port]/…` to (connect address, host name).
fn parse_location(loc: &str) -> Option<(String, String)> {
    let (scheme, rest) = loc.split_once("://")?;
    let authority = rest.split('/').next()?;
    let default = if scheme == "http" { 80 } else { 443 };
    let name = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && !h.ends_with(':') => h,
        _ => authority,
    };
    let connect = if name.len() == authority.len() {
        format!("{authority}:{default}")
    } else {
        authority.to_string()
    };
    Some((connect, name.trim_matches(['[', ']']).to_string()))
}

/// One request, one answer (read as far as its framing says, at most
/// `MAX_ANSWER`), under one deadline.
fn exchange(
    connect: &str,
    name: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    request: &[u8],
) -> Result<Answer> {
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    let tcp = connect_to(connect, "connect to registrar")?;
    let io = DeadlineStream {
        inner: tcp,
        deadline,
    };
    let send = |s: &mut dyn Write| {
        s.write_all(request)
            .map_err(|e| Error::io("registration", e))
    };
    match tls {
        Some(cfg) => {
            let mut s = tls::connect(cfg, name, io)?;
            send(&mut s)?;
            read_answer(&mut s)
        }
        None => {
            let mut s = io;
            send(&mut s)?;
            read_answer(&mut s)
        }
    }
}

/// What `taas expose` was asked to do.
#[derive(Clone)]
pub struct ExposeConfig {
    /// The label served.
    pub label: String,
    /// The relays to keep `pool` registrations waiting at, each `HOST:PORT`
    /// (`parse_relay`); empty: every address of the provisioning file's
    /// `server.hostname` (`Registrar::relays`).
    pub relays: Vec<String>,
    /// The local service, HOST:PORT.
    pub to: String,
    /// Registrations kept waiting at each relay.
    pub pool: usize,
    /// Connect to the local service before the mobile client speaks.
    pub eager: bool,
    /// End TLS here with this certificate (`--tls`); `None`: a raw TCP pipe.
    /// Never with `eager` (a TLS server does not speak first).
    pub tls: Option<Arc<LabelCert>>,
}

/// Why `--eager` and `--tls` do not go together.
pub const EAGER_TLS: &str = "--eager cannot be used with --tls: a TLS server never speaks first (the mobile's ClientHello comes first)";

/// A running agent; `stop` ends its slots within `WAIT_TICK` (pipes run on).
pub struct Agent {
    /// Set to stop.
    stop: Arc<AtomicBool>,
}

impl Agent {
    /// Starts `cfg.pool` slots for each relay (resolving `server.hostname`
    /// when `cfg.relays` is empty).
    pub fn start(registrar: Registrar, cfg: ExposeConfig) -> Result<Agent> {
        if cfg.eager && cfg.tls.is_some() {
            return Err(Error::Usage(EAGER_TLS.into()));
        }
        let (relays, whence) = if cfg.relays.is_empty() {
            let all = registrar.relays()?;
            let whence = format!(" (every address of {})", registrar.hostname);
            (all, whence)
        } else {
            (each_once(cfg.relays.iter().cloned()), String::new())
        };
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = Arc::new(cfg);
        let tls = cfg.tls.as_ref().map_or_else(String::new, |t| {
            format!(
                ", TLS ended here with {} and {}",
                t.cert_path().display(),
                t.key_path().display()
            )
        });
        log::info!(
            "exposing {} as {} via {}{whence} with {} waiting at each{tls}",
            cfg.to,
            cfg.label,
            relays.join(", "),
            cfg.pool
        );
        let agent = Agent { stop };
        for relay in relays {
            // One session cache per node, shared by its slots.
            let registrar = Arc::new(registrar.with_own_sessions());
            for n in 0..cfg.pool {
                let s = Slot {
                    tag: format!("relay {relay}: slot {n}").into(),
                    relay: relay.as_str().into(),
                    registrar: registrar.clone(),
                    cfg: cfg.clone(),
                    stop: agent.stop.clone(),
                };
                // On an error the slots already started stop with `agent`.
                spawn("slot", AGENT_STACK, move || slot(&s))
                    .map_err(|e| Error::io("spawn thread", e))?;
            }
        }
        Ok(agent)
    }

    /// Asks the slots to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A run of failures, logged at its start and then as a count.
struct Failures {
    /// Failures in a row.
    count: u32,
    /// When the run was last reported.
    reported: Instant,
}

impl Failures {
    fn note(&mut self, slot: &str, what: &str) {
        self.count += 1;
        if self.count == 1 {
            log::warn!("{slot}: {what}; retrying");
            self.reported = Instant::now();
        } else if self.reported.elapsed() >= REPORT_EVERY {
            log::warn!(
                "{slot}: still failing after {} attempts: {what}",
                self.count
            );
            self.reported = Instant::now();
        }
    }

    fn success(&mut self, slot: &str) {
        if self.count > 0 {
            log::info!("{slot}: registered again after {} failures", self.count);
        }
        self.count = 0;
    }

    /// Exponential backoff with jitter: half to all of min(cap, first * 2^n).
    fn backoff(&self) -> Duration {
        let exp = FIRST_BACKOFF.saturating_mul(1 << self.count.min(10));
        let full = exp.min(MAX_BACKOFF);
        let mut r = [0u8; 1];
        let _ = random_bytes(&mut r);
        full.mul_f64(0.5 + f64::from(r[0]) / 510.0)
    }
}

/// Sleeps `d` in `WAIT_TICK` steps; false when asked to stop.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(WAIT_TICK));
    }
    false
}

/// One of the `pool` slots of one relay: what its thread needs, and hands to
/// the thread that takes the slot over.
#[derive(Clone)]
struct Slot {
    /// `relay HOST:PORT: slot N`, what its log lines start with.
    tag: Arc<str>,
    /// The relay it registers at (HOST:PORT).
    relay: Arc<str>,
    registrar: Arc<Registrar>,
    cfg: Arc<ExposeConfig>,
    stop: Arc<AtomicBool>,
}

/// Registers, waits for a mobile client, again, until the agent stops. A slot
/// whose mobile client spoke pipes it in this thread, and hands the slot to a
/// new thread once the first answer is on its way (`Waited::HandedOver`).
fn slot(s: &Slot) {
    let (n, registrar, cfg, stop) = (&*s.tag, &*s.registrar, &*s.cfg, &*s.stop);
    let mut failures = Failures {
        count: 0,
        reported: Instant::now(),
    };
    while !stop.load(Ordering::SeqCst) {
        let wait = match registrar.register_via(&s.relay, &cfg.label) {
            Ok(plug) => match TcpStream::connect_timeout(&plug, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let since = Instant::now();
                    match serve_one(s, stream) {
                        Waited::HandedOver => return,
                        Waited::Ended if since.elapsed() < SHORT_WAIT => {
                            // Most likely evicted: more responders wait than
                            // the relay keeps.
                            failures.note(
                                n,
                                "relay closed the waiting connection at once (more responders than its max_waiting?)",
                            );
                            failures.backoff()
                        }
                        Waited::LocalDown(e) => {
                            failures.note(n, &format!("local service {}: {e}", cfg.to));
                            failures.backoff()
                        }
                        Waited::Spoke | Waited::Ended => {
                            failures.success(n);
                            continue;
                        }
                    }
                }
                Err(e) => {
                    failures.note(n, &format!("plug {plug}: {e}"));
                    failures.backoff()
                }
            },
            Err(RegisterError::Refused {
                status: status @ (401 | 403),
                body,
                ..
            }) => {
                failures.note(
                    n,
                    &format!(
                        "relay answered {status} ({body}); a wrong clock is the usual cause: local time is {}",
                        crate::logging::timestamp(std::time::SystemTime::now())
                    ),
                );
                AUTH_RETRY
            }
            Err(RegisterError::Refused {
                status: 429,
                retry_after,
                ..
            }) => {
                let secs = retry_after.unwrap_or(10);
                failures.note(n, &format!("relay answered 429; waiting {secs} s"));
                Duration::from_secs(secs).min(MAX_BACKOFF * 4)
            }
            Err(e) => {
                failures.note(n, &e.to_string());
                match &e {
                    RegisterError::Refused {
                        retry_after: Some(s),
                        ..
                    } => Duration::from_secs(*s)
                        .max(failures.backoff())
                        .min(MAX_BACKOFF),
                    _ => failures.backoff(),
                }
            }
        };
        if !pause(wait, stop) {
            return;
        }
    }
}

/// How a waiting connection ended.
enum Waited {
    /// The mobile side spoke: the connection went to a pipe thread, or was
    /// piped here and the slot could not be handed over (no thread), or the
    /// local service was down (that connection was closed).
    Spoke,
    /// The mobile side spoke and this thread piped it; another thread has the
    /// slot now.
    HandedOver,
    /// The relay closed it, or the agent is stopping.
    Ended,
    /// `--eager` could not reach the local service.
    LocalDown(Error),
}

/// Waits on one responder connection until the mobile side speaks, then pipes
/// it to the local service: here, connecting at once (no thread start on the
/// way), with a new thread taking the slot over when the first answer has been
/// passed back or `REFILL_DELAY` has gone by, and `REFILL_PAUSE` more; with
/// `eager` or `tls`, in a pipe
/// thread.
fn serve_one(s: &Slot, relayed: TcpStream) -> Waited {
    let (n, cfg, stop) = (&*s.tag, &*s.cfg, &*s.stop);
    // The relay may vanish without a FIN (host down, NAT mapping lost): the
    // agent never sends on a waiting connection, so only keepalive notices.
    let _ = set_keepalive(&relayed);
    let early = if cfg.eager {
        match connect_to(&cfg.to, "connect to local service") {
            Ok(local) => match (local.try_clone(), relayed.try_clone()) {
                (Ok(l), Ok(r)) => {
                    let _ = spawn("pipe-down", AGENT_STACK, move || {
                        drop(relay::one_way(&l, &r))
                    });
                    Some(local)
                }
                _ => None,
            },
            Err(e) => return Waited::LocalDown(e),
        }
    } else {
        None
    };
    if !mobile_spoke(n, &relayed, stop) {
        // The eager pipe thread holds clones of both sockets: end it.
        if let Some(local) = &early {
            let _ = local.shutdown(Shutdown::Both);
            let _ = relayed.shutdown(Shutdown::Both);
        }
        return Waited::Ended;
    }
    let peer = relayed
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let (to, at) = (cfg.to.clone(), s.relay.clone());
    let spawned = match (early, &cfg.tls) {
        (_, Some(cert)) => {
            let config = cert.current();
            spawn("tls-pipe", terminate::TLS_STACK, move || {
                tls_pipe(relayed, config, &at, &peer, &to);
            })
        }
        (Some(local), None) => spawn("pipe", AGENT_STACK, move || {
            match relay::one_way(&relayed, &local) {
                Ok(moved) => log::info!("relay {at}: pipe via {peer} to {to} done: {moved} up"),
                Err(e) => log::info!("relay {at}: pipe via {peer} to {to}: {e}"),
            }
        }),
        (None, None) => return pipe_here(s, relayed, &peer),
    };
    if let Err(e) = spawned {
        log::error!("{n}: {e}");
    }
    Waited::Spoke
}

/// Pipes a relayed connection whose mobile client spoke to the local service,
/// in this thread, and hands the slot to a new thread once the first answer
/// has been passed back (or after `REFILL_DELAY`), and `REFILL_PAUSE` more.
fn pipe_here(s: &Slot, relayed: TcpStream, peer: &str) -> Waited {
    let (n, to) = (&*s.tag, &s.cfg.to);
    let local = match connect_to(to, "connect to local service") {
        Ok(local) => local,
        Err(e) => {
            log::warn!("{n}: local service {to} unreachable: {e}; closed that mobile connection");
            return Waited::Spoke;
        }
    };
    let mut handed = false;
    let hand_over = relay::Hook {
        toward: relay::Toward::Mobile,
        by: Instant::now() + REFILL_DELAY,
        after: REFILL_PAUSE,
        call: || {
            let next = s.clone();
            match spawn("slot", AGENT_STACK, move || slot(&next)) {
                Ok(_) => handed = true,
                Err(e) => log::error!("{n}: {e}; registering again after this connection"),
            }
            Ok(())
        },
    };
    // The mobile's first octets are there: the first turn passes them on.
    let ready = relay::Ready {
        mobile: true,
        hidden: false,
    };
    let (moved, err) = relay::run_with(
        Arc::new(relayed),
        Arc::new(local),
        relay::Copier::Splice,
        // As TLS pipes: closed after an hour without an octet either way,
        // whatever the relay's own `idle_timeout`.
        Some(terminate::IDLE_TIMEOUT),
        ready,
        hand_over,
    );
    let how = err.map_or_else(String::new, |e| format!(" ({e})"));
    log::info!(
        "{n}: pipe via {peer} to {to}: {} up, {} down{how}",
        moved.up,
        moved.down
    );
    if handed {
        Waited::HandedOver
    } else {
        Waited::Spoke
    }
}

/// One relayed connection with TLS ended here: the handshake (under its
/// deadline), then the local service, then both directions in this thread.
/// `at` (the relay) and `peer` (the relayed connection's far end) are for the log.
fn tls_pipe(relayed: TcpStream, config: Arc<rustls::ServerConfig>, at: &str, peer: &str, to: &str) {
    let (conn, relayed) = match terminate::handshake(relayed, config) {
        Ok(done) => done,
        Err(e) => {
            log::info!("relay {at}: tls via {peer}: {e}; closed that mobile connection");
            return;
        }
    };
    let local = match connect_to(to, "connect to local service") {
        Ok(local) => local,
        Err(e) => {
            log::warn!(
                "relay {at}: local service {to} unreachable: {e}; closed that mobile connection"
            );
            return;
        }
    };
    let (moved, err) = terminate::pipe(conn, &relayed, &local);
    let how = err.map_or_else(String::new, |e| format!(" ({e})"));
    log::info!(
        "relay {at}: tls pipe via {peer} to {to}: {} up, {} down{how}",
        moved.up,
        moved.down
    );
}

/// Waits until the mobile side's first octet arrives (true), or the waiting
/// connection ends or the agent stops (false).
fn mobile_spoke(n: &str, relayed: &TcpStream, stop: &AtomicBool) -> bool {
    loop {
        match peer_state(relayed, WAIT_TICK) {
            PeerState::Speaking => return true,
            PeerState::Quiet if !stop.load(Ordering::SeqCst) => {}
            PeerState::Quiet => return false,
            PeerState::Gone => {
                log::debug!("{n}: relay closed the waiting connection");
                return false;
            }
        }
    }
}

/// A connection to `addr` (HOST:PORT), within `CONNECT_TIMEOUT`, without Nagle;
/// `phase` names the step in errors.
fn connect_to(addr: &str, phase: &'static str) -> Result<TcpStream> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| Error::io("resolve", e))?
        .next()
        .ok_or_else(|| Error::Usage(format!("{addr} has no address")))?;
    let s =
        TcpStream::connect_timeout(&resolved, CONNECT_TIMEOUT).map_err(|e| Error::io(phase, e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("https://reg.example.com:8443/register/x"),
            Some(("reg.example.com:8443".into(), "reg.example.com".into()))
        );
        assert_eq!(
            parse_location("https://reg.example.com/register/x"),
            Some(("reg.example.com:443".into(), "reg.example.com".into()))
        );
        assert_eq!(parse_location("nonsense"), None);
    }

    #[test]
    fn relay_values() {
        for (given, want) in [
            ("127.0.0.2:8443", "127.0.0.2:8443"),
            ("[::1]:443", "[::1]:443"),
            ("[2001:DB8::7]:443", "[2001:db8::7]:443"),
            ("relay-2.example.com:443", "relay-2.example.com:443"),
            ("relay.example.com.:443", "relay.example.com.:443"),
            ("localhost:1", "localhost:1"),
        ] {
            assert_eq!(parse_relay(given).unwrap(), want, "{given}");
        }
        for bad in [
            "",
            "127.0.0.2",
            "127.0.0.2:",
            "127.0.0.2:0",
            "127.0.0.2:65536",
            "127.0.0.2:https",
            ":8443",
            "::1:443",
            "[::1:443",
            "[127.0.0.1]:443",
            "300.0.0.1:443",
            "1.2.3:443",
            "relay..example.com:443",
            "re lay:443",
            "https://relay.example.com:443",
        ] {
            let e = parse_relay(bad).expect_err(bad).to_string();
            assert!(
                e.contains(&format!("bad --relay {bad:?}")),
                "{bad}: the error names the value: {e}"
            );
        }
    }

    #[test]
    fn a_name_resolves_to_each_of_its_addresses_once() {
        // `localhost` is the one name every resolver knows: 127.0.0.1, and ::1
        // where the system lists it. All of them, not only the first.
        let all = resolve_all("localhost", 8443).unwrap();
        let mut listed: Vec<SocketAddr> = ("localhost", 8443).to_socket_addrs().unwrap().collect();
        listed.dedup();
        for a in &listed {
            assert!(all.contains(a), "{a} missing from {all:?}");
        }
        for (i, a) in all.iter().enumerate() {
            assert!(a.ip().is_loopback() && a.port() == 8443, "{a}");
            assert!(!all[..i].contains(a), "{a} twice in {all:?}");
        }
        let v4: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let v6: SocketAddr = "[::1]:8443".parse().unwrap();
        assert!(all.contains(&v4) || all.contains(&v6), "{all:?}");
        // IP addresses are themselves; IPv6 with or without brackets.
        assert_eq!(resolve_all("::1", 1).unwrap(), ["[::1]:1".parse().unwrap()]);
        assert_eq!(
            resolve_all("[::1]", 1).unwrap(),
            ["[::1]:1".parse().unwrap()]
        );
        assert_eq!(each_once([3, 1, 3, 2, 1]), [3, 1, 2]);
        // A name that cannot resolve (RFC 6761: .invalid never does) is named.
        let e = resolve_all("no-such-host.invalid", 443)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot resolve no-such-host.invalid:"), "{e}");
    }

    #[test]
    fn backoff_grows_with_jitter_and_cap() {
        let mut f = Failures {
            count: 0,
            reported: Instant::now(),
        };
        let first = f.backoff();
        assert!(first >= FIRST_BACKOFF / 2 && first <= FIRST_BACKOFF);
        f.count = 30;
        let capped = f.backoff();
        assert!(capped >= MAX_BACKOFF / 2 && capped <= MAX_BACKOFF);
    }
}
