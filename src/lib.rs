//! taas: a small, auditable relay that lets servers hidden behind NAT be reached
//! by mobile clients through a VPS, with the TAAS protocol (`docs/PROTOCOL.md`;
//! the operator's interface is `docs/INTERFACE.md`).
//!
//! # The data flow, file by file
//!
//! 1. `server`: one blocking listener on the well-known port. The accept loop only
//!    counts (`limits`) and spawns a thread per connection.
//! 2. In that thread: the TLS handshake (`tls`; SIGHUP swaps in a new
//!    configuration for later connections) and the request head (`http`), under
//!    one deadline and a size cap.
//! 3. `route` sends the head by its `Host` to the registrar or to a label.
//! 4. `registrar`: `PUT /register/LABEL` — `auth` parses `Authorization: TOTP`,
//!    checks the throttle, looks the ID up in `store`, verifies the token
//!    (`totp`) and the replay rule; then `plug` opens a port that takes one TCP
//!    connection from the hidden server and puts it in the label's pool (`pool`).
//!    `GET /pairings/LABEL` lists the label's pairings.
//! 5. `LABEL.servers_domain`: `rendezvous` answers a 307 to the label's
//!    rendezvous port. Each connection there takes a responder from the pool once
//!    it has something to relay: at accept the oldest that already spoke, else
//!    the oldest at its first octet.
//! 6. `relay` copies octets both ways until both directions end.
//!
//! A relay that is one node of several on one Redis (`node`) also runs
//! `node`: a heartbeat that writes this node's offers (labels with responders
//! waiting here, their rendezvous ports) to the shared `directory`, a
//! subscriber that keeps the other nodes' offers in a local cache, from which
//! `rendezvous` answers a 307 to another node when no responder waits here, and
//! a worker that records pairings there; `auth` keeps its budgets and replay
//! rule there too. `redis_link` is how the store and the directory reach Redis
//! (straight, or through Sentinel).
//!
//! What every step reads is `state` (the configuration, the store, the labels,
//! the pairs, the counters); below it sit `config` (the validated TOML), `error`
//! (one enum, one status mapping), `label` (DNS label rules), `limits` (every
//! limit named once), `logging`, `metrics`, and `sys` (threads, sockets, random
//! bytes, private files, signals: the bottom layer, importing nothing of the
//! crate). `status` serves `/metrics`, `/status` and `/ready` to operators. On
//! top, the operator tools: `provision` (provisioning files), `cert` (the
//! relay's name-constrained CA and the certificates it issues), `admin` (the
//! accounts page), `agent` (the hidden side; `agent::terminate` ends TLS there
//! for `taas expose --tls`).
//!
//! # Layers
//!
//! Each module imports only from its own layer or those below it, and nothing
//! imports in a circle (`tests/architecture.rs` checks both):
//!
//! | layer | modules |
//! | --- | --- |
//! | tools | `admin`, `agent`, `cert`, `provision` (only `main.rs` knows the CLI) |
//! | relay | `server` |
//! | steps | `registrar` → `plug` → `pool`; `node` → `rendezvous` → `pool` → `relay`; `status`, `route` |
//! | state | `state` |
//! | core | `auth`, `config`, `directory`, `pool`, `store`, `tls`, `metrics` |
//! | rules | `http`, `label`, `limits`, `logging`, `redis_link`, `relay`, `totp` |
//! | base | `error`, `sys` |
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod auth;
pub mod cert;
pub mod config;
pub mod directory;
pub mod error;
pub mod http;
pub mod label;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod plug;
pub mod pool;
pub mod provision;
pub mod redis_link;
pub mod registrar;
pub mod relay;
pub mod rendezvous;
pub mod route;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
pub mod sys;
pub mod tls;
pub mod totp;

pub use config::Config;
pub use error::{Error, Result};
pub use server::Server;
pub use sys::unix_time;

/// The version, and the git revision when the build knew it.
pub fn version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        " (git ",
        env!("TAAS_GIT_REV"),
        ")"
    )
}
