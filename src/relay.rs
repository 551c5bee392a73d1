//! The relay (docs/PROTOCOL.md section 3): octets copied both ways between a mobile
//! client and a hidden server until both directions end.
//!
//! Invariants: nothing is added, dropped or reordered; an EOF in one direction
//! becomes `shutdown(Write)` of the other socket (a half-close), so the other
//! direction keeps flowing; an error in either direction shuts both sockets down
//! completely; the functions return only when their directions are done.
//!
//! Two ways to copy, chosen by `Copier`: `splice(2)` through a pipe per direction
//! (Linux: the octets go socket → pipe → socket inside the kernel, never through
//! a user buffer; `make bench` shows the gain), and a read/write loop on an
//! 8 KiB buffer, used elsewhere and whenever the kernel refuses splice or a
//! pipe. Each pipe is emptied before the next splice into it, so a refusal finds
//! it empty and the copy goes on in user space from where splice stopped.
//!
//! Two drivers: `run`, for a relayed pair, moves both directions in the calling
//! thread with non-blocking sockets and one poll(2) (one thread a pair: 10 KiB
//! of memory for an idle pair, where a thread per direction cost 19.5); a
//! direction makes its pipe at its first octet and gives it back after
//! `PIPE_IDLE` of quiet, so an idle pair holds its two sockets only: the one
//! splice path (`run_with` is the same loop, moving the octets known to be
//! waiting in its first turn and running a hook once, early: the rendezvous
//! starts its next accepting thread there, the agent hands its slot over).
//! `one_way` copies one direction with a blocking `io::copy`, for the agent's
//! `--eager`, whose sockets other threads also use (so they must stay
//! blocking).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of a direction's user-space buffer, where splice is not used.
pub const COPY_BUF: usize = 8 * 1024;

/// Chunks a direction may move before the other gets its turn.
const TURN: usize = 16;

/// The default pipe capacity (16 pages): what a relay pipe holds where it cannot
/// be grown to `PIPE_SIZE`.
pub const SPLICE_CHUNK: usize = 64 * 1024;

/// Capacity asked for a relay pipe (F_SETPIPE_SZ): four times the default, so a
/// GB takes a quarter of the splices (`make bench`: about 20% less CPU per GB).
/// Its pages exist only while octets wait in it, but the kernel counts the
/// capacity against `fs.pipe-user-pages-soft` (64 MiB) for a user without
/// CAP_SYS_RESOURCE: past it (about 128 pairs busy both ways at once), new
/// pipes are refused the growth and keep the size the kernel gave them.
pub const PIPE_SIZE: usize = 256 * 1024;

/// A splice direction quiet this long closes its pipe (made again at the next
/// octet), so idle pairs hold no pipe.
pub const PIPE_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// How octets are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copier {
    /// `splice(2)` through a pipe, falling back to `Copy` where refused.
    Splice,
    /// Through user space: `run`'s read/write loop.
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

/// Copies `mobile` ⇄ `hidden` until both directions end, in the calling thread;
/// returns the octets moved, and the first error met, if any.
///
/// Both sockets are made non-blocking and watched with one poll(2): a direction
/// reads when its source is readable and it holds nothing, and writes when its
/// destination is writable and it holds something. One thread a pair, blocked
/// in poll while the pair is idle.
pub fn run(
    mobile: Arc<TcpStream>,
    hidden: Arc<TcpStream>,
    copier: Copier,
) -> (Moved, Option<io::Error>) {
    run_until_idle(mobile, hidden, copier, None)
}

/// `run`, but a pair where no octet has moved either way for `idle` is closed
/// (a `TimedOut` error), half-closed or not: a quiet pair must not hold its
/// slot, its sockets and the hidden side's thread for ever.
pub fn run_until_idle(
    mobile: Arc<TcpStream>,
    hidden: Arc<TcpStream>,
    copier: Copier,
    idle: Option<Duration>,
) -> (Moved, Option<io::Error>) {
    let none = Hook {
        toward: Toward::Mobile,
        by: Instant::now(),
        after: Duration::ZERO,
        call: || Ok(()),
    };
    run_with(mobile, hidden, copier, idle, Ready::default(), none)
}

/// Sides whose octets are known to be waiting when a pair starts: its first
/// turn moves them at once, before any poll.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ready {
    /// The mobile client's.
    pub mobile: bool,
    /// The hidden server's.
    pub hidden: bool,
}

/// Which way's first octets a `Hook` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toward {
    /// Written to the hidden side.
    Hidden,
    /// Written to the mobile side.
    Mobile,
}

/// Work to do once, early in a pair's life, without holding up its first
/// octets: `call` runs `after` the first turn that writes octets `toward` a
/// side (or once `by` has passed), at the first turn from then on, or at the
/// end. An error from it closes the pair and is returned.
pub struct Hook<F: FnOnce() -> io::Result<()>> {
    /// Whose first octets to wait for.
    pub toward: Toward,
    /// The latest time to take them as seen.
    pub by: Instant,
    /// How long to wait once they are seen.
    pub after: Duration,
    /// The work.
    pub call: F,
}

/// `run_until_idle`, starting with the octets `ready` says are there and
/// calling `hook` once (the rendezvous starts its port's next accepting thread
/// after the mobile's first octets have been passed on; the agent hands its
/// slot over once the local service's first answer is on its way back, so
/// that registering again, a TLS handshake, does not compete with it).
pub fn run_with(
    mobile: Arc<TcpStream>,
    hidden: Arc<TcpStream>,
    copier: Copier,
    idle: Option<Duration>,
    ready: Ready,
    hook: Hook<impl FnOnce() -> io::Result<()>>,
) -> (Moved, Option<io::Error>) {
    let Hook {
        toward,
        by,
        after,
        call,
    } = hook;
    let mut hook = Some(call);
    // When the hook is due, once its octets were seen.
    let mut due: Option<Instant> = None;
    let (mobile, hidden) = (&*mobile, &*hidden);
    let mut up = Way::new(copier);
    let mut down = Way::new(copier);
    up.ready = ready.mobile;
    down.ready = ready.hidden;
    let mut error = mobile
        .set_nonblocking(true)
        .and_then(|()| hidden.set_nonblocking(true))
        .err();
    let mut idle_until = idle.map(|d| Instant::now() + d);
    let mut moved_so_far = 0u64;
    while error.is_none() && !(up.done && down.done) {
        error = up
            .advance(mobile, hidden)
            .and_then(|()| down.advance(hidden, mobile))
            .err();
        let written = match toward {
            Toward::Hidden => up.count,
            Toward::Mobile => down.count,
        };
        if error.is_none() && hook.is_some() {
            let now = Instant::now();
            if due.is_none() && (written > 0 || now >= by) {
                due = Some(now + after);
            }
            if due.is_some_and(|at| now >= at)
                && let Some(call) = hook.take()
            {
                error = call().err();
            }
        }
        // Octets read count as moving as soon as they are held.
        let now_moved = up.count + down.count + (up.pending + down.pending) as u64;
        if now_moved != moved_so_far {
            moved_so_far = now_moved;
            idle_until = idle.map(|d| Instant::now() + d);
        }
        if error.is_none() {
            let wake_at = hook.as_ref().map(|_| due.unwrap_or(by));
            error = wait(mobile, hidden, &mut up, &mut down, idle_until, wake_at).err();
        }
    }
    if let Some(call) = hook.take()
        && let Err(e) = call()
    {
        error.get_or_insert(e);
    }
    if error.is_some() {
        close_both(mobile, hidden);
    }
    let moved = Moved {
        up: up.count,
        down: down.count,
    };
    (moved, error)
}

/// The error of a pair closed by its idle deadline. Told apart by its type
/// from a peer that keepalive found dead, which is `TimedOut` too.
#[derive(Debug)]
pub struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("idle_timeout: no octet either way")
    }
}

impl std::error::Error for IdleTimeout {}

/// Did `run_until_idle` end the pair for being idle?
pub fn is_idle_timeout(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<IdleTimeout>())
}

/// Waits until a direction can move, or for `PIPE_IDLE` when a direction holds
/// an empty pipe or buffer, which is then given back; `TimedOut` once
/// `idle_until` passes; at most until `wake_at`.
fn wait(
    mobile: &TcpStream,
    hidden: &TcpStream,
    up: &mut Way,
    down: &mut Way,
    idle_until: Option<Instant>,
    wake_at: Option<Instant>,
) -> io::Result<()> {
    use nix::poll::{PollFd, PollTimeout, poll};
    use std::os::fd::{AsFd, AsRawFd};
    if up.done && down.done {
        return Ok(());
    }
    let m = up.wants_read() | down.wants_write();
    let h = down.wants_read() | up.wants_write();
    let mut set = [
        PollFd::new(mobile.as_fd(), m),
        PollFd::new(hidden.as_fd(), h),
    ];
    // A socket nothing waits on is left out: its hang-up alone must not wake us.
    // (A direction not done always waits on one of them.)
    let fds = if m.is_empty() {
        &mut set[1..]
    } else if h.is_empty() {
        &mut set[..1]
    } else {
        &mut set[..]
    };
    up.ready = false;
    down.ready = false;
    let idle = (up.holds_idle() || down.holds_idle()).then_some(PIPE_IDLE);
    let silent = match idle_until {
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, IdleTimeout));
            }
            Some(left)
        }
        None => None,
    };
    let woken = wake_at.map(|t| t.saturating_duration_since(Instant::now()));
    let timeout = match idle.into_iter().chain(silent).chain(woken).min() {
        // Rounded up: a poll woken a little early would only loop once more.
        Some(d) => PollTimeout::try_from(d + std::time::Duration::from_millis(1))
            .unwrap_or(PollTimeout::MAX),
        None => PollTimeout::NONE,
    };
    let polled = Instant::now();
    match poll(fds, timeout) {
        Ok(0) => {
            // Quiet for PIPE_IDLE, not only woken for the hook: pipes go back.
            if idle.is_some_and(|d| polled.elapsed() >= d) {
                up.release();
                down.release();
            }
            Ok(())
        }
        Ok(_) => {
            use nix::poll::PollFlags;
            let has = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
            for fd in fds.iter() {
                let readable = fd.revents().is_some_and(|r| r.intersects(has));
                if fd.as_fd().as_raw_fd() == mobile.as_raw_fd() {
                    up.ready = readable;
                } else {
                    down.ready = readable;
                }
            }
            Ok(())
        }
        Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a direction holds its octets in between reading and writing them.
enum Held {
    /// Nothing yet, or given back after `PIPE_IDLE` of quiet.
    Nothing,
    /// A pipe (read end, write end, capacity): splice in, splice out.
    #[cfg(target_os = "linux")]
    Pipe(std::os::fd::OwnedFd, std::os::fd::OwnedFd, usize),
    /// A user-space buffer and where its unwritten octets start.
    Buffer(Box<[u8]>, usize),
}

/// One direction of a pair, driven by `run`.
struct Way {
    /// Splice until the kernel refuses it, then copy.
    copier: Copier,
    /// Where its octets wait between the read and the write.
    held: Held,
    /// Octets read and not yet written.
    pending: usize,
    /// Octets written.
    count: u64,
    /// EOF passed on (or the pair failed).
    done: bool,
    /// The last poll said the source has an octet, an EOF or an error, and no
    /// read has been tried since.
    ready: bool,
}

impl Way {
    fn new(copier: Copier) -> Way {
        Way {
            copier,
            held: Held::Nothing,
            pending: 0,
            count: 0,
            done: false,
            ready: false,
        }
    }

    fn wants_read(&self) -> nix::poll::PollFlags {
        if !self.done && self.pending == 0 {
            nix::poll::PollFlags::POLLIN
        } else {
            nix::poll::PollFlags::empty()
        }
    }

    fn wants_write(&self) -> nix::poll::PollFlags {
        if !self.done && self.pending > 0 {
            nix::poll::PollFlags::POLLOUT
        } else {
            nix::poll::PollFlags::empty()
        }
    }

    fn holds_idle(&self) -> bool {
        self.pending == 0 && !matches!(self.held, Held::Nothing)
    }

    fn release(&mut self) {
        if self.pending == 0 {
            self.held = Held::Nothing;
        }
    }

    /// Moves what can move now without blocking (at most `TURN` chunks); at EOF
    /// half-closes `to`.
    /// A short read or a short write ends the turn at once: the source is
    /// drained or the destination full, and asking again would only hear EAGAIN.
    fn advance(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<()> {
        let mut drained = false;
        for _ in 0..TURN {
            if self.done {
                break;
            }
            if self.pending > 0 {
                match self.push(to) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.pending -= n;
                        self.count += n as u64;
                        if self.pending > 0 || drained {
                            break;
                        }
                    }
                    Err(e) if later(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            match self.pull(from) {
                Ok(0) => {
                    // The peer may already be gone; its own direction says so.
                    let _ = to.shutdown(Shutdown::Write);
                    self.done = true;
                    self.held = Held::Nothing;
                }
                Ok(n) => {
                    self.pending = n;
                    drained = n < self.capacity();
                }
                Err(e) if later(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The most one read can bring.
    fn capacity(&self) -> usize {
        match &self.held {
            Held::Buffer(buf, _) => buf.len(),
            #[cfg(target_os = "linux")]
            Held::Pipe(_, _, size) => *size,
            Held::Nothing => SPLICE_CHUNK,
        }
    }

    /// Reads into the pipe (made here if need be) or, where the kernel refuses a
    /// pipe or splice, into the buffer from then on. Only called with nothing
    /// pending.
    fn pull(&mut self, from: &TcpStream) -> io::Result<usize> {
        let ready = std::mem::take(&mut self.ready);
        // A pipe or buffer is made only for octets that are there (or an EOF).
        if matches!(self.held, Held::Nothing) && !ready {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        #[cfg(target_os = "linux")]
        if self.copier == Copier::Splice {
            use nix::fcntl::{OFlag, SpliceFFlags, splice};
            if matches!(self.held, Held::Nothing) {
                match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
                    Ok((r, w)) => {
                        use nix::fcntl::{FcntlArg, fcntl};
                        let size = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
                            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))
                            .map_or(SPLICE_CHUNK, |n| n as usize);
                        self.held = Held::Pipe(r, w, size);
                    }
                    Err(_) => self.copier = Copier::Copy,
                }
            }
            if let Held::Pipe(_, w, size) = &self.held {
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                match splice(from, None, w, None, *size, flags) {
                    Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
                        self.copier = Copier::Copy;
                    }
                    // Splice stops at a TCP urgent mark (a peer's MSG_OOB): it
                    // says EAGAIN right after poll said readable, or 0 as at an
                    // EOF once the peer's FIN is in. A read passes the mark (the
                    // urgent octet stays out of band, as in any read loop); the
                    // buffer then serves until the direction is quiet for
                    // `PIPE_IDLE`, and splice takes over again.
                    Err(nix::errno::Errno::EAGAIN) if ready => {}
                    Ok(0) if from.peek(&mut [0u8; 1])? > 0 => {}
                    done => return done.map_err(io::Error::from),
                }
            }
        }
        let buf = match &mut self.held {
            Held::Buffer(buf, start) => {
                *start = 0;
                buf
            }
            held => {
                *held = Held::Buffer(vec![0; COPY_BUF].into_boxed_slice(), 0);
                match held {
                    Held::Buffer(buf, _) => buf,
                    _ => return Err(io::Error::other("relay buffer lost")),
                }
            }
        };
        (&mut &*from).read(buf)
    }

    /// Writes some of what is held.
    fn push(&mut self, to: &TcpStream) -> io::Result<usize> {
        match &mut self.held {
            #[cfg(target_os = "linux")]
            Held::Pipe(r, _, _) => {
                use nix::fcntl::{SpliceFFlags, splice};
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                splice(&*r, None, to, None, self.pending, flags).map_err(io::Error::from)
            }
            Held::Buffer(buf, start) => {
                let n = (&mut &*to).write(&buf[*start..*start + self.pending])?;
                *start += n;
                Ok(n)
            }
            Held::Nothing => Err(io::Error::other("relay octets held in nothing")),
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

/// Copies `from` to `to` with a blocking `io::copy`; at EOF half-closes `to`,
/// on error closes both. Returns the octets copied.
pub fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let copied = io::copy(&mut &*from, &mut &*to);
    match &copied {
        // The peer may already be gone; its own direction reports that.
        Ok(_) => drop(to.shutdown(Shutdown::Write)),
        Err(_) => close_both(from, to),
    }
    copied
}

fn close_both(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

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

    /// On Linux the splice path itself moves the octets through a pipe (no
    /// silent fallback to the buffer).
    #[cfg(target_os = "linux")]
    #[test]
    fn splice_is_used_on_linux() {
        let (mut a, a_relay) = connected();
        let (b_relay, mut b) = connected();
        a.write_all(b"zero copy").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        a_relay.peek(&mut [0u8; 1]).unwrap();
        let mut way = Way::new(Copier::Splice);
        way.ready = true;
        way.advance(&a_relay, &b_relay).unwrap();
        assert_eq!(way.count, 9);
        assert!(matches!(way.held, Held::Pipe(..)), "moved through a pipe");
        assert_eq!(way.copier, Copier::Splice);
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

    /// Sends "hello ", an urgent octet (MSG_OOB), then "world".
    fn send_with_urgent(s: &mut TcpStream) {
        s.write_all(b"hello ").unwrap();
        socket2::SockRef::from(&*s).send_out_of_band(b"!").unwrap();
        // After the urgent octet reached the relay's socket.
        thread::sleep(std::time::Duration::from_millis(50));
        s.write_all(b"world").unwrap();
    }

    /// Reads to EOF, failing after 10 s (a relay stuck at the urgent mark).
    fn read_all(mut s: TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("stalled before EOF");
        got
    }

    /// A peer's urgent octet must neither stall a direction nor spin it (splice
    /// stops at the urgent mark): the data after it flows, and the urgent octet
    /// stays out of band, as in a read loop.
    #[test]
    fn urgent_data_neither_stalls_nor_spins_the_relay() {
        for copier in [Copier::Splice, Copier::Copy] {
            let (mobile, mobile_relay) = connected();
            let (hidden_relay, hidden) = connected();
            let t =
                thread::spawn(move || run(Arc::new(mobile_relay), Arc::new(hidden_relay), copier));
            hidden.shutdown(Shutdown::Write).unwrap();
            let mut mobile = mobile;
            // Without an EOF behind it (splice said EAGAIN), then with one
            // (splice said 0).
            for round in 0..2 {
                if round == 1 {
                    // Splicing again by then, with a fresh pipe.
                    thread::sleep(PIPE_IDLE + std::time::Duration::from_millis(300));
                }
                send_with_urgent(&mut mobile);
                let mut got = [0u8; 11];
                let mut h = hidden.try_clone().unwrap();
                h.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .unwrap();
                if round == 1 {
                    mobile.shutdown(Shutdown::Write).unwrap();
                }
                h.read_exact(&mut got).expect("stalled at the urgent mark");
                assert_eq!(&got, b"hello world", "{copier:?}");
            }
            assert_eq!(read_all(hidden), b"", "{copier:?}: EOF after the data");
            let (moved, err) = t.join().unwrap();
            assert!(err.is_none(), "{copier:?}: {err:?}");
            assert_eq!(moved.up, 22, "{copier:?}");
        }
    }

    /// The same through the blocking `one_way` (the agent's `--eager` side).
    #[test]
    fn urgent_data_passes_one_way() {
        let (a, a_relay) = connected();
        let (b_relay, b) = connected();
        let t = thread::spawn(move || one_way(&a_relay, &b_relay));
        let mut a = a;
        send_with_urgent(&mut a);
        a.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(b), b"hello world");
        assert_eq!(t.join().unwrap().unwrap(), 11);
    }

    /// `run_with`: a hook waits for the first octets toward its side (or its
    /// time), and its `after`, runs once, and an error from it closes the pair.
    #[test]
    fn a_hook_runs_once_after_the_first_answer_or_its_time() {
        use std::sync::mpsc;
        let hooked = |copier: Copier, toward: Toward, by: Duration, after: Duration| {
            let (mobile, mobile_relay) = connected();
            let (hidden_relay, hidden) = connected();
            let (tx, rx) = mpsc::channel();
            let hook = Hook {
                toward,
                by: Instant::now() + by,
                after,
                call: move || {
                    tx.send(Instant::now()).unwrap();
                    Ok(())
                },
            };
            let t = thread::spawn(move || {
                run_with(
                    Arc::new(mobile_relay),
                    Arc::new(hidden_relay),
                    copier,
                    None,
                    Ready::default(),
                    hook,
                )
            });
            (mobile, hidden, rx, t)
        };
        for copier in [Copier::Splice, Copier::Copy] {
            let (mut mobile, mut hidden, rx, t) = hooked(
                copier,
                Toward::Mobile,
                Duration::from_secs(60),
                Duration::ZERO,
            );
            mobile.write_all(b"ask").unwrap();
            let mut got = [0u8; 3];
            hidden.read_exact(&mut got).unwrap();
            let quiet = Duration::from_millis(200);
            assert!(
                rx.recv_timeout(quiet).is_err(),
                "{copier:?}: not before the answer"
            );
            hidden.write_all(b"answer").unwrap();
            let mut back = [0u8; 6];
            mobile.read_exact(&mut back).unwrap();
            rx.recv_timeout(Duration::from_secs(10))
                .expect("after the answer");
            mobile.shutdown(Shutdown::Write).unwrap();
            hidden.shutdown(Shutdown::Write).unwrap();
            let (moved, err) = t.join().unwrap();
            assert!(err.is_none(), "{copier:?}: {err:?}");
            assert_eq!(moved, Moved { up: 3, down: 6 });
            assert!(rx.try_recv().is_err(), "{copier:?}: once");

            // No answer: at its time.
            let start = Instant::now();
            let by = Duration::from_millis(100);
            let (mut mobile, mut hidden, rx, t) =
                hooked(copier, Toward::Mobile, by, Duration::ZERO);
            mobile.write_all(b"ask").unwrap();
            hidden.read_exact(&mut got).unwrap();
            let at = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("at its time");
            assert!(at - start >= by, "{copier:?}");
            drop((mobile, hidden));
            let _ = t.join().unwrap();

            // With `after`: that long past the answer, the answer not held.
            let after = Duration::from_millis(100);
            let (mut mobile, mut hidden, rx, t) =
                hooked(copier, Toward::Mobile, Duration::from_secs(60), after);
            mobile.write_all(b"ask").unwrap();
            hidden.read_exact(&mut got).unwrap();
            let answered = Instant::now();
            hidden.write_all(b"answer").unwrap();
            mobile.read_exact(&mut back).unwrap();
            let at = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("after the answer and its pause");
            assert!(at - answered >= after, "{copier:?}: {:?}", at - answered);
            drop((mobile, hidden));
            let _ = t.join().unwrap();
        }
        // The first octets known to be there are passed on in the first turn;
        // an error from the hook then closes the pair.
        let (mut mobile, mobile_relay) = connected();
        let (hidden_relay, hidden) = connected();
        mobile.write_all(b"x").unwrap();
        // After the octet reached the relay's socket.
        thread::sleep(Duration::from_millis(50));
        let t = thread::spawn(move || {
            let hook = Hook {
                toward: Toward::Hidden,
                by: Instant::now(),
                after: Duration::ZERO,
                call: || Err(io::Error::other("no thread")),
            };
            let ready = Ready {
                mobile: true,
                hidden: false,
            };
            run_with(
                Arc::new(mobile_relay),
                Arc::new(hidden_relay),
                Copier::Splice,
                None,
                ready,
                hook,
            )
        });
        let (moved, err) = t.join().unwrap();
        assert_eq!(err.map(|e| e.to_string()).as_deref(), Some("no thread"));
        assert_eq!(moved.up, 1);
        assert_eq!(read_all(hidden), b"x", "then closed");
        let mut rest = Vec::new();
        assert_eq!(mobile.read_to_end(&mut rest).unwrap_or(0), 0);
    }

    /// How a test pair ended, and when.
    type Ended = (Moved, Option<io::Error>, Instant);

    /// A pair relayed by `run_until_idle` in a thread: (mobile, hidden, thread).
    fn idle_pair(
        copier: Copier,
        idle: Duration,
    ) -> (TcpStream, TcpStream, thread::JoinHandle<Ended>) {
        let (mobile, mobile_relay) = connected();
        let (hidden_relay, hidden) = connected();
        let t = thread::spawn(move || {
            let (moved, err) = run_until_idle(
                Arc::new(mobile_relay),
                Arc::new(hidden_relay),
                copier,
                Some(idle),
            );
            (moved, err, Instant::now())
        });
        (mobile, hidden, t)
    }

    /// A pair silent both ways is closed after `idle`, from its start or from
    /// its last octet, half-closed or not; octets keep it open.
    #[test]
    fn idle_pairs_are_closed_when_the_timeout_passes() {
        let idle = Duration::from_millis(300);
        // Generous: a loaded CI machine may schedule the relay thread late.
        let margin = Duration::from_secs(2);
        for copier in [Copier::Splice, Copier::Copy] {
            let start = Instant::now();
            let (mut mobile, mut hidden, t) = idle_pair(copier, idle);
            let (moved, err, closed) = t.join().unwrap();
            assert_eq!(moved, Moved::default());
            assert!(err.as_ref().is_some_and(is_idle_timeout), "{err:?}");
            let took = closed - start;
            assert!(took >= idle && took < idle + margin, "{copier:?}: {took:?}");
            let mut rest = Vec::new();
            assert_eq!(hidden.read_to_end(&mut rest).unwrap_or(0), 0);
            assert_eq!(mobile.read_to_end(&mut rest).unwrap_or(0), 0);

            // One octet, then the mobile half-closes and both go quiet.
            let (mut mobile, mut hidden, t) = idle_pair(copier, idle);
            mobile.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            hidden.read_exact(&mut one).unwrap();
            mobile.shutdown(Shutdown::Write).unwrap();
            let last = Instant::now();
            let (moved, err, closed) = t.join().unwrap();
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
            assert_eq!(moved.up, 1);
            let took = closed - last;
            assert!(took < idle + margin, "{copier:?}: {took:?}");
            assert!(closed - start >= idle);

            // Octets within every `idle` keep the pair open past it.
            let (mut mobile, mut hidden, t) = idle_pair(copier, idle);
            for chunk in [b"a", b"b", b"c"] {
                mobile.write_all(chunk).unwrap();
                hidden.read_exact(&mut one).unwrap();
                thread::sleep(idle / 2);
            }
            mobile.shutdown(Shutdown::Write).unwrap();
            hidden.shutdown(Shutdown::Write).unwrap();
            let (moved, err, _) = t.join().unwrap();
            assert!(err.is_none(), "{copier:?}: {err:?}");
            assert_eq!(moved.up, 3);
        }
    }
}
