//! Where Redis is and how to reach it: `redis://[:PASSWORD@]HOST:PORT[/DB]`
//! straight, or `redis+sentinel://…` through Sentinel to the current master.
//! The account store and the shared directory of several nodes both reach
//! Redis here, so both follow a fail-over the same way.
//!
//! Invariants: a password never appears in `describe()` or in an error; every
//! connection has its read and write timeouts set before it is used; a call
//! (`with`) takes at most its deadline, waiting for the connection included,
//! and beyond `max_waiters` callers at once fails at once (`StoreBusy`), so a
//! stalled Redis holds no thread longer than that.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::unpoisoned;

/// Longest connect, read or write timeout of one attempt.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed Redis URL, and one connection to it opened on first use.
pub struct RedisLink {
    /// The client (holds the parsed URL, password included: never printed).
    client: redis::Client,
    /// `HOST:PORT` for messages (no password).
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

impl RedisLink {
    /// Parses `url`; does not connect. At most `max_waiters` calls of `with`
    /// wait at once.
    pub fn parse(url: &str, max_waiters: usize) -> Result<RedisLink> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::StoreUnavailable(format!("bad redis URL: {e}")))?;
        let addr = client.get_connection_info().addr().to_string();
        Ok(RedisLink {
            client,
            addr,
            conn: Mutex::new(None),
            waiters: AtomicUsize::new(0),
            max_waiters,
        })
    }

    /// Is `text` a URL this module takes?
    pub fn is_url(text: &str) -> bool {
        text.starts_with("redis://")
    }

    /// `HOST:PORT` (or the sentinels), without the password.
    pub fn describe(&self) -> &str {
        &self.addr
    }

    /// A new connection of its own (a subscriber's), its connect, read and
    /// write timeouts `timeout`.
    pub fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(timeout)?;
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
                    if e.kind() == redis::ErrorKind::Parse {
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
