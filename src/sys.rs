//! The operating system, as every other module uses it: named threads with
//! explicit stacks, the one lock helper, listening sockets and how to wake them,
//! peeking at a peer, random bytes, files only the owner reads, signals.
//!
//! Invariants: this module imports nothing of the crate (it is the bottom
//! layer); every thread the crate starts has a stack size from here; a lock
//! poisoned by a panicking thread is taken as it is (`lock`: every table of the
//! crate is consistent between statements, so a panic leaves nothing half-done);
//! a file written here is never written through a symlink.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{LockResult, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Stack of a well-known-port or admin connection thread: a TLS handshake
/// (ring) and one request. Measured need is well under this; 256 KiB leaves room.
pub const CONN_STACK: usize = 256 * 1024;
/// Stack of accept loops, plugs, the housekeeper and status connections.
pub const SMALL_STACK: usize = 64 * 1024;
/// Stack of a pairing thread: waits, logs, then relays the pair (`relay::run`,
/// whose buffers, when used, are on the heap). Kept under a quarter of
/// `CONN_STACK`: glibc hands a new thread a cached stack up to four times the
/// size asked, and a stack that served a TLS handshake keeps its touched pages.
pub const PAIR_STACK: usize = 48 * 1024;
/// Stack of the agent's slot and pipe threads (a TLS client handshake).
pub const AGENT_STACK: usize = 128 * 1024;
/// Listen backlog of every listener (std's default is 128).
pub const BACKLOG: i32 = 1024;
/// Keepalive on waiting connections: first probe after this much silence…
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// …then one probe every this long…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// …and the peer is dead after this many unanswered (about 30 s in all).
pub const KEEPALIVE_RETRIES: u32 = 3;
/// `O_NOFOLLOW`: an open fails on a symlink instead of following it.
pub const NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();

/// Spawns a named thread with an explicit stack.
pub fn spawn(
    name: &str,
    stack: usize,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(f)
}

/// Locks `m`, with the crate's one poison policy (`unpoisoned`).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoisoned(m.lock())
}

/// The crate's one poison policy: a lock poisoned by a panicking thread is taken
/// as it is (every table of the crate is consistent between statements).
pub fn unpoisoned<G>(locked: LockResult<G>) -> G {
    locked.unwrap_or_else(PoisonError::into_inner)
}

/// Binds `addr` with `BACKLOG` and `SO_REUSEADDR`.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
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

/// Wakes a blocking `accept` on `addr` by connecting to it once.
pub fn wake(addr: SocketAddr) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, addr.port()), Duration::from_secs(1));
}

/// Turns on TCP keepalive with the short intervals above, so a peer that vanished
/// without a FIN is found dead.
pub fn set_keepalive(stream: &TcpStream) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// What a peek says of a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerState {
    /// EOF, an error, or a socket that cannot be asked.
    Gone,
    /// There, silent (for as long as the peek waited).
    Quiet,
    /// There, with octets waiting to be read.
    Speaking,
}

/// One non-blocking peek at `stream`.
fn peek_now(stream: &TcpStream) -> PeerState {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    let flags = nix::libc::MSG_PEEK | nix::libc::MSG_DONTWAIT;
    loop {
        return match socket2::SockRef::from(stream).recv_with_flags(&mut byte, flags) {
            Ok(0) => PeerState::Gone,
            Ok(_) => PeerState::Speaking,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => PeerState::Quiet,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => PeerState::Gone,
        };
    }
}

/// Peeks at `stream` without consuming, waiting up to `wait` for an octet
/// (`Duration::ZERO`: not at all); the socket's mode is left as it was, without
/// a read timeout. A peer that is gone or has spoken already costs one call
/// (`recv(MSG_PEEK | MSG_DONTWAIT)`, whatever the socket's mode): pairing peeks
/// at every waiting responder and at the mobile, on each connection's way.
pub fn peer_state(stream: &TcpStream, wait: Duration) -> PeerState {
    let now = peek_now(stream);
    if now != PeerState::Quiet || wait.is_zero() {
        return now;
    }
    let set = |on: bool| stream.set_read_timeout(on.then_some(wait));
    if set(true).is_err() {
        return PeerState::Gone;
    }
    let state = match stream.peek(&mut [0u8; 1]) {
        Ok(0) => PeerState::Gone,
        Ok(_) => PeerState::Speaking,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            PeerState::Quiet
        }
        Err(_) => PeerState::Gone,
    };
    match set(false) {
        Ok(()) => state,
        Err(_) => PeerState::Gone,
    }
}

/// `peer_state(s, Duration::ZERO)` of each of `streams`, in one `poll(2)` for
/// all: a socket with nothing to read is Quiet without a call of its own, and
/// only one that polls readable (octets or EOF), hung up or in error is peeked.
/// (A label's waiting responders, up to `max_waiting`, on each mobile's way.)
pub fn peer_states(streams: &[&TcpStream]) -> Vec<PeerState> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds: Vec<PollFd> = streams
        .iter()
        .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
        .collect();
    let polled = loop {
        match poll(&mut fds, PollTimeout::ZERO) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.is_ok(),
        }
    };
    fds.iter()
        .zip(streams)
        .map(|(fd, s)| match fd.revents() {
            Some(r) if polled && r.is_empty() => PeerState::Quiet,
            _ => peek_now(s),
        })
        .collect()
}

/// Is the peer of `stream` still there? Nothing is consumed, nothing waited for.
pub fn is_alive(stream: &TcpStream) -> bool {
    peer_state(stream, Duration::ZERO) != PeerState::Gone
}

/// The operating system gave no random bytes.
#[derive(Debug)]
pub struct NoRandom;

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), NoRandom> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| NoRandom)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Why a private file was not written.
#[derive(Debug)]
pub enum FileError {
    /// The operating system refused `action` on `path`.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("create", "write", …).
        action: &'static str,
        /// What the operating system said.
        err: io::Error,
    },
    /// The path is a symbolic link.
    Symlink(PathBuf),
    /// Run as root in a directory another user owns.
    ForeignOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
    },
}

/// `FileError::Io` for `action` on `path`.
fn file_io(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |err| FileError::Io { path, action, err }
}

/// Creates `dir` (and parents) with mode 0700 when it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_io(dir, "create directory"))
}

/// Writes `bytes` to `path` with `mode` by way of a new file of unpredictable
/// name beside it, then renamed over `path`: no symlink planted at either name is
/// ever followed, and a reader sees the old file or the new one, never half. A
/// symlink at `path` is refused.
pub fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    refuse_symlink(path)?;
    let mut r = [0u8; 8];
    random_bytes(&mut r).map_err(|NoRandom| {
        file_io(path, "name a temporary file for")(io::Error::other("no random bytes"))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{:016x}.tmp", u64::from_le_bytes(r)));
    let tmp = path.with_file_name(tmp_name);
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        file_io(path, "write")(e)
    })
}

/// Creates `path` (and a private parent directory) with `mode`; fails if it
/// exists.
pub fn create_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        refuse_foreign_dir(dir)?;
        create_private_dir(dir)?;
    }
    write_new(path, bytes, mode)
}

/// Writes a new file (`O_CREAT | O_EXCL | O_NOFOLLOW`: any existing name, a
/// symlink included, is refused) with `mode`, fsynced; removed again on failure.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(file_io(path, "create"))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .map_err(|e| {
            let _ = fs::remove_file(path);
            file_io(path, "write")(e)
        })
}

/// `FileError::Symlink` when `path` is a symlink (a file taas writes must not be).
pub fn refuse_symlink(path: &Path) -> Result<(), FileError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(FileError::Symlink(path.to_path_buf())),
        _ => Ok(()),
    }
}

/// Run as root, refuses to write in a directory another user owns (the service
/// user of the README's install): that user could plant a link there and make
/// root overwrite or chown a file of its choosing.
pub fn refuse_foreign_dir(dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // The nearest existing ancestor is where new files and directories go.
    let mut at = dir;
    loop {
        match fs::symlink_metadata(at) {
            Ok(m) if m.uid() != 0 => {
                return Err(FileError::ForeignOwner {
                    dir: at.to_path_buf(),
                    uid: m.uid(),
                });
            }
            Ok(_) => return Ok(()),
            Err(_) => match at.parent() {
                Some(p) if !p.as_os_str().is_empty() => at = p,
                _ => return Ok(()),
            },
        }
    }
}

/// Takes SIGTERM, SIGINT and SIGHUP from their default actions (from now on a
/// SIGHUP no longer ends the process), for `wait_on`.
pub fn signals() -> io::Result<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
}

/// Blocks until SIGTERM or SIGINT on `signals`; calls `on_hup` at each SIGHUP.
pub fn wait_on(mut signals: signal_hook::iterator::Signals, on_hup: impl Fn()) -> io::Result<()> {
    for sig in signals.forever() {
        if sig != signal_hook::consts::SIGHUP {
            break;
        }
        on_hup();
    }
    Ok(())
}

/// `wait_on` with the signals taken now.
pub fn wait_for_signal(on_hup: impl Fn()) -> io::Result<()> {
    wait_on(signals()?, on_hup)
}

/// Raises the soft limit on open files to the hard one: every relayed pair holds
/// two sockets and two pipes (six descriptors).
pub fn raise_fd_limit() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn connected() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let near = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (far, _) = l.accept().unwrap();
        (near, far)
    }

    #[test]
    fn peer_states_tell_quiet_speaking_and_gone_apart_and_consume_nothing() {
        let (quiet, _quiet_far) = connected();
        let (speaking, mut speaking_far) = connected();
        let (gone, gone_far) = connected();
        speaking_far.write_all(b"hi").unwrap();
        drop(gone_far);
        // Both arrived (bounded waits), as one peek each says.
        assert_eq!(
            peer_state(&speaking, Duration::from_secs(5)),
            PeerState::Speaking
        );
        assert_eq!(peer_state(&gone, Duration::from_secs(5)), PeerState::Gone);
        let states = peer_states(&[&quiet, &speaking, &gone, &speaking]);
        assert_eq!(
            states,
            [
                PeerState::Quiet,
                PeerState::Speaking,
                PeerState::Gone,
                PeerState::Speaking
            ]
        );
        let mut got = [0u8; 2];
        (&speaking).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi", "nothing consumed");
        assert!(peer_states(&[]).is_empty());
    }
}
