//! HTTP/1.1 as taas speaks it, with httparse: a request head read under a deadline
//! and a size cap, an answer that always closes (the well-known port, the status
//! and admin listeners), and, for the agent, an upstream's answer read as far as
//! its framing says.
//!
//! Invariants: no read waits past the connection's deadline (the socket timeout is
//! set to the time left before each read, ureq 2's `DeadlineStream`); a head is
//! never more than `max_head` bytes nor more than `MAX_HEADERS` headers; a duplicate
//! `Host` or `Authorization` is refused; an upstream answer is never read past its
//! end nor held beyond `MAX_ANSWER` octets.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::{SMALL_STACK, listen, lock, spawn, wake};

/// Most header lines in a head (httparse's fixed array; real clients send < 20).
pub const MAX_HEADERS: usize = 32;
/// Bytes read per call while looking for the end of the head.
const READ_CHUNK: usize = 1024;
/// Time allowed to write an answer after the head was read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest upstream answer read (the agent's registration answer).
pub const MAX_ANSWER: usize = 16 * 1024;
/// What `Error::Limit` names when an answer exceeds `MAX_ANSWER`.
const ANSWER_LIMIT: &str = "registration answer size (MAX_ANSWER, 16 KiB)";

/// A listener on `addr` (`sys::listen`) and the address it got; `what` names it
/// in the error.
pub fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let err = |err| Error::Listen { what, addr, err };
    let listener = listen(addr).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// A listener whose connections are served one thread each, at most `max` at
/// once (more are closed unanswered, the first of a burst logged): the status
/// and admin listeners. Dropping it stops the accept loop and waits for it.
pub struct Serving {
    /// The bound address (woken to stop).
    addr: SocketAddr,
    /// Set to stop the accept loop.
    stop: Arc<AtomicBool>,
    /// The accept loop.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Serving {
    /// Serves `listener` (bound at `addr`): each connection in a thread `conn`
    /// (name, stack bytes) running `serve`.
    pub fn start<F>(
        listener: TcpListener,
        addr: SocketAddr,
        max: usize,
        conn: (&'static str, usize),
        serve: F,
    ) -> Result<Serving>
    where
        F: Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = spawn("listener", SMALL_STACK, move || {
            accept_each(&listener, &s, max, conn, serve)
        })
        .map_err(|e| Error::io("spawn thread", e))?;
        Ok(Serving {
            addr,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and returns once the accept loop has ended; requests
    /// being served finish within their deadlines.
    pub fn stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            wake(self.addr);
        }
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_each<F>(
    listener: &TcpListener,
    stop: &AtomicBool,
    max: usize,
    conn: (&str, usize),
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
{
    let busy = Arc::new(AtomicUsize::new(0));
    let mut full = false;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, peer)) = accepted else {
            // Out of descriptors, most likely: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= max {
            busy.fetch_sub(1, Ordering::SeqCst);
            if !std::mem::replace(&mut full, true) {
                log::warn!(
                    "{}: {max} connections open: closed {peer} (and any more until one ends)",
                    conn.0
                );
            }
            continue;
        }
        full = false;
        let (b, serve) = (busy.clone(), serve.clone());
        let spawned = spawn(conn.0, conn.1, move || {
            serve(stream, peer);
            b.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The closure was dropped unrun.
            busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A TCP stream whose every read and write must finish before `deadline`.
pub struct DeadlineStream {
    /// The socket.
    pub inner: TcpStream,
    /// When the current phase must be over.
    pub deadline: Instant,
}

impl DeadlineStream {
    fn left(&self) -> io::Result<std::time::Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }
}

/// Reports a timeout as `TimedOut` whatever the platform said (`WouldBlock`).
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
    } else {
        e
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.set_read_timeout(Some(self.left()?))?;
        self.inner.read(buf).map_err(timed_out)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.set_write_timeout(Some(self.left()?))?;
        self.inner.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the relay needs of a request head.
#[derive(Debug, Default)]
pub struct Head {
    /// The method, as sent.
    pub method: String,
    /// The request target (path and query), as sent.
    pub target: String,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// The `Authorization` header, if any (holds a token: never logged).
    pub authorization: Option<String>,
    /// Every other header field: name in lower case, value trimmed (octets that
    /// are not UTF-8 replaced).
    pub fields: Vec<(String, String)>,
    /// Octets read after the head (the start of a body), by `read_head`.
    pub rest: Vec<u8>,
}

impl Head {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The value of the other header field `name` (lower case), if sent (the
    /// first, if sent more than once).
    pub fn field(&self, name: &str) -> Option<&str> {
        let mut named = self.fields.iter().filter(|(n, _)| n == name);
        named.next().map(|(_, v)| v.as_str())
    }
}

/// Reads one request head of at most `max_head` bytes from `r`.
pub fn read_head(r: &mut impl Read, max_head: usize) -> Result<Head> {
    let mut buf = Vec::with_capacity(READ_CHUNK.min(max_head));
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        let room = (max_head - buf.len()).min(READ_CHUNK);
        if room == 0 {
            return Err(Error::HeadTooLarge(max_head));
        }
        let n = r
            .read(&mut chunk[..room])
            .map_err(|e| Error::io("head", e))?;
        if n == 0 {
            return Err(Error::ClosedEarly);
        }
        buf.extend_from_slice(&chunk[..n]);
        // httparse says whether the head is complete (CRLF or bare LF line ends),
        // still partial, or already wrong: garbage is answered at once, not left
        // to run out the deadline.
        if let Some((mut head, len)) = parse(&buf)? {
            head.rest = buf.split_off(len);
            return Ok(head);
        }
    }
}

/// Parses a head with httparse: `None` while it is incomplete.
pub fn parse_head(bytes: &[u8]) -> Result<Option<Head>> {
    Ok(parse(bytes)?.map(|(head, _)| head))
}

/// `parse_head`, with the head's length in octets.
fn parse(bytes: &[u8]) -> Result<Option<(Head, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        // httparse skips blank lines before the request line; a head made of
        // nothing else would wait for the deadline, so it is refused at once.
        Ok(httparse::Status::Partial) if only_blank_lines(bytes) => {
            return Err(Error::BadRequest("empty request line".into()));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge(bytes.len())),
        Err(e) => return Err(Error::BadRequest(format!("not HTTP/1.x: {e}"))),
    };
    let mut head = Head {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        ..Head::default()
    };
    for h in req.headers.iter() {
        let slot = if h.name.eq_ignore_ascii_case("host") {
            &mut head.host
        } else if h.name.eq_ignore_ascii_case("authorization") {
            &mut head.authorization
        } else {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            head.fields.push((h.name.to_ascii_lowercase(), value));
            continue;
        };
        if slot.is_some() {
            return Err(Error::BadRequest(format!(
                "more than one {} header",
                h.name
            )));
        }
        let value = std::str::from_utf8(h.value)
            .map_err(|_| Error::BadRequest(format!("{} header is not text", h.name)))?;
        *slot = Some(value.trim().to_string());
    }
    Ok(Some((head, len)))
}

/// True when `bytes` hold two or more line ends and nothing else.
fn only_blank_lines(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| matches!(b, b'\r' | b'\n'))
        && bytes.iter().filter(|&&b| b == b'\n').count() >= 2
}

/// An answer: status, extra headers, body. Every answer closes the connection.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers besides `Connection`, `Content-Length` and `Content-Type`.
    pub headers: Vec<(&'static str, String)>,
    /// `Content-Type` of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// What the log line says after the status (e.g. "plug 20417"); not sent.
    pub note: String,
}

impl Response {
    /// A `text/plain` answer.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut body = body.into().into_bytes();
        if !body.is_empty() {
            body.push(b'\n');
        }
        Response {
            status,
            headers: Vec::new(),
            content_type: "text/plain",
            body,
            note: String::new(),
        }
    }

    /// An answer with `body` of `content_type`, as given.
    pub fn with_body(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            content_type,
            body,
            ..Response::text(status, "")
        }
    }

    /// The answer for an error, with the headers docs/PROTOCOL.md asks of its status.
    /// 5xx bodies give the reason phrase only: internals stay in the log.
    pub fn from_error(e: &Error) -> Response {
        let status = e.status();
        let body = if status >= 500 {
            reason(status).to_string()
        } else {
            e.to_string()
        };
        let mut r = Response::text(status, body);
        match e {
            Error::AuthMissing | Error::AuthFailed => {
                r.headers
                    .push(("WWW-Authenticate", "TOTP realm=\"taas\"".into()));
            }
            Error::MethodNotAllowed(allow) => r.headers.push(("Allow", (*allow).into())),
            Error::Redirect(to) => r.headers.push(("Location", to.clone())),
            _ => {}
        }
        if let Some(secs) = e.retry_after() {
            r.headers.push(("Retry-After", secs.to_string()));
        }
        r.note = e.to_string();
        r
    }

    /// Writes the answer (HTTP/1.1, `Connection: close`).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        if !self.body.is_empty() {
            out.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        w.write_all(&bytes)?;
        w.flush()
    }
}

/// Every status taas answers with, and its reason phrase (RFC 9110 section 15).
pub const STATUSES: [(u16, &str); 15] = [
    (200, "OK"),
    (307, "Temporary Redirect"),
    (400, "Bad Request"),
    (401, "Unauthorized"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (408, "Request Timeout"),
    (409, "Conflict"),
    (421, "Misdirected Request"),
    (429, "Too Many Requests"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (502, "Bad Gateway"),
    (503, "Service Unavailable"),
];

/// The reason phrase of a status; any other is answered as a 500's.
pub fn reason(status: u16) -> &'static str {
    STATUSES
        .iter()
        .find(|(s, _)| *s == status)
        .map_or("Internal Server Error", |(_, r)| r)
}

/// Reads one answer: stops as soon as `parse_answer` finds it complete (never
/// waits for the close when `Content-Length` or the last chunk ends it), and
/// never holds more than `MAX_ANSWER + 1` bytes.
pub fn read_answer(r: &mut impl Read) -> Result<Answer> {
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

/// Header names and values.
pub type Headers = Vec<(String, String)>;

/// A whole answer.
#[derive(Debug, PartialEq)]
pub struct Answer {
    /// Its status (of the final answer, after any 1xx).
    pub status: u16,
    /// Its header fields (trailers are dropped).
    pub headers: Headers,
    /// Its body, decoded from its framing.
    pub body: String,
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
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_registration_head() {
        let h = parse_head(
            b"PUT /register/demo?x=1 HTTP/1.1\r\nHost: Registrar.Localhost:8443\r\nAuthorization: TOTP username=a, response=1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path(), "/register/demo");
        assert_eq!(h.host.as_deref(), Some("Registrar.Localhost:8443"));
        assert!(h.authorization.is_some());
    }

    #[test]
    fn refuses_duplicates_garbage_and_too_many_headers() {
        let dup = b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n";
        assert!(matches!(parse_head(dup), Err(Error::BadRequest(_))));
        let dup = b"GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n";
        assert!(matches!(parse_head(dup), Err(Error::BadRequest(_))));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(Error::BadRequest(_))
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse_head(&many), Err(Error::HeadTooLarge(_))));
    }

    #[test]
    fn head_size_cap_and_early_eof() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 10_000));
        assert!(matches!(
            read_head(&mut &big[..], 8192),
            Err(Error::HeadTooLarge(8192))
        ));
        let mut short: &[u8] = b"GET / HTTP/1.1\r\n";
        assert!(matches!(
            read_head(&mut short, 8192),
            Err(Error::ClosedEarly)
        ));
        // An end split across reads is found.
        struct Drip<'a>(&'a [u8]);
        impl Read for Drip<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let h = read_head(&mut Drip(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"), 8192).unwrap();
        assert_eq!(h.target, "/x");
        // Other fields are kept; octets past the head are handed back.
        let mut posted: &[u8] = b"POST /a HTTP/1.1\r\nX-Taas-Token:  t \r\n\r\n{\"a\":1}";
        let h = read_head(&mut posted, 8192).unwrap();
        assert_eq!(h.field("x-taas-token"), Some("t"));
        assert_eq!(h.rest, b"{\"a\":1}");
    }

    #[test]
    fn a_redirect_keeps_its_query_in_the_location_not_in_the_note() {
        let e = Error::Redirect("https://r.example/register/cam?code=secret".into());
        let r = Response::from_error(&e);
        assert!(!r.note.contains("secret"), "{}", r.note);
        let location = r.headers.iter().find(|(k, _)| *k == "Location");
        assert_eq!(
            location.map(|(_, v)| v.as_str()),
            Some("https://r.example/register/cam?code=secret")
        );
    }

    #[test]
    fn error_answers_carry_protocol_headers() {
        let r = Response::from_error(&Error::AuthFailed);
        assert_eq!(r.status, 401);
        assert!(
            r.headers
                .iter()
                .any(|(n, v)| *n == "WWW-Authenticate" && v.contains("TOTP"))
        );
        let r = Response::from_error(&Error::MethodNotAllowed("PUT"));
        assert!(r.headers.contains(&("Allow", "PUT".into())));
        let r = Response::from_error(&Error::StoreUnavailable("redis 10.0.0.1:6379".into()));
        assert_eq!(r.status, 503);
        assert!(!String::from_utf8_lossy(&r.body).contains("10.0.0.1"));
        assert!(r.headers.iter().any(|(n, _)| *n == "Retry-After"));
        let mut out = Vec::new();
        Response::text(200, "127.0.0.1:20000")
            .write_to(&mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 16\r\n"));
        assert!(text.ends_with("\r\n\r\n127.0.0.1:20000\n"));
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
