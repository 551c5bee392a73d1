//! The relay (PROTOCOL.md section 3): octets copied both ways between a mobile
//! client and a hidden server until both directions end.
//!
//! Invariants: nothing is added, dropped or reordered; an EOF in one direction
//! becomes `shutdown(Write)` of the other socket (a half-close), so the other
//! direction keeps flowing; an error in either direction shuts both sockets down
//! completely; the function returns only when both directions are done.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::thread;

/// Stack of the helper thread that copies the second direction: `io::copy` needs
/// its 8 KiB buffer and little else.
pub const COPY_STACK: usize = 64 * 1024;

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
pub fn run(mobile: TcpStream, hidden: TcpStream) -> (Moved, Option<io::Error>) {
    let (mobile2, hidden2) = match (mobile.try_clone(), hidden.try_clone()) {
        (Ok(m), Ok(h)) => (m, h),
        (Err(e), _) | (_, Err(e)) => {
            close_both(&mobile, &hidden);
            return (Moved::default(), Some(e));
        }
    };
    let down = thread::Builder::new()
        .name("relay-down".into())
        .stack_size(COPY_STACK)
        .spawn(move || one_way(hidden2, mobile2));
    let down = match down {
        Ok(handle) => handle,
        Err(e) => {
            close_both(&mobile, &hidden);
            return (Moved::default(), Some(e));
        }
    };
    let (up, up_err) = one_way(mobile, hidden);
    let (down, down_err) = down
        .join()
        .unwrap_or_else(|_| (0, Some(io::Error::other("relay thread panicked"))));
    (Moved { up, down }, up_err.or(down_err))
}

/// Copies `from` to `to`; at EOF half-closes `to`, on error closes both. Returns
/// the octets copied and the error, if any.
pub fn one_way(mut from: TcpStream, mut to: TcpStream) -> (u64, Option<io::Error>) {
    let mut counter = Counting {
        inner: &mut from,
        count: 0,
    };
    match io::copy(&mut counter, &mut to) {
        Ok(_) => {
            // The peer may already be gone; its own direction reports that.
            let _ = to.shutdown(Shutdown::Write);
            (counter.count, None)
        }
        Err(e) => {
            let n = counter.count;
            close_both(&from, &to);
            (n, Some(e))
        }
    }
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// A reader that counts what it reads (so a failed copy still reports octets).
struct Counting<'a> {
    inner: &'a mut TcpStream,
    count: u64,
}

impl io::Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
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
        let (mut mobile, mobile_relay) = connected();
        let (hidden_relay, mut hidden) = connected();
        let t = thread::spawn(move || run(mobile_relay, hidden_relay));
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
}
