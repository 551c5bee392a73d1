//! taas: a small, auditable relay that lets servers hidden behind NAT be reached
//! by mobile clients through a VPS, with the TAAS protocol (`PROTOCOL.md`).
//!
//! # The data flow, file by file
//!
//! 1. `server`: one blocking listener on the well-known port. The accept loop only
//!    counts (limits) and spawns a thread per connection.
//! 2. In that thread: the TLS handshake (`cert` made the rustls config; SIGHUP
//!    swaps in a new one for later connections) and the request head (`http`),
//!    under one deadline and a size cap.
//! 3. `server::route` sends the head by its `Host` to the registrar or to a label.
//! 4. `registrar`: `PUT /register/LABEL` — `auth` parses `Authorization: TOTP`,
//!    checks the throttle, looks the ID up in `store`, verifies the token
//!    (`totp`) and the replay rule; then `plug` opens a port that takes one TCP
//!    connection from the hidden server and puts it in the label's pool (`pool`).
//!    `GET /pairings/LABEL` lists the label's pairings.
//! 5. `LABEL.servers_domain`: a 307 to the label's `rendezvous` port. Each
//!    connection there takes a responder once it has something to relay: at
//!    accept the oldest that already spoke, else the oldest at its first octet.
//! 6. `relay` copies octets both ways until both directions end.
//!
//! Around it: `config` (the validated TOML), `error` (one enum, one status
//! mapping), `label` (DNS label rules), `logging`, `metrics` and `status` (for
//! operators), and the operator tools on top of the core: `provision`
//! (provisioning files), `cert` (the relay's name-constrained CA and the
//! certificates it issues), `agent` (the hidden side; `agent::terminate` ends
//! TLS there for `taas expose --tls`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod auth;
pub mod cert;
pub mod config;
pub mod error;
pub mod http;
pub mod label;
pub mod logging;
pub mod metrics;
pub mod plug;
pub mod pool;
pub mod provision;
pub mod registrar;
pub mod relay;
pub mod rendezvous;
pub mod server;
pub mod status;
pub mod store;
pub mod totp;

pub use config::Config;
pub use error::{Error, Result};
pub use server::Server;

/// The version, and the git revision when the build knew it.
pub fn version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (git ",
        env!("TAAS_GIT_REV"),
        ")"
    )
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
