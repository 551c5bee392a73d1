//! TLS ends here (`taas expose --tls`): the hidden side's half of "TLS end to
//! end". Each relayed connection is a TLS server session with the label's
//! certificate; its plaintext goes to the local service over loopback, so a
//! plain-HTTP app is reached over HTTPS and the relay carries only ciphertext.
//!
//! Invariants:
//! - the handshake runs in the connection's own thread (never a slot's), under
//!   `HANDSHAKE_TIMEOUT`; the local service is connected only once it is done, so
//!   a stalled or garbage client costs one thread for at most that long and no
//!   local connection;
//! - one thread owns the rustls session and moves both directions with one
//!   poll(2) over the relayed and the local socket, as `relay::run` does for a
//!   raw pair: a rustls session is never shared by two blocking threads;
//! - half-close both ways: the mobile's close_notify (or its TCP EOF) becomes
//!   `shutdown(Write)` of the local socket; the local EOF becomes close_notify,
//!   then `shutdown(Write)` of the relayed socket once it is sent;
//! - back-pressure: at most `PLAIN_BUF` octets of plaintext wait for the local
//!   service and one `PLAIN_BUF` of records for the mobile; a side is read only
//!   when the other has room;
//! - a pipe with no octet either way for `IDLE_TIMEOUT` is closed;
//! - SIGHUP swaps the certificate (`LabelCert::reload`) for new connections; a
//!   file that does not load keeps the old one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use crate::error::{Error, Result};
use crate::http::DeadlineStream;
use crate::relay::Moved;

/// Deadline of the TLS handshake with a mobile client (the relay's own
/// `head_timeout` default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pipe with no octet either way this long is closed (the relay's
/// `idle_timeout` default, for relays that turned theirs off).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Plaintext read at once from either side: one TLS record's worth (RFC 8446
/// section 5.1, 2^14 octets).
pub const PLAIN_BUF: usize = 16 * 1024;
/// Stack of a TLS pipe thread: a server handshake (ring signs) and the loop;
/// the relay's connection threads do the same in `sys::CONN_STACK`.
pub const TLS_STACK: usize = crate::sys::CONN_STACK;

/// The certificate and key served to mobile clients, re-read on SIGHUP.
pub use crate::tls::ServerCert as LabelCert;

/// The TLS handshake on `relayed`, under `HANDSHAKE_TIMEOUT`; on failure the
/// alert, if any, has been sent and the caller drops the socket.
pub fn handshake(
    relayed: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Result<(ServerConnection, TcpStream)> {
    let io = DeadlineStream {
        inner: relayed,
        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    let rustls::StreamOwned { conn, sock } = crate::tls::accept(&config, io)?;
    let relayed = sock.inner;
    relayed
        .set_read_timeout(None)
        .and_then(|()| relayed.set_write_timeout(None))
        .map_err(|e| Error::io("handshake", e))?;
    Ok((conn, relayed))
}

/// Moves plaintext between the TLS session on `relayed` and `local` until
/// both directions end (or `IDLE_TIMEOUT` of quiet); returns the plaintext
/// octets moved and the first error met. On an error both sockets are shut
/// down.
pub fn pipe(
    conn: ServerConnection,
    relayed: &TcpStream,
    local: &TcpStream,
) -> (Moved, Option<io::Error>) {
    pipe_until_idle(conn, relayed, local, IDLE_TIMEOUT)
}

/// `pipe`, closed after `idle` with no octet either way.
fn pipe_until_idle(
    conn: ServerConnection,
    relayed: &TcpStream,
    local: &TcpStream,
    idle: Duration,
) -> (Moved, Option<io::Error>) {
    let mut p = Pipe {
        conn,
        relayed,
        local,
        up: vec![0; PLAIN_BUF].into_boxed_slice(),
        up_at: 0,
        up_end: 0,
        down: vec![0; PLAIN_BUF].into_boxed_slice(),
        mobile_eof: false,
        up_done: false,
        local_eof: false,
        down_done: false,
        moved: Moved::default(),
        idle,
    };
    let error = relayed
        .set_nonblocking(true)
        .and_then(|()| local.set_nonblocking(true))
        .and_then(|()| p.run())
        .err();
    if error.is_some() {
        // A last try at sending what rustls queued (an alert), then the end.
        let _ = p.conn.write_tls(&mut &*relayed);
        let _ = relayed.shutdown(Shutdown::Both);
        let _ = local.shutdown(Shutdown::Both);
    }
    (p.moved, error)
}

/// One TLS pipe's state, driven by `pipe`.
struct Pipe<'a> {
    /// The TLS session with the mobile client.
    conn: ServerConnection,
    /// The relayed socket (TLS records).
    relayed: &'a TcpStream,
    /// The local service (plaintext).
    local: &'a TcpStream,
    /// Plaintext from the mobile not yet written to the local service:
    /// `up[up_at..up_end]`.
    up: Box<[u8]>,
    /// Where the unwritten plaintext starts.
    up_at: usize,
    /// Where it ends.
    up_end: usize,
    /// Buffer for a read from the local service (handed to rustls at once).
    down: Box<[u8]>,
    /// The relayed socket gave its TCP EOF.
    mobile_eof: bool,
    /// The mobile's end (close_notify or EOF) was passed on as
    /// `shutdown(Write)` of the local socket.
    up_done: bool,
    /// The local service gave its EOF: close_notify is queued.
    local_eof: bool,
    /// close_notify went out and the relayed socket was shut for writing.
    down_done: bool,
    /// Plaintext octets moved each way.
    moved: Moved,
    /// Quiet this long closes the pipe.
    idle: Duration,
}

impl Pipe<'_> {
    fn run(&mut self) -> io::Result<()> {
        let mut idle_until = Instant::now() + self.idle;
        while !(self.up_done && self.down_done) {
            let mut moved = false;
            while self.step()? {
                moved = true;
            }
            if moved {
                idle_until = Instant::now() + self.idle;
            }
            if self.up_done && self.down_done {
                break;
            }
            self.wait(idle_until)?;
        }
        Ok(())
    }

    /// Does what can be done without blocking, once each way; true when
    /// anything moved or changed state.
    fn step(&mut self) -> io::Result<bool> {
        let mut progress = false;
        // TLS records in, while rustls has room and the mobile may still send.
        if !self.up_done && !self.mobile_eof && self.conn.wants_read() {
            match self.conn.read_tls(&mut &*self.relayed) {
                Ok(0) => {
                    self.mobile_eof = true;
                    progress = true;
                }
                Ok(_) => {
                    progress = true;
                    self.conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Err(e) if later(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // Plaintext to the local service; its end passed on once all is written.
        if !self.up_done {
            if self.up_at == self.up_end {
                match self.conn.reader().read(&mut self.up) {
                    // close_notify.
                    Ok(0) => self.end_up(),
                    Ok(n) => (self.up_at, self.up_end) = (0, n),
                    // A TCP EOF without close_notify: an end all the same (many
                    // clients close so); the local service sees a half-close.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.end_up(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.mobile_eof => {
                        self.end_up()
                    }
                    Err(e) if later(&e) => {}
                    Err(e) => return Err(e),
                }
                progress |= self.up_done || self.up_end > 0;
            }
            if self.up_at < self.up_end {
                match (&mut &*self.local).write(&self.up[self.up_at..self.up_end]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.up_at += n;
                        self.moved.up += n as u64;
                        if self.up_at == self.up_end {
                            (self.up_at, self.up_end) = (0, 0);
                        }
                        progress = true;
                    }
                    Err(e) if later(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Local octets into TLS records, only once the last ones went out.
        if !self.local_eof && !self.conn.wants_write() {
            match (&mut &*self.local).read(&mut self.down) {
                Ok(0) => {
                    self.local_eof = true;
                    self.conn.send_close_notify();
                    progress = true;
                }
                Ok(n) => {
                    self.conn.writer().write_all(&self.down[..n])?;
                    self.moved.down += n as u64;
                    progress = true;
                }
                Err(e) if later(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // TLS records out.
        if !self.down_done && self.conn.wants_write() {
            match self.conn.write_tls(&mut &*self.relayed) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => progress = true,
                Err(e) if later(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // close_notify is out: half-close toward the mobile.
        if self.local_eof && !self.down_done && !self.conn.wants_write() {
            // The peer may be gone already; its direction says so.
            let _ = self.relayed.shutdown(Shutdown::Write);
            self.down_done = true;
            progress = true;
        }
        Ok(progress)
    }

    /// The mobile's end reached the local service.
    fn end_up(&mut self) {
        let _ = self.local.shutdown(Shutdown::Write);
        self.up_done = true;
    }

    /// Blocks in poll(2) until a socket can do what the pipe waits for, or
    /// fails with `TimedOut` once `idle_until` passes.
    fn wait(&self, idle_until: Instant) -> io::Result<()> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut r = PollFlags::empty();
        let mut l = PollFlags::empty();
        if !self.up_done && !self.mobile_eof && self.conn.wants_read() {
            r |= PollFlags::POLLIN;
        }
        if !self.down_done && self.conn.wants_write() {
            r |= PollFlags::POLLOUT;
        }
        if !self.local_eof && !self.conn.wants_write() {
            l |= PollFlags::POLLIN;
        }
        if self.up_at < self.up_end {
            l |= PollFlags::POLLOUT;
        }
        let left = idle_until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle: no octet either way",
            ));
        }
        // A socket nothing waits on is left out: its hang-up alone must not wake
        // the loop (a direction not done always waits on one of them).
        let mut set = [
            PollFd::new(self.relayed.as_fd(), r),
            PollFd::new(self.local.as_fd(), l),
        ];
        let fds = match (r.is_empty(), l.is_empty()) {
            (false, false) => &mut set[..],
            (false, true) => &mut set[..1],
            (true, false) => &mut set[1..],
            (true, true) => return Err(io::Error::other("TLS pipe waits on nothing")),
        };
        // Rounded up: a poll woken a little early only loops once more.
        let timeout =
            PollTimeout::try_from(left + Duration::from_millis(1)).unwrap_or(PollTimeout::MAX);
        match poll(fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Would block, or was interrupted: poll, then try again.
fn later(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    /// A quiet pipe is closed after its idle limit: both sockets end, and
    /// what moved before is counted.
    #[test]
    fn an_idle_pipe_is_closed() {
        let (cert, key) = crate::cert::generate(vec!["t.example".into()]).unwrap();
        let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            certs,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
        let (mobile, relayed) = pair();
        let (local, mut app) = pair();
        let agent = std::thread::spawn(move || {
            let (conn, relayed) = handshake(relayed, Arc::new(server)).unwrap();
            let start = Instant::now();
            let (moved, err) = pipe_until_idle(conn, &relayed, &local, Duration::from_millis(300));
            (moved, err, start.elapsed())
        });
        let client = crate::tls::client_config(Some(&cert)).unwrap();
        let name = rustls::pki_types::ServerName::try_from("t.example").unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        mobile
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, mobile);
        tls.write_all(b"hi").unwrap();
        tls.flush().unwrap();
        app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 2];
        app.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let (moved, err, took) = agent.join().unwrap();
        assert_eq!(moved, Moved { up: 2, down: 0 });
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5));
        // Both ends see the close.
        assert_eq!(app.read(&mut got).unwrap_or(0), 0);
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
}
