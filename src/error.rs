//! The one error type of the library, and the one place where an error becomes an
//! HTTP status (docs/PROTOCOL.md's answer tables).
//!
//! Invariants: every variant carries the context an operator needs (the file, the
//! key, the label, the phase), and none carries a secret: no TOTP secret, token or
//! key material is ever put in an error, so any error may be logged or printed.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::sys::{FileError, NoRandom};

/// Everything that can go wrong in taas, from a config typo to a peer's garbage.
#[derive(Debug)]
pub enum Error {
    /// The configuration file could not be read or is not valid TOML.
    ConfigRead {
        /// The file that was read.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A configuration key is unknown or has a bad value.
    ConfigValue {
        /// The file the key came from ("built-in defaults" when there is none).
        source: String,
        /// The key.
        key: String,
        /// Why the value is refused.
        reason: String,
    },
    /// A file could not be read, written or created.
    File {
        /// The file.
        path: PathBuf,
        /// What was being done ("read", "write", "rename", …).
        action: &'static str,
        /// The underlying error.
        err: io::Error,
    },
    /// A file's content is not what it should be (bad JSON, bad PEM, bad mode).
    FileContent {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file taas would write is a symlink.
    Symlink(
        /// The path.
        PathBuf,
    ),
    /// Run as root in a directory another user owns.
    ForeignOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A LABEL is not one DNS label (docs/PROTOCOL.md section 5).
    BadLabel(String),
    /// A label is already owned by another account.
    LabelTaken {
        /// The label.
        label: String,
        /// The account that owns it.
        owner: String,
    },
    /// A fixed port (`LABEL:PORT`) another account's label already has.
    PortTaken {
        /// The port.
        port: u16,
        /// The account that has it.
        owner: String,
    },
    /// A fixed port the configuration does not allow (inside `port_range`, …).
    BadFixedPort {
        /// The label entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A label the configuration reserves (the registrar's own name).
    ReservedLabel {
        /// The label.
        label: String,
        /// Why it is reserved.
        reason: String,
    },
    /// The fixed rendezvous port of a label cannot be listened on.
    FixedPortUnavailable {
        /// The label.
        label: String,
        /// The port.
        port: u16,
        /// What the operating system said.
        err: io::Error,
    },
    /// The label's pool and open plugs already hold `max_waiting`.
    PoolFull {
        /// The label.
        label: String,
        /// `max_waiting`.
        max: usize,
    },
    /// An account ID (UUID) is malformed.
    BadId(String),
    /// No account with this ID.
    NoSuchAccount(String),
    /// An account with this ID exists already.
    AccountExists(String),
    /// An account record is unusable (bad base32, unsupported algorithm, …).
    BadAccount {
        /// The account.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The account store (Redis, or the file store's file system) is unreachable.
    StoreUnavailable(String),
    /// Too many requests are waiting on the account store already; the value is
    /// how many may wait.
    StoreBusy(usize),
    /// This node's clock is off from Redis's by more than a TOTP step: its
    /// tokens and steps cannot be compared with the other nodes'.
    ClockOff {
        /// The node.
        node: String,
        /// Local clock minus Redis's, in ms.
        off_ms: i64,
    },
    /// A request head is malformed; the text says how.
    BadRequest(String),
    /// The peer closed before the end of its request head (a client that gave
    /// up, or an accept loop's wake-up): nothing to answer.
    ClosedEarly,
    /// A request head is larger than the limit.
    HeadTooLarge(usize),
    /// A request names a path that does not exist.
    NotFound,
    /// A method not allowed on a path; the value is the one allowed.
    MethodNotAllowed(&'static str),
    /// No `Authorization` header.
    AuthMissing,
    /// Unknown ID or wrong token (never says which, to the peer).
    AuthFailed,
    /// The ID does not own the label.
    Forbidden {
        /// The account.
        id: String,
        /// The label it asked for.
        label: String,
    },
    /// Too many failed attempts; retry after this long.
    Throttled(Duration),
    /// A right token of a step already used from another address, or older than
    /// one used (replay rule): retry after this long, at the next step.
    Replay(Duration),
    /// The `Host` is neither the registrar nor under `servers_domain`.
    MisdirectedHost(String),
    /// The label is valid but has no waiting responder.
    NoResponder(String),
    /// No free port in `port_range`.
    NoFreePort,
    /// Registrations go elsewhere; the value is the `Location`.
    Redirect(String),
    /// A deadline passed in the named phase (handshake, head, plug, pair_wait).
    Timeout(&'static str),
    /// A limit was hit; the text names it.
    Limit(&'static str),
    /// An upstream (the registrar, to the agent) answered with something that is
    /// not a well-framed HTTP/1.1 answer; the text says how.
    BadAnswer(String),
    /// TLS set-up or handshake failed.
    Tls(String),
    /// A file of the relay's CA (`ca_cert` or `ca_key`) is absent where a
    /// certificate must be issued.
    CaMissing {
        /// The absent file.
        path: PathBuf,
    },
    /// The relay's CA would not vouch for these names (outside its name
    /// constraints), or `ca_cert` and `ca_key` do not belong together.
    CaRefused {
        /// The CA certificate.
        ca: PathBuf,
        /// The names asked for.
        names: Vec<String>,
        /// What the check said.
        reason: String,
    },
    /// Network I/O failed in the named phase.
    Io {
        /// What was being done.
        phase: &'static str,
        /// The underlying error.
        err: io::Error,
    },
    /// A host name could not be resolved to any address.
    Resolve {
        /// The name.
        host: String,
        /// What the resolver said.
        err: io::Error,
    },
    /// A listener could not be bound.
    Listen {
        /// What listens there ("the well-known port", "status_listen", …).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the operating system said.
        err: io::Error,
    },
    /// A value could not be encoded (JSON); the text says which.
    Encode(String),
    /// TOTP parameters that cannot be used (not base32, step 0, …).
    BadTotp(String),
    /// The operating system gave no random bytes.
    NoRandom,
    /// Anything a command-line user did wrong that is not covered above.
    Usage(String),
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After`).
pub fn seconds_up(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Retry-After of a registration refused at a full pool, in seconds.
pub const POOL_FULL_RETRY: u64 = 15;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status for this error, per the answer tables of docs/PROTOCOL.md.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::ClosedEarly | Error::BadLabel(_) | Error::BadId(_) => 400,
            Error::AuthMissing | Error::AuthFailed => 401,
            Error::Forbidden { .. } => 403,
            Error::NotFound | Error::NoSuchAccount(_) => 404,
            Error::MethodNotAllowed(_) => 405,
            Error::Timeout(_) => 408,
            Error::LabelTaken { .. }
            | Error::PortTaken { .. }
            | Error::AccountExists(_)
            | Error::ReservedLabel { .. } => 409,
            Error::BadFixedPort { .. } => 400,
            Error::HeadTooLarge(_) => 431,
            Error::MisdirectedHost(_) => 421,
            Error::Throttled(_) | Error::Replay(_) => 429,
            Error::Redirect(_) => 307,
            Error::StoreUnavailable(_)
            | Error::StoreBusy(_)
            | Error::ClockOff { .. }
            | Error::NoFreePort
            | Error::NoResponder(_)
            | Error::FixedPortUnavailable { .. }
            | Error::PoolFull { .. }
            | Error::Limit(_) => 503,
            Error::BadAnswer(_) => 502,
            _ => 500,
        }
    }

    /// Seconds for a `Retry-After` header, for the statuses that carry one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            // Rounded up: a client that waits exactly this long is let in.
            Error::Throttled(d) | Error::Replay(d) => Some(seconds_up(*d)),
            Error::StoreUnavailable(_) | Error::Limit(_) => Some(5),
            // The original steward waits 15 s after any 503; a full pool frees
            // a place only when a responder is paired or dies.
            Error::PoolFull { .. } => Some(POOL_FULL_RETRY),
            Error::FixedPortUnavailable { .. } | Error::ClockOff { .. } => Some(30),
            Error::NoFreePort | Error::NoResponder(_) | Error::StoreBusy(_) => Some(1),
            _ => None,
        }
    }

    /// Wraps an I/O error of a socket, turning `WouldBlock` (what a read timeout
    /// reports on Unix) into the `Timeout` of the named phase.
    pub fn io(phase: &'static str, err: io::Error) -> Error {
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout(phase),
            _ => Error::Io { phase, err },
        }
    }

    /// Wraps an I/O error on a file.
    pub fn file(path: impl Into<PathBuf>, action: &'static str, err: io::Error) -> Error {
        Error::File {
            path: path.into(),
            action,
            err,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ConfigRead { path, reason } => {
                write!(f, "config {}: {reason}", path.display())
            }
            Error::ConfigValue {
                source,
                key,
                reason,
            } => write!(f, "config {source}: key `{key}`: {reason}"),
            Error::File { path, action, err } => {
                write!(f, "cannot {action} {}: {err}", path.display())
            }
            Error::FileContent { path, reason } => write!(f, "{}: {reason}", path.display()),
            Error::Symlink(path) => write!(
                f,
                "{} is a symbolic link; taas does not write through links (remove it)",
                path.display()
            ),
            Error::ForeignOwner { dir, uid } => write!(
                f,
                "{} belongs to uid {uid}, not root: run this as that user (e.g. sudo -u taas taas …), so nothing it could plant there is written as root",
                dir.display()
            ),
            Error::BadLabel(label) => write!(
                f,
                "bad label {label:?}: a label is 1 to 63 of a-z 0-9 -, not starting or ending with -"
            ),
            Error::LabelTaken { label, owner } => {
                write!(f, "label {label:?} is already owned by account {owner}")
            }
            Error::PortTaken { port, owner } => {
                write!(
                    f,
                    "fixed port {port} is already a label's of account {owner}"
                )
            }
            Error::BadFixedPort { entry, reason } => write!(f, "label {entry:?}: {reason}"),
            Error::ReservedLabel { label, reason } => {
                write!(f, "label {label:?} is reserved: {reason}")
            }
            Error::FixedPortUnavailable { label, port, err } => {
                write!(
                    f,
                    "cannot listen on fixed port {port} of label {label}: {err}"
                )
            }
            Error::PoolFull { label, max } => write!(
                f,
                "{label} already has max_waiting ({max}) responders waiting or connecting"
            ),
            Error::BadId(id) => write!(f, "bad account ID {id:?}: expected a UUID"),
            Error::NoSuchAccount(id) => write!(f, "no account {id}"),
            Error::AccountExists(id) => write!(f, "account {id} exists already"),
            Error::BadAccount { id, reason } => write!(f, "account {id}: {reason}"),
            Error::StoreUnavailable(why) => write!(f, "account store unreachable: {why}"),
            Error::StoreBusy(n) => write!(f, "account store busy: {n} requests wait on it already"),
            Error::ClockOff { node, off_ms } => write!(
                f,
                "node {node}: clock {:.1} s off from Redis's (at most 30 s): registrations refused",
                *off_ms as f64 / 1000.0
            ),
            Error::BadRequest(why) => write!(f, "bad request: {why}"),
            Error::ClosedEarly => write!(
                f,
                "bad request: connection closed before the end of the head"
            ),
            Error::HeadTooLarge(limit) => write!(f, "request head larger than {limit} bytes"),
            Error::NotFound => write!(f, "no such path"),
            Error::MethodNotAllowed(allow) => write!(f, "method not allowed; use {allow}"),
            Error::AuthMissing => write!(f, "no Authorization header"),
            Error::AuthFailed => write!(f, "unknown ID or wrong token"),
            Error::Forbidden { id, label } => write!(f, "{id} does not own label {label}"),
            Error::Throttled(d) => {
                write!(f, "too many failed attempts; retry in {} s", seconds_up(*d))
            }
            Error::Replay(d) => write!(
                f,
                "this step's token was already used (or is older than one used); retry in {} s",
                seconds_up(*d)
            ),
            Error::MisdirectedHost(host) => write!(f, "host {host:?} is not served here"),
            Error::NoResponder(label) => write!(f, "no responder waiting for {label}"),
            Error::NoFreePort => write!(f, "no free port in port_range"),
            // The request target is in it: its query is never logged.
            Error::Redirect(to) => match to.split_once('?') {
                Some((url, _)) => write!(f, "redirected to {url} (query not logged)"),
                None => write!(f, "redirected to {to}"),
            },
            Error::Timeout(phase) => write!(f, "{phase} timed out"),
            Error::Limit(which) => write!(f, "limit reached: {which}"),
            Error::BadAnswer(why) => write!(f, "malformed HTTP answer: {why}"),
            Error::Tls(why) => write!(f, "TLS: {why}"),
            Error::CaMissing { path } => write!(
                f,
                "the relay's CA file {} is missing: run `taas cert` to make the CA (it keeps an existing registrar certificate)",
                path.display()
            ),
            Error::CaRefused { ca, names, reason } => write!(
                f,
                "the relay's CA {} cannot issue a certificate for {}: {reason}",
                ca.display(),
                names.join(", ")
            ),
            Error::Io { phase, err } => write!(f, "{phase}: {err}"),
            Error::Resolve { host, err } => write!(f, "cannot resolve {host}: {err}"),
            Error::Listen { what, addr, err } => write!(f, "cannot listen on {what} {addr}: {err}"),
            Error::Encode(why) => write!(f, "cannot encode {why}"),
            Error::BadTotp(why) | Error::Usage(why) => write!(f, "{why}"),
            Error::NoRandom => write!(f, "the operating system gave no random bytes"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::File { err, .. }
            | Error::FixedPortUnavailable { err, .. }
            | Error::Io { err, .. }
            | Error::Resolve { err, .. }
            | Error::Listen { err, .. } => Some(err),
            _ => None,
        }
    }
}

impl From<FileError> for Error {
    fn from(e: FileError) -> Error {
        match e {
            FileError::Io { path, action, err } => Error::File { path, action, err },
            FileError::Symlink(path) => Error::Symlink(path),
            FileError::ForeignOwner { dir, uid } => Error::ForeignOwner { dir, uid },
        }
    }
}

impl From<NoRandom> for Error {
    fn from(_: NoRandom) -> Error {
        Error::NoRandom
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_protocol_tables() {
        assert_eq!(Error::AuthMissing.status(), 401);
        assert_eq!(Error::AuthFailed.status(), 401);
        let forbidden = Error::Forbidden {
            id: "a".into(),
            label: "b".into(),
        };
        assert_eq!(forbidden.status(), 403);
        assert_eq!(Error::Throttled(Duration::from_secs(6)).status(), 429);
        assert_eq!(Error::MisdirectedHost("x".into()).status(), 421);
        assert_eq!(Error::NoResponder("x".into()).status(), 503);
        assert_eq!(Error::NoFreePort.status(), 503);
        assert_eq!(Error::StoreUnavailable("x".into()).status(), 503);
        assert_eq!(Error::MethodNotAllowed("PUT").status(), 405);
        assert_eq!(Error::Redirect("https://x/".into()).status(), 307);
    }

    #[test]
    fn a_redirect_as_logged_leaves_the_query_out() {
        let e = Error::Redirect("https://r.example/register/cam?code=secret".into());
        assert_eq!(
            e.to_string(),
            "redirected to https://r.example/register/cam (query not logged)"
        );
    }

    #[test]
    fn would_block_is_a_named_timeout() {
        let e = Error::io("head", io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(e.to_string(), "head timed out");
    }
}
