//! The one request and one answer on the well-known port: a request head read under
//! a deadline and a size cap, parsed with httparse; an answer that always closes.
//!
//! Invariants: no read waits past the connection's deadline (the socket timeout is
//! set to the time left before each read, ureq 2's `DeadlineStream`); a head is
//! never more than `max_head` bytes nor more than `MAX_HEADERS` headers; a duplicate
//! `Host` or `Authorization` is refused.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::error::{Error, Result};

/// Most header lines in a head (httparse's fixed array; real clients send < 20).
pub const MAX_HEADERS: usize = 32;
/// Bytes read per call while looking for the end of the head.
const READ_CHUNK: usize = 1024;

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
}

impl Head {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
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
            return Err(Error::BadRequest(
                "connection closed before the end of the head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        // httparse says whether the head is complete (CRLF or bare LF line ends),
        // still partial, or already wrong: garbage is answered at once, not left
        // to run out the deadline.
        if let Some(head) = parse_head(&buf)? {
            return Ok(head);
        }
    }
}

/// Parses a head with httparse: `None` while it is incomplete.
pub fn parse_head(bytes: &[u8]) -> Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        // httparse skips blank lines before the request line; a head made of
        // nothing else would wait for the deadline, so it is refused at once.
        Ok(httparse::Status::Partial) if only_blank_lines(bytes) => {
            return Err(Error::BadRequest("empty request line".into()));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge(bytes.len())),
        Err(e) => return Err(Error::BadRequest(format!("not HTTP/1.x: {e}"))),
    }
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
    Ok(Some(head))
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

    /// The answer for an error, with the headers PROTOCOL.md asks of its status.
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

/// The reason phrase of a status (RFC 9110 section 15).
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        421 => "Misdirected Request",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
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
            Err(Error::BadRequest(_))
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
}
