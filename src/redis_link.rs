//! Where Redis is and how to reach it: `redis://[:PASSWORD@]HOST:PORT[/DB]`
//! straight, or `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`
//! through Sentinel to the current master (the password is the master's; the
//! sentinels are asked without one). The account store and the shared directory
//! of several nodes both open their connections here, so both follow a
//! fail-over the same way.
//!
//! Through Sentinel, every new connection asks the sentinels again which server
//! is the master (`SENTINEL get-master-addr-by-name`), one after another, each
//! with its share of the caller's timeout, and keeps the connection to that
//! server only if it answers `ROLE` as a master. (The redis crate's own
//! Sentinel client sets no timeouts on its sync connections: a sentinel that
//! accepts and never answers would hold the caller for ever.) Each lookup
//! starts at the sentinel after the last one's first, so a stalled sentinel
//! costs one share, not every connection.
//!
//! Invariants: a password never appears in `describe()` or in an error;
//! `connect(timeout)` returns within about `timeout`, and every connection has
//! its read and write timeouts set before it is handed out; a call (`with`)
//! takes at most its deadline, waiting for the link's connection included,
//! and beyond `max_waiters` callers at once fails at once (`StoreBusy`), so a
//! stalled Redis holds no thread longer than that.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use crate::error::{Error, Result};
use crate::sys::unpoisoned;

/// A plain Redis URL starts so.
const PLAIN: &str = "redis://";
/// A Sentinel URL starts so.
const SENTINEL: &str = "redis+sentinel://";
/// Longest connect, read or write timeout of one attempt.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time one sentinel is given within a lookup.
const MIN_SHARE: Duration = Duration::from_millis(200);

/// A parsed Redis URL, able to open connections.
pub struct RedisLink {
    /// What a connection goes to.
    target: Target,
    /// `HOST:PORT`, or `sentinel HOST:PORT,…/MASTER`, for messages (no password).
    addr: String,
    /// The open connection, if any; dropped on error and re-opened on next use.
    conn: Mutex<Option<redis::Connection>>,
    /// Calls waiting for or holding `conn`.
    waiters: AtomicUsize,
    /// At most this many of them.
    max_waiters: usize,
}

/// A place among the waiters, given back on drop.
struct Waiter<'a>(&'a AtomicUsize);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A server, or the sentinels that know which server is the master.
enum Target {
    /// `redis://`: the client holds the parsed URL, password included (never
    /// printed).
    Plain(redis::Client),
    /// `redis+sentinel://`.
    Sentinel(Sentinels),
}

/// The sentinels of one master.
struct Sentinels {
    /// Each sentinel (no password).
    nodes: Vec<ConnectionInfo>,
    /// The master's name in the sentinels' configuration.
    master: String,
    /// The master's password and DB (never printed).
    master_info: RedisConnectionInfo,
    /// Lookups started: the next one asks sentinel `next % nodes.len()` first.
    next: AtomicUsize,
}

/// A `redis+sentinel://` URL taken apart.
#[derive(PartialEq, Eq)]
struct SentinelUrl {
    /// The sentinels' hosts (IPv6 without brackets) and ports.
    sentinels: Vec<(String, u16)>,
    /// The master's name.
    master: String,
    /// The master's password, %-escapes decoded.
    password: Option<String>,
    /// The master's DB.
    db: i64,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("db", &self.db)
            .finish()
    }
}

impl RedisLink {
    /// Parses `url`; does not connect. At most `max_waiters` calls of `with`
    /// wait at once.
    pub fn parse(url: &str, max_waiters: usize) -> Result<RedisLink> {
        let bad = |why: String| Error::StoreUnavailable(format!("bad redis URL: {why}"));
        let Some(rest) = url.strip_prefix(SENTINEL) else {
            let client = redis::Client::open(url).map_err(|e| bad(e.to_string()))?;
            let addr = client.get_connection_info().addr().to_string();
            return Ok(RedisLink {
                target: Target::Plain(client),
                addr,
                conn: Mutex::new(None),
                waiters: AtomicUsize::new(0),
                max_waiters,
            });
        };
        let parsed = parse_sentinel(rest).map_err(bad)?;
        let addr = format!(
            "sentinel {}/{}",
            parsed
                .sentinels
                .iter()
                .map(|(host, port)| host_port(host, *port))
                .collect::<Vec<_>>()
                .join(","),
            parsed.master
        );
        let nodes = parsed
            .sentinels
            .into_iter()
            .map(|(host, port)| ConnectionAddr::Tcp(host, port).into_connection_info())
            .collect::<redis::RedisResult<Vec<_>>>()
            .map_err(|e| bad(e.to_string()))?;
        let mut redis_info = RedisConnectionInfo::default().set_db(parsed.db);
        if let Some(password) = parsed.password {
            redis_info = redis_info.set_password(password);
        }
        Ok(RedisLink {
            target: Target::Sentinel(Sentinels {
                nodes,
                master: parsed.master,
                master_info: redis_info,
                next: AtomicUsize::new(0),
            }),
            addr,
            conn: Mutex::new(None),
            waiters: AtomicUsize::new(0),
            max_waiters,
        })
    }

    /// Is `text` a URL this module takes (`redis://` or `redis+sentinel://`)?
    pub fn is_url(text: &str) -> bool {
        text.starts_with(PLAIN) || text.starts_with(SENTINEL)
    }

    /// `HOST:PORT`, or `sentinel HOST:PORT,…/MASTER`, without the password.
    pub fn describe(&self) -> &str {
        &self.addr
    }

    /// A new connection, its connect, read and write timeouts `timeout`;
    /// through Sentinel, to the server the sentinels name master now, the
    /// lookup included in `timeout`. A plain `redis::Connection`, so also the
    /// way to subscribe (`as_pubsub()`; a subscriber that waits longer than
    /// `timeout` for a message sets its own read timeout first).
    pub fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let conn = match &self.target {
            Target::Plain(client) => client.get_connection_with_timeout(timeout)?,
            Target::Sentinel(sentinels) => sentinels.master(timeout)?,
        };
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }

    /// Runs `f` on the link's connection, connecting if needed; after a
    /// connection failure the connection is dropped and `f` is tried once more
    /// on a new one. All of it within `deadline`; beyond `max_waiters`
    /// callers, `StoreBusy` at once.
    pub fn with<T>(
        &self,
        deadline: Duration,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let end = Instant::now() + deadline;
        if self.waiters.fetch_add(1, Ordering::SeqCst) >= self.max_waiters {
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::StoreBusy(self.max_waiters));
        }
        let _waiter = Waiter(&self.waiters);
        let mut slot = loop {
            match self.conn.try_lock() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(p)) => break unpoisoned(Err(p)),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if Instant::now() >= end {
                        return Err(Error::StoreUnavailable(format!(
                            "redis {}: no answer to earlier requests within {:.1} s",
                            self.addr,
                            deadline.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        let mut last = None;
        for _attempt in 0..2 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let left = left.min(REDIS_TIMEOUT);
            if let Some(conn) = slot.as_mut()
                && (conn.set_read_timeout(Some(left)).is_err()
                    || conn.set_write_timeout(Some(left)).is_err())
            {
                *slot = None;
            }
            if slot.is_none() {
                match self.connect(left) {
                    Ok(c) => *slot = Some(c),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let Some(conn) = slot.as_mut() else { continue };
            match f(conn) {
                Ok(v) => return Ok(v),
                // The connection failed: a new one gets the command once more.
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    *slot = None;
                    last = Some(e);
                }
                // Redis answered with an error (WRONGTYPE, OOM, NOAUTH, ...): the
                // connection is fine, and asking again would not help.
                Err(e) => {
                    // A demoted or loading server: the next connection asks
                    // (the sentinels) again.
                    if e.kind() == redis::ErrorKind::Parse
                        || matches!(e.code(), Some("READONLY" | "LOADING" | "MASTERDOWN"))
                    {
                        *slot = None;
                    }
                    return Err(Error::StoreUnavailable(format!("redis {}: {e}", self.addr)));
                }
            }
        }
        let why = last.map_or_else(
            || format!("no answer within {:.1} s", deadline.as_secs_f64()),
            |e| e.to_string(),
        );
        Err(Error::StoreUnavailable(format!(
            "redis {}: {why}",
            self.addr
        )))
    }
}

impl Sentinels {
    /// A connection to the server the sentinels name master, checked to be
    /// one (`ROLE`), within `timeout`: each sentinel in turn gets an equal
    /// share of it (at least `MIN_SHARE`).
    fn master(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let end = Instant::now() + timeout;
        let n = self.nodes.len().max(1);
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let share = (timeout / n as u32).max(MIN_SHARE);
        let mut last = None;
        for i in 0..n {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(sentinel) = self.nodes.get((first + i) % n) else {
                break;
            };
            match self.ask(sentinel, share.min(left), end) {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            timed_out(format!(
                "no master found through the sentinels within {} ms",
                timeout.as_millis()
            ))
        }))
    }

    /// Asks one sentinel (within `share`) and connects to the master it
    /// names (by `end`).
    fn ask(
        &self,
        sentinel: &ConnectionInfo,
        share: Duration,
        end: Instant,
    ) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(sentinel.clone())?;
        let mut conn = client.get_connection_with_timeout(share)?;
        conn.set_read_timeout(Some(share))?;
        conn.set_write_timeout(Some(share))?;
        let named: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query(&mut conn)?;
        let Some((host, port)) = named else {
            return Err(io_error(
                std::io::ErrorKind::NotFound,
                "a sentinel does not know the master's name".into(),
            ));
        };
        let port: u16 = port.parse().map_err(|_| {
            io_error(
                std::io::ErrorKind::InvalidData,
                "a sentinel named a master with a bad port".into(),
            )
        })?;
        let left = end.saturating_duration_since(Instant::now()).max(MIN_SHARE);
        let info = ConnectionAddr::Tcp(host, port)
            .into_connection_info()?
            .set_redis_settings(self.master_info.clone());
        let mut master = redis::Client::open(info)?.get_connection_with_timeout(left)?;
        master.set_read_timeout(Some(left))?;
        master.set_write_timeout(Some(left))?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut master)?;
        match role.first() {
            Some(redis::Value::BulkString(r)) if r.as_slice() == b"master" => Ok(master),
            _ => Err(io_error(
                std::io::ErrorKind::ConnectionRefused,
                "the server a sentinel named is not (or no longer) the master".into(),
            )),
        }
    }
}

/// An I/O error as the redis crate's (so callers treat it as a failed connection).
fn io_error(kind: std::io::ErrorKind, why: String) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(kind, why))
}

fn timed_out(why: String) -> redis::RedisError {
    io_error(std::io::ErrorKind::TimedOut, why)
}

/// `HOST:PORT`, an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Takes apart what follows `redis+sentinel://`:
/// `[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`. An error names the bad part
/// and repeats no text of the URL but a number: never the password, even from a
/// mistyped URL that puts it where a host or a name should be.
fn parse_sentinel(rest: &str) -> std::result::Result<SentinelUrl, String> {
    if rest.contains(['?', '#']) {
        return Err("a redis+sentinel:// URL takes no ?query or #fragment".into());
    }
    let Some((authority, path)) = rest.split_once('/') else {
        return Err("no master name: the sentinels must be followed by /MASTER".into());
    };
    let (password, hosts) = match authority.rsplit_once('@') {
        None => (None, authority),
        Some((userinfo, hosts)) => {
            let Some(password) = userinfo.strip_prefix(':') else {
                return Err("before the sentinels only :PASSWORD@ may come (no user name)".into());
            };
            let password = percent_decode(password)
                .ok_or("the password has a bad %-escape or is not UTF-8")?;
            (Some(password).filter(|p| !p.is_empty()), hosts)
        }
    };
    if hosts.is_empty() {
        return Err("no sentinel HOST:PORT before /MASTER".into());
    }
    let sentinels = hosts
        .split(',')
        .enumerate()
        .map(|(i, part)| parse_host_port(part).map_err(|why| format!("sentinel {}: {why}", i + 1)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut segments = path.split('/');
    let master = segments.next().unwrap_or("").to_string();
    if master.is_empty() {
        return Err("no master name after the sentinels (…/MASTER)".into());
    }
    let db = match segments.next() {
        None | Some("") => 0,
        Some(text) => match text.parse::<i64>() {
            Ok(db) if db >= 0 => db,
            _ => return Err(bad_number("DB", text, "0 or more after /MASTER")),
        },
    };
    if segments.next().is_some() {
        return Err("unexpected text after /MASTER/DB".into());
    }
    Ok(SentinelUrl {
        sentinels,
        master,
        password,
        db,
    })
}

/// `HOST:PORT` or `[IPV6]:PORT`.
fn parse_host_port(part: &str) -> std::result::Result<(String, u16), String> {
    if part.is_empty() {
        return Err("empty (two commas, or a comma at the end?)".into());
    }
    let (host, port) = if let Some(bracketed) = part.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("no ] after the IPv6 address".into());
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err("no :PORT".into());
        };
        (host, port)
    } else {
        let Some((host, port)) = part.rsplit_once(':') else {
            return Err("no :PORT".into());
        };
        if host.contains(':') {
            return Err("an IPv6 address needs [brackets]".into());
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("no host before :PORT".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host.to_string(), p)),
        _ => Err(bad_number("port", port, "1 to 65535")),
    }
}

/// Why `text` is no good `what` (`range`: the numbers that are). `text` is
/// quoted only when it is a number, so no other text of the URL is ever
/// repeated in an error.
fn bad_number(what: &str, text: &str, range: &str) -> String {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
        format!("bad {what} {text:?} ({range})")
    } else {
        format!("bad {what}: not a number ({range})")
    }
}

/// `text` with each `%XX` replaced by its byte; `None` when an escape is
/// malformed or the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(
        sentinels: &[(&str, u16)],
        master: &str,
        password: Option<&str>,
        db: i64,
    ) -> SentinelUrl {
        SentinelUrl {
            sentinels: sentinels.iter().map(|(h, p)| (h.to_string(), *p)).collect(),
            master: master.into(),
            password: password.map(str::to_string),
            db,
        }
    }

    #[test]
    fn sentinel_forms_that_parse() {
        for (text, want) in [
            (
                "127.0.0.1:26379/mymaster",
                url(&[("127.0.0.1", 26379)], "mymaster", None, 0),
            ),
            (
                "a:1,b.example:2,[::1]:3/m/4",
                url(&[("a", 1), ("b.example", 2), ("::1", 3)], "m", None, 4),
            ),
            ("h:1/m/", url(&[("h", 1)], "m", None, 0)),
            (":s3cret@h:1/m", url(&[("h", 1)], "m", Some("s3cret"), 0)),
            (
                ":p%40ss%2Fw@h:1/m/2",
                url(&[("h", 1)], "m", Some("p@ss/w"), 2),
            ),
            (":@h:1/m", url(&[("h", 1)], "m", None, 0)),
        ] {
            assert_eq!(parse_sentinel(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_sentinel_forms_name_the_bad_part() {
        for (text, says) in [
            ("h:1", "no master name"),
            ("h:1/", "no master name"),
            ("/m", "no sentinel"),
            (":pw@/m", "no sentinel"),
            ("h:1,/m", "sentinel 2: empty"),
            ("h:1,,h:2/m", "sentinel 2: empty"),
            ("h/m", "sentinel 1: no :PORT"),
            ("h:x/m", "sentinel 1: bad port: not a number"),
            ("h:0/m", "sentinel 1: bad port \"0\""),
            ("h:1,h:70000/m", "sentinel 2: bad port \"70000\""),
            (":1/m", "sentinel 1: no host"),
            ("::1:1/m", "[brackets]"),
            ("[::1/m", "no ]"),
            ("h:1/m/x", "bad DB: not a number"),
            ("h:1/m/-1", "bad DB \"-1\""),
            ("h:1/m/0/z", "unexpected text"),
            ("h:1/m?db=1", "no ?query"),
            ("user:pw@h:1/m", "no user name"),
            (":p%zz@h:1/m", "bad %-escape"),
            (":p%ff@h:1/m", "not UTF-8"),
        ] {
            let err = parse_sentinel(text).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_password_stays_out_of_describe_and_errors() {
        let link = RedisLink::parse(
            "redis+sentinel://:hunter2@127.0.0.1:26379,127.0.0.1:26380/mymaster/3",
            1,
        )
        .unwrap();
        assert_eq!(
            link.describe(),
            "sentinel 127.0.0.1:26379,127.0.0.1:26380/mymaster"
        );
        let v6 = RedisLink::parse("redis+sentinel://[::1]:26379/m", 1).unwrap();
        assert_eq!(v6.describe(), "sentinel [::1]:26379/m");
        for text in [
            "redis+sentinel://:hunter2@h:x/m",
            "redis+sentinel://:hunter2@h:1",
            "redis+sentinel://:hunter2@/m",
            "redis+sentinel://hunter2@h:1/m",
            "redis+sentinel://:hunter2%@h:1/m",
            "redis+sentinel://:hunter2,h:1/m",
            "redis+sentinel://hunter2/m",
            "redis+sentinel://x:hunter2,h:1/m",
            "redis+sentinel://h:1/m/hunter2",
            "redis+sentinel://h:1/m/0/hunter2",
        ] {
            let Err(err) = RedisLink::parse(text, 1) else {
                panic!("{text} parsed")
            };
            let err = err.to_string();
            assert!(err.contains("bad redis URL"), "{text}: {err}");
            assert!(!err.contains("hunter2"), "{text}: {err}");
        }
        let plain = RedisLink::parse("redis://:hunter2@127.0.0.1:6379/0", 1).unwrap();
        assert_eq!(plain.describe(), "127.0.0.1:6379");
    }

    #[test]
    fn both_schemes_are_urls() {
        assert!(RedisLink::is_url("redis://h:1"));
        assert!(RedisLink::is_url("redis+sentinel://h:1/m"));
        assert!(!RedisLink::is_url("rediss://h:1"));
        assert!(!RedisLink::is_url("file:x"));
    }

    /// With every sentinel refusing, `connect` is an I/O error (the store's
    /// 503), within its timeout.
    #[test]
    fn no_sentinel_is_a_prompt_error() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let link = RedisLink::parse(
            &format!(
                "redis+sentinel://127.0.0.1:{},127.0.0.1:{}/m",
                ports[0], ports[1]
            ),
            1,
        )
        .unwrap();
        let start = Instant::now();
        let err = link.connect(Duration::from_secs(2)).err().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(err.is_io_error(), "{err}");
    }

    /// A sentinel that accepts and never answers costs `connect` its timeout,
    /// not more.
    #[test]
    fn a_silent_sentinel_costs_the_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let link = RedisLink::parse(&format!("redis+sentinel://127.0.0.1:{port}/m"), 1).unwrap();
        let start = Instant::now();
        let err = link.connect(Duration::from_millis(300)).err().unwrap();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(err.is_io_error(), "{err}");
    }
}
