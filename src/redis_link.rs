//! Where Redis is and how to reach it: `redis://[:PASSWORD@]HOST:PORT[/DB]`
//! straight, or `redis+sentinel://…` through Sentinel to the current master.
//! The account store and the shared directory of several nodes both open their
//! connections here, so both follow a fail-over the same way.
//!
//! Invariants: a password never appears in `describe()` or in an error; every
//! connection has its read and write timeouts set before it is handed out.

use std::time::Duration;

use crate::error::{Error, Result};

/// A parsed Redis URL, able to open connections.
pub struct RedisLink {
    /// The client (holds the parsed URL, password included: never printed).
    client: redis::Client,
    /// `HOST:PORT` for messages (no password).
    addr: String,
}

impl RedisLink {
    /// Parses `url`; does not connect.
    pub fn parse(url: &str) -> Result<RedisLink> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::StoreUnavailable(format!("bad redis URL: {e}")))?;
        let addr = client.get_connection_info().addr().to_string();
        Ok(RedisLink { client, addr })
    }

    /// Is `text` a URL this module takes?
    pub fn is_url(text: &str) -> bool {
        text.starts_with("redis://")
    }

    /// `HOST:PORT` (or the sentinels), without the password.
    pub fn describe(&self) -> &str {
        &self.addr
    }

    /// A new connection, its connect, read and write timeouts `timeout`.
    pub fn connect(&self, timeout: Duration) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        Ok(conn)
    }
}
