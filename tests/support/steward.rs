//! A hidden server that behaves like the original ecosystem's: the steward's
//! `register()` and `rendezvous()` (TheThingSystem/steward, steward/core/server.js),
//! modelled on how they behave, not copied.
//!
//! As the original:
//! - a counter is raised by every `PUT /register/LABEL` sent and lowered whenever
//!   one of them ends; registrations go one after another until it holds `keep`
//!   (the original's 15);
//! - the request: TLS to the relay's well-known port, SNI and `Host` the registrar
//!   name (with `:PORT`), `Authorization: TOTP username="ID", response="TOKEN"`;
//! - a `200`: its body `HOST:PORT` is connected to at once (the waiting
//!   connection) and, while the counter is below `keep`, the next registration is
//!   sent at once;
//! - any other status: the next registration 15 s later; a request that fails
//!   (connect, TLS, read): 10 s later;
//! - the waiting connection receives bytes (a pairing): the next registration at
//!   once, and the connection is piped to the local service (the first bytes
//!   written first; a half-close passed on either way);
//! - the waiting connection ends before any byte: 5 s later on EOF, 10 s on a
//!   reset or error (the original's `end` and `error` handlers).
//!
//! Stricter than the original, so that tests can assert it: a `200` body must be
//! exactly `HOST:PORT` (no newline), else it is an error (and 10 s). Bounded: at most
//! `MAX_REGISTRATIONS` are sent; past that it stops and says so in `errors()`.
//!
//! Every thread and socket it starts is stopped on drop.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use taas::totp::Totp;

/// Registrations sent at most, so that a relay that makes it churn cannot make a
/// test run for ever (the storm of issue 12 was ~475 a second).
pub const MAX_REGISTRATIONS: usize = 400;
/// Largest registrar answer read.
const MAX_ANSWER: usize = 16 * 1024;
/// Timeout of a registration request's connect, reads and writes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What it is given, as the original's provisioning parameters.
pub struct Params {
    /// The relay's well-known port.
    pub relay: SocketAddr,
    /// The registrar's name (SNI and `Host`).
    pub registrar: String,
    /// The relay's certificate (PEM), the only one trusted.
    pub ca_pem: String,
    /// The account ID.
    pub id: String,
    /// Its TOTP.
    pub totp: Totp,
    /// The label registered.
    pub label: String,
    /// The local service each paired connection is piped to (the original's
    /// `127.0.0.1:portno`).
    pub service: SocketAddr,
    /// Registrations kept (15 in the original).
    pub keep: usize,
}

/// A registration answered other than 200.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The status.
    pub status: u16,
    /// Its `Retry-After`, if any.
    pub retry_after: Option<String>,
    /// When it came.
    pub at: Instant,
}

#[derive(Default)]
struct Counts {
    /// The original's `responders`.
    responders: usize,
    /// Registration requests sent.
    registrations: usize,
    /// Of which answered 200 with a good body.
    ok: usize,
    /// Waiting connections that received bytes.
    pairings: usize,
    /// Waiting connections that ended before any byte.
    ended: usize,
    /// Answers other than 200.
    refusals: Vec<Refusal>,
    /// Anything unexpected (at most 50 kept).
    errors: Vec<String>,
}

impl Counts {
    fn error(&mut self, e: String) {
        if self.errors.len() < 50 {
            self.errors.push(e);
        }
    }
}

/// Threads and sockets to stop.
#[derive(Default)]
struct Registry {
    stopped: bool,
    threads: Vec<JoinHandle<()>>,
    sockets: Vec<Weak<TcpStream>>,
}

struct Inner {
    params: Params,
    tls: Arc<rustls::ClientConfig>,
    stop: AtomicBool,
    counts: Mutex<Counts>,
    registry: Mutex<Registry>,
}

/// The running hidden server; dropping it stops every thread and closes every
/// connection it made.
pub struct Steward {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Steward {
    /// Starts registering.
    pub fn start(params: Params) -> Steward {
        let tls = taas::tls::client_config(Some(&params.ca_pem)).unwrap();
        let inner = Arc::new(Inner {
            params,
            tls,
            stop: AtomicBool::new(false),
            counts: Mutex::default(),
            registry: Mutex::default(),
        });
        register(&inner, Duration::ZERO);
        Steward { inner }
    }

    /// Registration requests sent so far.
    pub fn registrations(&self) -> usize {
        lock(&self.inner.counts).registrations
    }

    /// Of which answered 200.
    pub fn accepted(&self) -> usize {
        lock(&self.inner.counts).ok
    }

    /// Waiting connections that received bytes so far.
    pub fn pairings(&self) -> usize {
        lock(&self.inner.counts).pairings
    }

    /// Waiting connections that ended before any byte.
    pub fn ended(&self) -> usize {
        lock(&self.inner.counts).ended
    }

    /// The original's counter: registrations sent and not yet ended.
    pub fn counted(&self) -> usize {
        lock(&self.inner.counts).responders
    }

    /// Answers other than 200, in order.
    pub fn refusals(&self) -> Vec<Refusal> {
        lock(&self.inner.counts).refusals.clone()
    }

    /// Anything unexpected, in order.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.inner.counts).errors.clone()
    }

    /// A one-line summary for assertion messages.
    pub fn summary(&self) -> String {
        let c = lock(&self.inner.counts);
        format!(
            "{} registrations ({} ok, {} refused: {:?}), {} pairings, {} waiting connections ended, counter {}, errors {:?}",
            c.registrations,
            c.ok,
            c.refusals.len(),
            c.refusals.iter().map(|r| r.status).collect::<Vec<_>>(),
            c.pairings,
            c.ended,
            c.responders,
            c.errors
        )
    }
}

impl Drop for Steward {
    fn drop(&mut self) {
        let threads = {
            let mut reg = lock(&self.inner.registry);
            reg.stopped = true;
            self.inner.stop.store(true, Ordering::SeqCst);
            for s in reg.sockets.drain(..).filter_map(|w| w.upgrade()) {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut reg.threads)
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Inner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `d` in short steps; false when stopped meanwhile.
    fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while !self.stopped() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        false
    }

    /// Runs `f` on a thread joined on drop (not at all once stopped).
    fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let mut reg = lock(&self.registry);
        if reg.stopped {
            return;
        }
        reg.threads.retain(|t| !t.is_finished());
        let t = std::thread::Builder::new()
            .name("steward".into())
            .spawn(f)
            .expect("spawn a steward thread");
        reg.threads.push(t);
    }

    /// Remembers `s` to shut it down on drop (at once when stopped already).
    fn track(&self, s: &Arc<TcpStream>) {
        let mut reg = lock(&self.registry);
        if reg.stopped {
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        reg.sockets.retain(|w| w.strong_count() > 0);
        reg.sockets.push(Arc::downgrade(s));
    }

    fn error(&self, e: String) {
        lock(&self.counts).error(e);
    }

    /// One `PUT /register/LABEL`: (status, Retry-After, body).
    fn put_register(&self) -> Result<(u16, Option<String>, Vec<u8>), String> {
        let p = &self.params;
        let tcp = TcpStream::connect_timeout(&p.relay, REQUEST_TIMEOUT)
            .map_err(|e| format!("connect {}: {e}", p.relay))?;
        tcp.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        let name = rustls::pki_types::ServerName::try_from(p.registrar.clone())
            .map_err(|e| format!("server name {}: {e}", p.registrar))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| format!("TLS: {e}"))?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let token = p.totp.generate(taas::unix_time());
        let request = format!(
            "PUT /register/{} HTTP/1.1\r\nauthorization: TOTP username=\"{}\", response=\"{token}\"\r\nhost: {}:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            p.label,
            p.id,
            p.registrar,
            p.relay.port()
        );
        tls.write_all(request.as_bytes())
            .and_then(|()| tls.flush())
            .map_err(|e| format!("send: {e}"))?;
        read_answer(&mut tls)
    }
}

/// Reads one HTTP/1.1 answer, however it is framed (`Content-Length`, chunked, or
/// to the close), as Node's `http` does.
fn read_answer(r: &mut impl Read) -> Result<(u16, Option<String>, Vec<u8>), String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let rest = &got[end + 4..];
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line in {head:?}"))?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let retry_after = header("retry-after");
            let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                dechunk(rest)
            } else if let Some(len) = header("content-length") {
                let len: usize = len.parse().map_err(|_| format!("Content-Length {len:?}"))?;
                (rest.len() >= len).then(|| rest[..len].to_vec())
            } else {
                closed.then(|| rest.to_vec())
            };
            match body {
                Some(body) => return Ok((status, retry_after, body)),
                None if closed => return Err(format!("answer cut short: {head:?}")),
                None => {}
            }
        } else if closed {
            return Err(format!(
                "no answer head in {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        if got.len() > MAX_ANSWER {
            return Err("answer too large".into());
        }
        match r.read(&mut buf) {
            Ok(0) => closed = true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A TLS stream cut without close_notify: the end, as for Node.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => closed = true,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// A whole chunked body, or None while incomplete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The body of a 200, if it is exactly `HOST:PORT`.
pub fn plug_address(body: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(body).ok()?;
    let (host, port) = text.rsplit_once(':')?;
    if host.is_empty()
        || host.contains(char::is_whitespace)
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (host, port).to_socket_addrs().ok()?.next()
}

/// The original's `retry(secs)`: lowers the counter, registers again after `d`.
fn retry(inner: &Arc<Inner>, d: Duration) {
    {
        let mut c = lock(&inner.counts);
        c.responders = c.responders.saturating_sub(1);
    }
    register(inner, d);
}

/// The original's `register()`, after `delay`.
fn register(inner: &Arc<Inner>, delay: Duration) {
    let me = inner.clone();
    inner.spawn(move || {
        if !me.pause(delay) {
            return;
        }
        {
            let mut c = lock(&me.counts);
            if c.registrations >= MAX_REGISTRATIONS {
                let e = format!("stopped after {MAX_REGISTRATIONS} registrations");
                if !c.errors.contains(&e) {
                    c.error(e);
                }
                return;
            }
            c.registrations += 1;
            c.responders += 1;
        }
        match me.put_register() {
            Ok((200, _, body)) => match plug_address(&body) {
                Some(addr) => {
                    let more = {
                        let mut c = lock(&me.counts);
                        c.ok += 1;
                        c.responders < me.params.keep
                    };
                    rendezvous(&me, addr);
                    if more {
                        register(&me, Duration::ZERO);
                    }
                }
                None => {
                    me.error(format!(
                        "200 body {:?} is not exactly HOST:PORT",
                        String::from_utf8_lossy(&body)
                    ));
                    retry(&me, Duration::from_secs(10));
                }
            },
            Ok((status, retry_after, _)) => {
                lock(&me.counts).refusals.push(Refusal {
                    status,
                    retry_after,
                    at: Instant::now(),
                });
                retry(&me, Duration::from_secs(15));
            }
            Err(e) => {
                if !me.stopped() {
                    me.error(format!("register: {e}"));
                }
                retry(&me, Duration::from_secs(10));
            }
        }
    });
}

/// The original's `rendezvous()`: the waiting connection to `plug`.
fn rendezvous(inner: &Arc<Inner>, plug: SocketAddr) {
    let me = inner.clone();
    inner.spawn(move || {
        let remote = match TcpStream::connect_timeout(&plug, REQUEST_TIMEOUT) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                me.error(format!("connect to plug {plug}: {e}"));
                retry(&me, Duration::from_secs(10));
                return;
            }
        };
        me.track(&remote);
        let _ = remote.set_nodelay(true);
        let _ = socket2::SockRef::from(&*remote).set_keepalive(true);
        let _ = remote.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = vec![0u8; 16 * 1024];
        let n = loop {
            if me.stopped() {
                return;
            }
            match (&*remote).read(&mut buf) {
                Ok(0) => {
                    lock(&me.counts).ended += 1;
                    retry(&me, Duration::from_secs(5));
                    return;
                }
                Ok(n) => break n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    lock(&me.counts).ended += 1;
                    retry(&me, Duration::from_secs(10));
                    return;
                }
            }
        };
        lock(&me.counts).pairings += 1;
        let _ = remote.set_read_timeout(None);
        retry(&me, Duration::ZERO);
        let local = match TcpStream::connect_timeout(&me.params.service, REQUEST_TIMEOUT) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                me.error(format!("connect to service: {e}"));
                let _ = remote.shutdown(Shutdown::Both);
                return;
            }
        };
        me.track(&local);
        let _ = local.set_nodelay(true);
        if (&*local).write_all(&buf[..n]).is_err() {
            let _ = remote.shutdown(Shutdown::Both);
            let _ = local.shutdown(Shutdown::Both);
            return;
        }
        let (r2, l2) = (remote.clone(), local.clone());
        me.spawn(move || pipe(&l2, &r2));
        pipe(&remote, &local);
    });
}

/// Copies `from` to `to` until EOF, then half-closes `to`; on an error closes both.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut reader = from;
        let mut writer = to;
        match reader.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn answers_are_read_however_framed() {
    let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n127.0.0.1:3022";
    assert_eq!(
        read_answer(&mut &cl[..]).unwrap(),
        (200, None, b"127.0.0.1:3022".to_vec())
    );
    let chunked =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n127.0.0.1:3022\r\n0\r\n\r\n";
    assert_eq!(read_answer(&mut &chunked[..]).unwrap().2, b"127.0.0.1:3022");
    let close = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 15\r\n\r\nbusy";
    assert_eq!(
        read_answer(&mut &close[..]).unwrap(),
        (503, Some("15".into()), b"busy".to_vec())
    );
    assert!(read_answer(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..]).is_err());
    assert_eq!(
        plug_address(b"127.0.0.1:3022"),
        Some("127.0.0.1:3022".parse().unwrap())
    );
    assert_eq!(plug_address(b"127.0.0.1:3022\n"), None);
    assert_eq!(plug_address(b"3022"), None);
}
