//! The registrar (docs/PROTOCOL.md sections 1 and 4): `PUT /register/LABEL` opens
//! a plug for an authenticated owner of LABEL; `GET /pairings/LABEL` lists its
//! pairings.
//!
//! Invariants: nothing is done for a request before its credentials pass the
//! throttle and TOTP check; the token is never logged; the answer body of a 200 is
//! exactly `public_host:port` built from the config, never from the request; a
//! fixed-port label's rendezvous port is open before its plug is (a port the
//! relay cannot bind is that registration's error, and no plug opens).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::auth;
use crate::error::{Error, Result};
use crate::http::{Head, Response};
use crate::label;
use crate::metrics::Registration;
use crate::plug;
use crate::pool::{Label, Pairing};
use crate::state::Shared;
use crate::store::Account;

/// What opens a label's rendezvous port (`rendezvous::port_for`, handed in by
/// the server: the registrar sits beside the rendezvous, not above it).
pub type PortOpener = fn(&Arc<Shared>, &Arc<Label>) -> Result<u16>;

/// Answers a request addressed to the registrar host.
pub fn handle(
    shared: &Arc<Shared>,
    head: &Head,
    peer: SocketAddr,
    open_port: PortOpener,
) -> Result<Response> {
    let path = head.path();
    if let Some(name) = path.strip_prefix("/register/") {
        if head.method != "PUT" {
            return Err(Error::MethodNotAllowed("PUT"));
        }
        if let Some(to) = &shared.config.registrar_redirect {
            return Err(Error::Redirect(format!("{to}{}", head.target)));
        }
        if shared.stopping() || shared.withdrawn() {
            // A node sends the hidden server to another live node's registrar.
            let elsewhere = shared
                .directory
                .as_ref()
                .and_then(|d| d.registrar_elsewhere());
            return Err(match elsewhere {
                Some((node, port)) => {
                    Error::Redirect(shared.config.registrar_url(&node, port, &head.target))
                }
                None => Error::Limit("draining"),
            });
        }
        let name = label::validate(name)?;
        let account = authorize(shared, head, peer, &name)?;
        let lab = shared.labels.get_or_create(&name);
        let fixed = account.fixed_port(&name);
        // A record written by another tool (the original's users page) may
        // own the reserved label or name a port this relay keeps for itself.
        shared.config.check_entry(&label::Entry {
            name: name.clone(),
            port: fixed,
        })?;
        lab.set_fixed_port(fixed);
        if fixed.is_some() {
            // A fixed port listens from the label's first registration on; one
            // the relay cannot bind is this registration's error.
            open_port(shared, &lab)?;
        }
        let port = plug::open(shared, lab, peer.ip())?;
        let mut r = Response::text(200, "");
        // Exactly HOST:PORT, as the original: strict parsers fail on a newline.
        r.body = shared.config.public_addr(port).into_bytes();
        r.note = format!("plug {port}");
        shared.metrics.registration(Registration::Ok);
        Ok(r)
    } else if let Some(name) = path.strip_prefix("/pairings/") {
        if head.method != "GET" {
            return Err(Error::MethodNotAllowed("GET"));
        }
        let name = label::validate(name)?;
        authorize(shared, head, peer, &name)?;
        let list = pairings(shared, &name);
        let body =
            serde_json::to_vec(&list).map_err(|e| Error::Encode(format!("pairings: {e}")))?;
        let mut r = Response::text(200, "");
        r.content_type = "application/json";
        r.body = body;
        r.note = format!("{} pairings", list.len());
        Ok(r)
    } else {
        Err(Error::NotFound)
    }
}

/// The label's last pairings, oldest first: of every node when this relay is
/// one of several (this node's own when Redis cannot say).
fn pairings(shared: &Shared, name: &str) -> Vec<Pairing> {
    let here = || {
        shared
            .labels
            .get(name)
            .map(|l| l.pairings())
            .unwrap_or_default()
    };
    let Some(dir) = &shared.directory else {
        return here();
    };
    match dir.pairings(name) {
        // In the contract's order of fields (a `Pairing`, not a JSON map).
        Ok(list) => list
            .iter()
            .filter_map(|text| serde_json::from_str(text).ok())
            .collect(),
        Err(e) => {
            log::warn!("pairings of {name}: this node's only ({e})");
            here()
        }
    }
}

/// The account behind the request's `Authorization`, if it owns `label`.
fn authorize(shared: &Shared, head: &Head, peer: SocketAddr, label: &str) -> Result<Account> {
    let result = (|| {
        // A node's tokens and steps are compared with the other nodes': its
        // clock must agree with Redis's (registrations and pairings alike).
        if let Some(dir) = &shared.directory {
            dir.clock_ok()?;
        }
        let value = head.authorization.as_deref().ok_or(Error::AuthMissing)?;
        let creds = auth::parse_authorization(value)?;
        let account =
            shared
                .guard
                .authenticate(&shared.store, &creds, peer.ip(), crate::sys::unix_time())?;
        if !account.owns(label) {
            return Err(Error::Forbidden {
                id: account.uuid,
                label: label.to_string(),
            });
        }
        Ok(account)
    })();
    if let Err(e) = &result {
        shared.metrics.registration(match e {
            Error::AuthMissing | Error::AuthFailed => Registration::Unauthorized,
            Error::Forbidden { .. } => Registration::Forbidden,
            Error::Throttled(_) => Registration::Throttled,
            Error::Replay(_) => Registration::Replay,
            Error::StoreUnavailable(_) | Error::StoreBusy(_) | Error::ClockOff { .. } => {
                Registration::StoreUnavailable
            }
            _ => Registration::BadRequest,
        });
        if matches!(e, Error::AuthFailed) {
            shared.metrics.auth_failure();
        }
        if matches!(e, Error::StoreUnavailable(_) | Error::StoreBusy(_)) {
            shared.metrics.store_error();
        }
    }
    result
}
