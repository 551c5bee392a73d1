//! The hidden side (`taas expose`): keeps `pool` registrations waiting at the relay
//! for one label and pipes each relayed connection to a local TCP service.
//!
//! Each of the `pool` slots is one thread that loops: register (PROTOCOL.md
//! section 1), connect to the plug, wait for the mobile client's first octet.
//! Then that thread connects to the local service and pipes the connection
//! itself, and a new thread takes the slot over and registers again as soon as
//! the service's first answer is on its way back (at most `REFILL_DELAY` on):
//! the mobile's first octets wait for no thread start and share the CPU with no
//! TLS handshake. So a burst of mobile connections is met by all slots
//! re-registering at once, not one after another.
//!
//! Invariants:
//! - failures back off exponentially with jitter, capped at `MAX_BACKOFF`; 401 and
//!   403 retry slowly (`AUTH_RETRY`) and say the clock is the usual cause; 429
//!   waits its `Retry-After`; a 3xx is followed (at most `MAX_REDIRECTS` hops);
//! - the registrar's answer is read as its framing says (`Content-Length`,
//!   `chunked`, or to the close), at most `MAX_ANSWER` octets, and no further:
//!   a malformed one is an error like a network failure (logged, backed off);
//! - a failing run is logged at its first failure and then as a count, once per
//!   `REPORT_EVERY`, not once per retry;
//! - the local service being down closes that one mobile connection only;
//! - with `eager`, the local service is connected as soon as the responder is in
//!   place, so a server that speaks first (SMTP, FTP) is heard: its octets wait
//!   in the relay until a mobile client is paired. The slot registers again when
//!   the mobile side first sends, or when the connection ends.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::provision::Provision;
use crate::relay;
use crate::server::spawn;
use crate::totp::Totp;

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
/// Largest registration answer read.
pub const MAX_ANSWER: usize = 16 * 1024;
/// A failing run is summed up this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Stack of slot and pipe threads.
pub const AGENT_STACK: usize = 128 * 1024;
/// Longest wait, once a mobile client's first octets have arrived, before the
/// slot registers again: until the local service's first answer is on its way
/// back, so that the registration's TLS handshake (CPU on both sides) does not
/// compete with it (`make bench`: connect → first byte).
pub const REFILL_DELAY: Duration = Duration::from_millis(20);
/// A waiting connection the relay closes sooner than this counts as a failure
/// (backed off), so an agent whose pool exceeds the relay's `max_waiting` does
/// not re-register in a loop.
pub const SHORT_WAIT: Duration = Duration::from_secs(2);

/// Where and how to register: read from a provisioning file.
#[derive(Clone)]
pub struct Registrar {
    /// Address to connect to (`server.hostname`, `server.port`).
    pub connect: String,
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
            Some(crate::cert::client_config(p.server.ca.as_deref())?)
        };
        let host = &p.server.hostname;
        let connect = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", p.server.port)
        } else {
            format!("{host}:{}", p.server.port)
        };
        Ok(Registrar {
            connect,
            name: p.registrar_name().to_string(),
            tls,
            id: p.id().to_string(),
            totp: p.totp()?,
        })
    }

    /// Registers `label` and returns the plug's address, following redirects.
    pub fn register(&self, label: &str) -> std::result::Result<SocketAddr, RegisterError> {
        let mut target = (self.connect.clone(), self.name.clone());
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
                    log::info!("registration redirected to {}", target.0);
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
        let token = self.totp.generate(crate::unix_time());
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
            body: body.lines().next().unwrap_or("").to_string(),
        })
    }
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
    let addr = connect
        .to_socket_addrs()
        .map_err(|e| Error::io("resolve registrar", e))?
        .next()
        .ok_or_else(|| Error::Usage(format!("{connect} has no address")))?;
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| Error::io("connect to registrar", e))?;
    let _ = tcp.set_nodelay(true);
    let io = crate::http::DeadlineStream {
        inner: tcp,
        deadline,
    };
    match tls {
        Some(cfg) => {
            let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
                .map_err(|e| Error::Tls(format!("{name}: {e}")))?;
            let conn = rustls::ClientConnection::new(cfg.clone(), server_name)
                .map_err(|e| Error::Tls(e.to_string()))?;
            let mut s = rustls::StreamOwned::new(conn, io);
            s.write_all(request)
                .map_err(|e| Error::io("registration", e))?;
            read_answer(&mut s)
        }
        None => {
            let mut s = io;
            s.write_all(request)
                .map_err(|e| Error::io("registration", e))?;
            read_answer(&mut s)
        }
    }
}

/// Reads one answer: stops as soon as `parse_answer` finds it complete (never
/// waits for the close when `Content-Length` or the last chunk ends it), and
/// never holds more than `MAX_ANSWER + 1` bytes.
fn read_answer(r: &mut impl Read) -> Result<Answer> {
    let mut got = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let room = (MAX_ANSWER + 1).saturating_sub(got.len()).min(buf.len());
        if room == 0 {
            // parse_answer refuses more than MAX_ANSWER; this is a guard only.
            return Err(Error::Limit(ANSWER_LIMIT));
        }
        let closed = match r.read(&mut buf[..room]) {
            Ok(0) => true,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A relay that closes without close_notify: the framing says
            // whether the answer was whole.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(Error::io("registration answer", e)),
        };
        match parse_answer(&got, closed)? {
            Some(answer) => return Ok(answer),
            None if closed => {
                // parse_answer never says "more" once closed; a guard only.
                return Err(Error::BadAnswer(
                    "closed before the answer was whole".into(),
                ));
            }
            None => {}
        }
    }
}

/// What `Error::Limit` names when an answer exceeds `MAX_ANSWER`.
const ANSWER_LIMIT: &str = "registration answer size (MAX_ANSWER, 16 KiB)";

/// Header names and values.
type Headers = Vec<(String, String)>;

/// A whole answer.
#[derive(Debug, PartialEq)]
struct Answer {
    /// Its status (of the final answer, after any 1xx).
    status: u16,
    /// Its header fields (trailers are dropped).
    headers: Headers,
    /// Its body, decoded from its framing.
    body: String,
}

/// How an answer's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, PartialEq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length` octets.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything up to the close.
    Close,
}

/// Parses the octets of an answer received so far; `closed` says the peer has
/// closed (no more will come). `Ok(Some)` once the answer is whole, `Ok(None)`
/// while more is needed (never when `closed`), and an error when it is
/// malformed (`Error::BadAnswer`: not HTTP, bad framing headers, bad chunk size,
/// more octets than the framing allows, cut short by the close) or larger than
/// `MAX_ANSWER`, head and body together (`Error::Limit`). Pure: no I/O.
fn parse_answer(bytes: &[u8], closed: bool) -> Result<Option<Answer>> {
    let bad = |why: String| Err(Error::BadAnswer(why));
    let mut start = 0;
    loop {
        let rest = bytes.get(start..).unwrap_or_default();
        let mut fields = [httparse::EMPTY_HEADER; crate::http::MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let head = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return incomplete(bytes, closed, "head"),
            Err(e) => return bad(format!("not HTTP ({e})")),
        };
        let status = resp.code.unwrap_or(0);
        let body_at = start + head;
        if body_at > MAX_ANSWER {
            return Err(Error::Limit(ANSWER_LIMIT));
        }
        // An interim answer (100 Continue, 103 Early Hints): the real one follows.
        if (100..200).contains(&status) && status != 101 {
            start = body_at;
            continue;
        }
        let framing = framing(status, resp.version, resp.headers)?;
        let headers = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let after = bytes.get(body_at..).unwrap_or_default();
        let (body, end) = match framing {
            Framing::Empty => (&[][..], body_at),
            Framing::Length(n) => {
                if n > MAX_ANSWER - body_at {
                    return Err(Error::Limit(ANSWER_LIMIT));
                }
                match after.get(..n) {
                    Some(body) => (body, body_at + n),
                    None => return incomplete(bytes, closed, "body (Content-Length)"),
                }
            }
            Framing::Chunked => match dechunk(after)? {
                Some((decoded, used)) => {
                    let end = body_at + used;
                    if end > MAX_ANSWER {
                        return Err(Error::Limit(ANSWER_LIMIT));
                    }
                    if end < bytes.len() {
                        return bad(format!("{} octets after the last chunk", bytes.len() - end));
                    }
                    return Ok(Some(Answer {
                        status,
                        headers,
                        body: String::from_utf8_lossy(&decoded).into_owned(),
                    }));
                }
                None => return incomplete(bytes, closed, "chunked body"),
            },
            Framing::Close => {
                if bytes.len() > MAX_ANSWER {
                    return Err(Error::Limit(ANSWER_LIMIT));
                }
                if !closed {
                    return Ok(None);
                }
                (after, bytes.len())
            }
        };
        if end < bytes.len() {
            return bad(match framing {
                Framing::Length(n) => format!("body longer than its Content-Length {n}"),
                _ => format!(
                    "{} octets after an answer without a body",
                    bytes.len() - end
                ),
            });
        }
        return Ok(Some(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(body).into_owned(),
        }));
    }
}

/// The answer so far is not whole: wait for more, unless it is already too
/// large or the peer has closed.
fn incomplete(bytes: &[u8], closed: bool, what: &str) -> Result<Option<Answer>> {
    if bytes.len() > MAX_ANSWER {
        Err(Error::Limit(ANSWER_LIMIT))
    } else if closed {
        Err(Error::BadAnswer(format!(
            "closed before the end of its {what}"
        )))
    } else {
        Ok(None)
    }
}

/// The body's framing from the status and the header fields. Both
/// `Transfer-Encoding` and `Content-Length`, a transfer coding other than
/// `chunked`, or differing or malformed `Content-Length`s are refused (RFC 9112
/// section 6.3: such an answer "ought to be handled as an error").
fn framing(status: u16, version: Option<u8>, fields: &[httparse::Header<'_>]) -> Result<Framing> {
    let bad = |why: String| Err(Error::BadAnswer(why));
    if status < 200 || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let mut codings = Vec::new();
    let mut length: Option<usize> = None;
    for h in fields {
        let Ok(value) = std::str::from_utf8(h.value) else {
            if h.name.eq_ignore_ascii_case("transfer-encoding")
                || h.name.eq_ignore_ascii_case("content-length")
            {
                return bad(format!("{} is not text", h.name));
            }
            continue;
        };
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_ascii_lowercase),
            );
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for v in value.split(',').map(str::trim) {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return bad(format!("bad Content-Length {value:?}"));
                }
                // All digits: only too many of them fails to parse.
                let n = v.parse().map_err(|_| Error::Limit(ANSWER_LIMIT))?;
                if length.is_some_and(|l| l != n) {
                    return bad(format!("differing Content-Lengths ({value:?})"));
                }
                length = Some(n);
            }
        }
    }
    if codings.is_empty() {
        return Ok(length.map_or(Framing::Close, Framing::Length));
    }
    if length.is_some() {
        return bad("both Transfer-Encoding and Content-Length".into());
    }
    if version == Some(0) {
        return bad("Transfer-Encoding in an HTTP/1.0 answer".into());
    }
    if codings != ["chunked"] {
        return bad(format!(
            "unsupported Transfer-Encoding {:?}",
            codings.join(", ")
        ));
    }
    Ok(Framing::Chunked)
}

/// Decodes a chunked body at the start of `bytes` (RFC 9112 section 7.1):
/// `Some((body, octets used))` once the last chunk and the trailer section are
/// in, `None` while more is needed. Chunk extensions and trailer fields are
/// read and dropped; a chunk size is hex digits, optionally followed by spaces
/// or tabs, and a chunk larger than `MAX_ANSWER` is refused at once.
fn dechunk(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let rest = bytes.get(pos..).unwrap_or_default();
        let Some(eol) = find_crlf(rest) else {
            // A size line not yet whole: refuse it now if it cannot become one.
            chunk_size(rest.strip_suffix(b"\r").unwrap_or(rest), false)?;
            return Ok(None);
        };
        let size = chunk_size(rest.get(..eol).unwrap_or_default(), true)?;
        pos += eol + 2;
        if size == 0 {
            // The trailer section: field lines up to an empty line.
            loop {
                let rest = bytes.get(pos..).unwrap_or_default();
                match find_crlf(rest) {
                    Some(0) => return Ok(Some((body, pos + 2))),
                    Some(n) => pos += n + 2,
                    None => return Ok(None),
                }
            }
        }
        let Some(data) = bytes.get(pos..pos + size) else {
            return Ok(None);
        };
        match bytes.get(pos + size..pos + size + 2) {
            Some(b"\r\n") => {}
            Some(_) => {
                return Err(Error::BadAnswer(format!(
                    "chunk of {size} octets not followed by CRLF"
                )));
            }
            // The CRLF may be only partly in: wait when what is there is a CR.
            None => {
                return match bytes.get(pos + size..) {
                    Some(b"" | b"\r") => Ok(None),
                    _ => Err(Error::BadAnswer(format!(
                        "chunk of {size} octets not followed by CRLF"
                    ))),
                };
            }
        }
        body.extend_from_slice(data);
        pos += size + 2;
    }
}

/// The size of a chunk from its size line (without CRLF); `whole` is false for
/// a line still arriving, which may yet be empty or end within the digits.
fn chunk_size(line: &[u8], whole: bool) -> Result<usize> {
    let bad = || {
        Error::BadAnswer(format!(
            "bad chunk size {:?}",
            String::from_utf8_lossy(&line[..line.len().min(40)])
        ))
    };
    let size_part = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits_end = size_part
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(size_part.len());
    let (digits, tail) = size_part.split_at(digits_end);
    if !tail.iter().all(|&b| b == b' ' || b == b'\t') {
        return Err(bad());
    }
    if digits.is_empty() && (whole || !tail.is_empty() || line.contains(&b';')) {
        return Err(bad());
    }
    let mut size: usize = 0;
    for &d in digits {
        let v = char::from(d).to_digit(16).ok_or_else(bad)?;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(v as usize))
            .filter(|&s| s <= MAX_ANSWER)
            .ok_or(Error::Limit(ANSWER_LIMIT))?;
    }
    Ok(size)
}

/// Offset of the first CRLF.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

/// What `taas expose` was asked to do.
#[derive(Clone)]
pub struct ExposeConfig {
    /// The label served.
    pub label: String,
    /// The local service, HOST:PORT.
    pub to: String,
    /// Registrations kept waiting.
    pub pool: usize,
    /// Connect to the local service before the mobile client speaks.
    pub eager: bool,
}

/// A running agent; `stop` ends its slots within `WAIT_TICK` (pipes run on).
pub struct Agent {
    /// Set to stop.
    stop: Arc<AtomicBool>,
}

impl Agent {
    /// Starts `cfg.pool` slots.
    pub fn start(registrar: Registrar, cfg: ExposeConfig) -> Result<Agent> {
        let stop = Arc::new(AtomicBool::new(false));
        let registrar = Arc::new(registrar);
        let cfg = Arc::new(cfg);
        log::info!(
            "exposing {} as {} via {} with {} waiting",
            cfg.to,
            cfg.label,
            registrar.connect,
            cfg.pool
        );
        for n in 0..cfg.pool {
            let s = Slot {
                n,
                registrar: registrar.clone(),
                cfg: cfg.clone(),
                stop: stop.clone(),
            };
            spawn("slot", AGENT_STACK, move || slot(&s))?;
        }
        Ok(Agent { stop })
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
    fn note(&mut self, slot: usize, what: &str) {
        self.count += 1;
        if self.count == 1 {
            log::warn!("slot {slot}: {what}; retrying");
            self.reported = Instant::now();
        } else if self.reported.elapsed() >= REPORT_EVERY {
            log::warn!(
                "slot {slot}: still failing after {} attempts: {what}",
                self.count
            );
            self.reported = Instant::now();
        }
    }

    fn success(&mut self, slot: usize) {
        if self.count > 0 {
            log::info!(
                "slot {slot}: registered again after {} failures",
                self.count
            );
        }
        self.count = 0;
    }

    /// Exponential backoff with jitter: half to all of min(cap, first * 2^n).
    fn backoff(&self) -> Duration {
        let exp = FIRST_BACKOFF.saturating_mul(1 << self.count.min(10));
        let full = exp.min(MAX_BACKOFF);
        let mut r = [0u8; 1];
        let _ = crate::store::random_bytes(&mut r);
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

/// One of the `pool` slots: what its thread needs, and hands to the thread that
/// takes the slot over.
#[derive(Clone)]
struct Slot {
    n: usize,
    registrar: Arc<Registrar>,
    cfg: Arc<ExposeConfig>,
    stop: Arc<AtomicBool>,
}

/// Registers, waits for a mobile client, again, until the agent stops. A slot
/// whose mobile client spoke pipes it in this thread, and hands the slot to a
/// new thread once the first answer is on its way (`Waited::HandedOver`).
fn slot(s: &Slot) {
    let (n, registrar, cfg, stop) = (s.n, &*s.registrar, &*s.cfg, &*s.stop);
    let mut failures = Failures {
        count: 0,
        reported: Instant::now(),
    };
    while !stop.load(Ordering::SeqCst) {
        let wait = match registrar.register(&cfg.label) {
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
/// passed back or `REFILL_DELAY` has gone by; with `eager`, in a pipe thread.
fn serve_one(s: &Slot, relayed: TcpStream) -> Waited {
    let (n, cfg, stop) = (s.n, &*s.cfg, &*s.stop);
    // The relay may vanish without a FIN (host down, NAT mapping lost): the
    // agent never sends on a waiting connection, so only keepalive notices.
    let _ = crate::pool::set_keepalive(&relayed);
    let early = if cfg.eager {
        match connect_local(&cfg.to) {
            Ok(local) => match (local.try_clone(), relayed.try_clone()) {
                (Ok(l), Ok(r)) => {
                    let _ = spawn("pipe-down", AGENT_STACK, move || {
                        relay::one_way(&l, &r, relay::Copier::Splice);
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
    let _ = relayed.set_read_timeout(None);
    let peer = relayed
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let to = &cfg.to;
    if let Some(local) = early {
        let to = to.clone();
        let spawned = spawn("pipe", AGENT_STACK, move || {
            let (moved, _) = relay::one_way(&relayed, &local, relay::Copier::Splice);
            log::info!("pipe via {peer} to {to} done: {moved} up");
        });
        if let Err(e) = spawned {
            log::error!("slot {n}: {e}");
        }
        return Waited::Spoke;
    }
    let local = match connect_local(to) {
        Ok(local) => local,
        Err(e) => {
            log::warn!("local service {to} unreachable: {e}; closed that mobile connection");
            return Waited::Spoke;
        }
    };
    let mut handed = false;
    let hand_over = relay::Hook {
        toward: relay::Toward::Mobile,
        by: Instant::now() + REFILL_DELAY,
        call: || {
            let next = s.clone();
            match spawn("slot", AGENT_STACK, move || slot(&next)) {
                Ok(()) => handed = true,
                Err(e) => log::error!("slot {n}: {e}; registering again after this connection"),
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
        None,
        ready,
        hand_over,
    );
    let how = err.map_or_else(String::new, |e| format!(" ({e})"));
    log::info!(
        "pipe via {peer} to {to}: {} up, {} down{how}",
        moved.up,
        moved.down
    );
    if handed {
        Waited::HandedOver
    } else {
        Waited::Spoke
    }
}

/// Waits until the mobile side's first octet arrives (true), or the waiting
/// connection ends or the agent stops (false).
fn mobile_spoke(n: usize, relayed: &TcpStream, stop: &AtomicBool) -> bool {
    let _ = relayed.set_read_timeout(Some(WAIT_TICK));
    let mut byte = [0u8; 1];
    loop {
        match relayed.peek(&mut byte) {
            Ok(0) => {
                log::debug!("slot {n}: relay closed the waiting connection");
                return false;
            }
            Ok(_) => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
            }
            Err(e) => {
                log::debug!("slot {n}: waiting connection: {e}");
                return false;
            }
        }
    }
}

fn connect_local(to: &str) -> Result<TcpStream> {
    let addr = to
        .to_socket_addrs()
        .map_err(|e| Error::io("resolve --to", e))?
        .next()
        .ok_or_else(|| Error::Usage(format!("{to} has no address")))?;
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| Error::io("connect to local service", e))?;
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

    /// `parse_answer` on a whole answer that the peer has closed after.
    fn whole(bytes: &[u8]) -> Result<Option<Answer>> {
        parse_answer(bytes, true)
    }

    fn body_of(bytes: &[u8]) -> String {
        match parse_answer(bytes, false) {
            Ok(Some(a)) => a.body,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn is_bad(r: Result<Option<Answer>>) -> bool {
        matches!(r, Err(Error::BadAnswer(_)))
    }

    fn is_oversize(r: Result<Option<Answer>>) -> bool {
        matches!(r, Err(Error::Limit(_)))
    }

    const NODE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n127.0.0.1:3022\r\n0\r\n\r\n";

    #[test]
    fn answers_parse() {
        let a = parse_answer(
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 10\r\n\r\nslow down\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.status, 429);
        assert_eq!(a.headers[0], ("Retry-After".into(), "7".into()));
        assert_eq!(a.body, "slow down\n");
        assert!(is_bad(parse_answer(b"garbage", false)));
        assert!(is_bad(parse_answer(b"garbage", true)));
    }

    #[test]
    fn chunked_like_node() {
        let a = parse_answer(NODE, false).unwrap().unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.body, "127.0.0.1:3022");
        // Split over chunks, with extensions, upper-case hex, leading zeros,
        // a trailer section and a chunked coding named in capitals.
        assert_eq!(
            body_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n000A;name=\"v;x\"\r\n127.0.0.1:\r\n4 ; a\r\n3022\r\n0;last\r\nX-Trailer: 1\r\nY: 2\r\n\r\n"),
            "127.0.0.1:3022"
        );
        assert_eq!(
            body_of(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\t\r\nab\r\nc\r\n0\r\n\r\n"
            ),
            "ab\r\nc"
        );
        // An empty chunked body; Transfer-Encoding given in two fields.
        assert_eq!(
            body_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            ""
        );
    }

    #[test]
    fn content_length_and_close_delimited() {
        assert_eq!(
            body_of(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n127.0.0.1:3022"),
            "127.0.0.1:3022"
        );
        // The same length repeated is one length.
        assert_eq!(
            body_of(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\nabc"),
            "abc"
        );
        assert_eq!(body_of(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), "");
        // Without framing headers the body runs to the close.
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n127.0.0.1:3022\n";
        assert_eq!(parse_answer(close, false).unwrap(), None);
        assert_eq!(whole(close).unwrap().unwrap().body, "127.0.0.1:3022\n");
        assert_eq!(whole(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap().body, "");
        // No body, whatever the headers say.
        let a = parse_answer(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!(a.unwrap().unwrap().body, "");
        let a = parse_answer(b"HTTP/1.1 304 Not Modified\r\n\r\n", false);
        assert_eq!(a.unwrap().unwrap().status, 304);
    }

    #[test]
    fn interim_answers_are_skipped() {
        let a = parse_answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "ok"));
        assert_eq!(
            parse_answer(b"HTTP/1.1 100 Continue\r\n\r\n", false).unwrap(),
            None
        );
        assert!(is_bad(whole(b"HTTP/1.1 100 Continue\r\n\r\n")));
    }

    /// Every prefix of a framed answer asks for more, and is an error once the
    /// peer closes; the whole answer needs no close.
    #[test]
    fn every_prefix_waits_and_a_cut_is_an_error() {
        let answers: [&[u8]; 3] = [
            NODE,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\n127\r\nc\r\n.0.0.1:3022\n\r\n0\r\nT: v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n127.0.0.1:3022",
        ];
        for answer in answers {
            for k in 0..answer.len() {
                let part = &answer[..k];
                let shown = String::from_utf8_lossy(part);
                assert_eq!(parse_answer(part, false).unwrap(), None, "{shown:?}");
                assert!(is_bad(parse_answer(part, true)), "{shown:?}");
            }
            assert_eq!(body_of(answer).trim(), "127.0.0.1:3022");
            assert_eq!(
                whole(answer).unwrap().unwrap().body.trim(),
                "127.0.0.1:3022"
            );
        }
    }

    #[test]
    fn malformed_answers_are_errors() {
        let cases: &[&[u8]] = &[
            // Not HTTP.
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            // Bad chunk sizes.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n127.0.0.1:3022\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n;ext\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n",
            // A chunk longer than its size, or not ended by CRLF.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhellox",
            // Octets after the last chunk.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nmore",
            // Framing headers that cannot be trusted.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \xff\r\n\r\n",
            // A body longer than its Content-Length.
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n127.0.0.1:3022",
            b"HTTP/1.1 204 No Content\r\n\r\nbody",
        ];
        for &case in cases {
            let shown = String::from_utf8_lossy(case);
            for closed in [false, true] {
                assert!(
                    is_bad(parse_answer(case, closed)),
                    "{shown:?} closed={closed}"
                );
            }
        }
    }

    #[test]
    fn a_bad_chunk_size_is_refused_before_its_line_ends() {
        for part in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nz"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5x",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n;",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\ng",
        ] {
            assert!(is_bad(parse_answer(part, false)));
        }
        // What can still become a size line waits.
        for part in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5 ",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=\"a b",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r",
        ] {
            assert_eq!(parse_answer(part, false).unwrap(), None);
        }
    }

    #[test]
    fn size_is_bounded_head_and_body() {
        let big = |n: usize| vec![b'a'; n];
        // A head that never ends.
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend(big(MAX_ANSWER));
        assert!(is_oversize(parse_answer(&head, false)));
        // A Content-Length or chunk size beyond the bound is refused at once.
        assert!(is_oversize(parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 16385\r\n\r\n",
            false
        )));
        assert!(is_oversize(parse_answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
            false
        )));
        assert!(is_oversize(parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4001\r\n",
            false
        )));
        assert!(is_oversize(parse_answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff",
            false
        )));
        // Many small chunks, or a close-delimited body, past the bound.
        let mut chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        while chunks.len() <= MAX_ANSWER {
            chunks.extend_from_slice(b"1\r\na\r\n");
        }
        assert!(is_oversize(parse_answer(&chunks, false)));
        let mut close = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        close.extend(big(MAX_ANSWER));
        assert!(is_oversize(parse_answer(&close, false)));
        assert!(is_oversize(parse_answer(&close, true)));
        // Exactly at the bound is fine.
        let prefix = b"HTTP/1.1 200 OK\r\n\r\n";
        let mut exact = prefix.to_vec();
        exact.extend(big(MAX_ANSWER - prefix.len()));
        assert_eq!(
            whole(&exact).unwrap().unwrap().body.len(),
            MAX_ANSWER - prefix.len()
        );
        let head = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
        // Five digits either way, so the head's length does not change.
        let n = MAX_ANSWER - head(10_000).len();
        let mut exact = head(n).into_bytes();
        exact.extend(big(n));
        assert_eq!(exact.len(), MAX_ANSWER);
        assert_eq!(body_of(&exact).len(), n);
        assert!(is_oversize(parse_answer(head(n + 1).as_bytes(), false)));
    }

    /// No input panics: every truncation and every single-octet change of a few
    /// answers gives an answer, "more", or an error.
    #[test]
    fn no_panic_on_mangled_answers() {
        let seeds: [&[u8]; 3] = [
            NODE,
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n127.0.0.1:3022",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;a=b\r\nok\r\n0\r\nT: 1\r\n\r\n",
        ];
        for seed in seeds {
            for i in 0..seed.len() {
                for b in [0u8, b'\r', b'\n', b';', b' ', b'0', b'f', b'z', b':', 0xff] {
                    let mut m = seed.to_vec();
                    m[i] = b;
                    for k in [i, i + 1, m.len()] {
                        let _ = parse_answer(&m[..k], false);
                        let _ = parse_answer(&m[..k], true);
                    }
                }
            }
        }
    }

    /// `read_answer` stops at the end of a framed answer, whatever follows on
    /// the stream, and reads a close-delimited one to the end.
    #[test]
    fn reading_stops_where_the_framing_ends() {
        /// A stream that hands out its octets a few at a time, then fails.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::other("read past the end of the answer"));
                }
                let n = self.0.len().min(buf.len()).min(3);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let a = read_answer(&mut Trickle(NODE)).unwrap();
        assert_eq!(a.body, "127.0.0.1:3022");
        let a = read_answer(&mut Trickle(
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n127.0.0.1:3022",
        ))
        .unwrap();
        assert_eq!(a.body, "127.0.0.1:3022");
        let mut close: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n127.0.0.1:3022\n";
        assert_eq!(read_answer(&mut close).unwrap().body, "127.0.0.1:3022\n");
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n127.0.0.1:3022";
        assert!(matches!(read_answer(&mut cut), Err(Error::BadAnswer(_))));
        let mut endless = io::repeat(b'a');
        let mut r = b"HTTP/1.1 200 OK\r\n\r\n".chain(&mut endless);
        assert!(matches!(read_answer(&mut r), Err(Error::Limit(_))));
    }
}
