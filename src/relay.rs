//! The relay (PROTOCOL.md section 3): octets copied both ways between a mobile
//! client and a hidden server until both directions end.
//!
//! Invariants: nothing is added, dropped or reordered; an EOF in one direction
//! becomes `shutdown(Write)` of the other socket (a half-close), so the other
//! direction keeps flowing; an error in either direction shuts both sockets down
//! completely; the function returns only when both directions are done.
//!
//! Two ways to copy, chosen by `Copier`: `splice(2)` through a pipe per direction
//! (Linux: the octets go socket → pipe → socket inside the kernel, never through
//! a user buffer; `make bench` shows the gain), and `std::io::copy` (an 8 KiB
//! stack buffer), used elsewhere and whenever the kernel refuses splice or a
//! pipe. Each pipe is emptied before the next splice into it, so no splice ever
//! blocks on a full pipe, and a refusal finds it empty: the copy goes on in user
//! space from where splice stopped. A direction makes its pipe at its first
//! octet and closes it after `PIPE_IDLE` of quiet, so an idle pair holds two
//! descriptors, a busy one six.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread;

/// Stack of the helper thread that copies the second direction: `io::copy` needs
/// its 8 KiB buffer and little else. Kept under a quarter of `CONN_STACK`: glibc
/// hands a new thread a cached stack up to four times the size asked, and a
/// stack that served a TLS handshake keeps its touched pages (20 KiB a pair).
pub const COPY_STACK: usize = 40 * 1024;

/// Bytes asked of one splice: the default pipe capacity (16 pages).
pub const SPLICE_CHUNK: usize = 64 * 1024;

/// A splice direction quiet this long closes its pipe (made again at the next
/// octet), so idle pairs hold no pipe.
pub const PIPE_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How octets are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copier {
    /// `splice(2)` through a pipe, falling back to `Copy` where refused.
    Splice,
    /// `std::io::copy`.
    Copy,
}

/// Octets moved, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Mobile client to hidden server.
    pub up: u64,
    /// Hidden server to mobile client.
    pub down: u64,
}

/// Copies `mobile` ⇄ `hidden` until both directions end; returns the octets moved.
/// The first error met, if any, is returned with the counts so far.
pub fn run(
    mobile: Arc<TcpStream>,
    hidden: Arc<TcpStream>,
    copier: Copier,
) -> (Moved, Option<io::Error>) {
    // Both threads use both sockets through `&TcpStream` (no dup'ed descriptors).
    let (m, h) = (mobile.clone(), hidden.clone());
    let down = thread::Builder::new()
        .name("relay-down".into())
        .stack_size(COPY_STACK)
        .spawn(move || one_way(&h, &m, copier));
    let down = match down {
        Ok(handle) => handle,
        Err(e) => {
            close_both(&mobile, &hidden);
            return (Moved::default(), Some(e));
        }
    };
    let (up, up_err) = one_way(&mobile, &hidden, copier);
    let (down, down_err) = down
        .join()
        .unwrap_or_else(|_| (0, Some(io::Error::other("relay thread panicked"))));
    (Moved { up, down }, up_err.or(down_err))
}

/// Copies `from` to `to`; at EOF half-closes `to`, on error closes both. Returns
/// the octets copied and the error, if any.
pub fn one_way(from: &TcpStream, to: &TcpStream, copier: Copier) -> (u64, Option<io::Error>) {
    let mut count = 0;
    let mut result = match copier {
        Copier::Splice => splice::copy(from, to, &mut count),
        Copier::Copy => Err(splice::Refused.into()),
    };
    if let Err(e) = &result
        && splice::Refused::is(e)
    {
        let (more, rest) = copy_in_user_space(from, to);
        count += more;
        result = rest;
    }
    match result {
        Ok(()) => {
            // The peer may already be gone; its own direction reports that.
            let _ = to.shutdown(Shutdown::Write);
            (count, None)
        }
        Err(e) => {
            close_both(from, to);
            (count, Some(e))
        }
    }
}

/// `io::copy` through its 8 KiB stack buffer. Kept out of line: a frame that
/// holds the buffer is probed page by page on entry, and the splice path, which
/// never needs it, would pay those pages of stack in every relay thread.
#[inline(never)]
fn copy_in_user_space(from: &TcpStream, to: &TcpStream) -> (u64, io::Result<()>) {
    let mut counter = Counting {
        inner: from,
        count: 0,
    };
    let result = io::copy(&mut counter, &mut &*to).map(|_| ());
    (counter.count, result)
}

/// The zero-copy path: safe wrappers of `pipe2(2)` and `splice(2)` from nix.
#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::net::TcpStream;

    use nix::errno::Errno;
    use nix::fcntl::{SpliceFFlags, splice};

    use std::time::Duration;

    use super::{PIPE_IDLE, SPLICE_CHUNK};

    /// The kernel will not splice here: copy through user space instead.
    #[derive(Debug)]
    pub struct Refused;

    impl Refused {
        /// Is `e` this refusal?
        pub fn is(e: &io::Error) -> bool {
            e.get_ref().is_some_and(|inner| inner.is::<RefusedError>())
        }
    }

    #[derive(Debug)]
    struct RefusedError;
    impl std::fmt::Display for RefusedError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("splice refused")
        }
    }
    impl std::error::Error for RefusedError {}

    impl From<Refused> for io::Error {
        fn from(_: Refused) -> io::Error {
            io::Error::other(RefusedError)
        }
    }

    /// Moves everything from `from` to `to` until EOF, counting into `count`.
    /// A refusal (`Refused`) always leaves the pipe empty, so the caller may go
    /// on in user space from where this stopped.
    pub fn copy(from: &TcpStream, to: &TcpStream, count: &mut u64) -> io::Result<()> {
        // The pipe is made at the direction's first octet and given back after
        // `PIPE_IDLE` of quiet: an idle pair holds its two sockets and no pipe.
        let mut pipe = None;
        let mut last = 0;
        loop {
            // A short read emptied the socket: wait here, where the wait can end.
            if last < SPLICE_CHUNK && pipe.is_some() && !wait_readable(from, Some(PIPE_IDLE))? {
                pipe = None;
            }
            let (pipe_r, pipe_w) = match &pipe {
                Some(p) => p,
                None => {
                    wait_readable(from, None)?;
                    let fresh = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(|_| io::Error::from(Refused))?;
                    pipe.insert(fresh)
                }
            };
            let n = match splice(
                from,
                None,
                pipe_w,
                None,
                SPLICE_CHUNK,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EINVAL | Errno::ENOSYS) => return Err(Refused.into()),
                Err(e) => return Err(e.into()),
            };
            let mut left = n;
            while left > 0 {
                match splice(pipe_r, None, to, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(m) => left -= m,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            *count += n as u64;
            last = n;
        }
    }

    /// Waits until `from` has an octet, an EOF or an error to report (true), or
    /// until `limit` passes (false).
    fn wait_readable(from: &TcpStream, limit: Option<Duration>) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let timeout = match limit {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Elsewhere than Linux, splice is always refused: `io::copy` it is.
#[cfg(not(target_os = "linux"))]
mod splice {
    use std::io;
    use std::net::TcpStream;

    /// The kernel will not splice here.
    #[derive(Debug)]
    pub struct Refused;
    impl Refused {
        pub fn is(e: &io::Error) -> bool {
            e.kind() == io::ErrorKind::Unsupported
        }
    }
    impl From<Refused> for io::Error {
        fn from(_: Refused) -> io::Error {
            io::ErrorKind::Unsupported.into()
        }
    }
    pub fn copy(_: &TcpStream, _: &TcpStream, _: &mut u64) -> io::Result<()> {
        Err(Refused.into())
    }
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// A reader that counts what it reads (so a failed copy still reports octets).
struct Counting<'a> {
    inner: &'a TcpStream,
    count: u64,
}

impl io::Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (&mut &*self.inner).read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn connected() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    #[test]
    fn half_close_each_way_keeps_the_other_flowing() {
        for copier in [Copier::Splice, Copier::Copy] {
            half_close(copier);
        }
    }

    fn half_close(copier: Copier) {
        let (mut mobile, mobile_relay) = connected();
        let (hidden_relay, mut hidden) = connected();
        let t = thread::spawn(move || run(Arc::new(mobile_relay), Arc::new(hidden_relay), copier));
        mobile.write_all(b"request").unwrap();
        mobile.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        hidden.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"request", "EOF passed on after the data");
        hidden.write_all(b"answer after half-close").unwrap();
        hidden.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        mobile.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"answer after half-close");
        let (moved, err) = t.join().unwrap();
        assert!(err.is_none());
        assert_eq!(moved, Moved { up: 7, down: 23 });
    }

    /// On Linux the splice path itself moves the octets (no silent fallback).
    #[cfg(target_os = "linux")]
    #[test]
    fn splice_is_used_on_linux() {
        let (mut a, a_relay) = connected();
        let (b_relay, mut b) = connected();
        a.write_all(b"zero copy").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut n = 0;
        splice::copy(&a_relay, &b_relay, &mut n).unwrap();
        assert_eq!(n, 9);
        drop(b_relay);
        let mut got = [0u8; 9];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"zero copy");
    }

    /// Several MiB each way at once, checksummed, through both copiers.
    #[test]
    fn both_copiers_move_mebibytes_exactly() {
        const N: usize = 8 << 20;
        let data: Vec<u8> = (0..N).map(|i| (i * 7 + i / 4099) as u8).collect();
        let data = std::sync::Arc::new(data);
        for copier in [Copier::Splice, Copier::Copy] {
            let (mobile, mobile_relay) = connected();
            let (hidden_relay, hidden) = connected();
            let t =
                thread::spawn(move || run(Arc::new(mobile_relay), Arc::new(hidden_relay), copier));
            let mut readers = Vec::new();
            for (mut w, mut r) in [
                (mobile.try_clone().unwrap(), hidden.try_clone().unwrap()),
                (hidden.try_clone().unwrap(), mobile.try_clone().unwrap()),
            ] {
                let d = data.clone();
                thread::spawn(move || {
                    w.write_all(&d).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                readers.push(thread::spawn(move || {
                    let mut got = Vec::with_capacity(N);
                    r.read_to_end(&mut got).unwrap();
                    got
                }));
            }
            for r in readers {
                assert!(r.join().unwrap() == *data, "{copier:?}: bytes differ");
            }
            let (moved, err) = t.join().unwrap();
            assert!(err.is_none(), "{copier:?}: {err:?}");
            assert_eq!(
                moved,
                Moved {
                    up: N as u64,
                    down: N as u64
                }
            );
        }
    }
}
