//! The plug (docs/PROTOCOL.md section 1): after a 200, a port that accepts exactly one
//! TCP connection — by default only from the registering address — within
//! `plug_timeout`, then stops listening. The connection joins the label's pool.
//!
//! Invariants: the plug's thread lives only until its one connection or its
//! deadline (it polls a non-blocking listener, at first every millisecond, backing
//! off to `MAX_TICK`), so no thread outlives a registration; a connection from
//! another address is closed at once and logged, and the plug keeps waiting.

use std::io;
use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::limits::Limit;
use crate::pool::{Label, Responder};
use crate::state::Shared;
use crate::sys::{SMALL_STACK, set_keepalive, spawn};

/// Longest sleep between two polls of a plug (a hidden server connects within
/// milliseconds of its 200; this bounds the wake-ups of a slow one).
pub const MAX_TICK: Duration = Duration::from_millis(50);

/// Opens a plug for `label` and returns its port. When the label's pool and
/// open plugs already hold `max_waiting`, `Error::PoolFull` (503 with
/// Retry-After) and no plug.
pub fn open(shared: &Arc<Shared>, label: Arc<Label>, registrant: IpAddr) -> Result<u16> {
    let Some(slot) = label.plug_slot() else {
        let detail = format!(
            "{} from {registrant} ({} waiting, {} plugs open)",
            label.name,
            label.waiting(),
            label.plugs_open()
        );
        shared.refuse(Limit::MaxWaiting, &detail);
        return Err(Error::PoolFull {
            label: label.name.clone(),
            max: label.max_waiting(),
        });
    };
    let listener = shared.bind_free_port()?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("plug bind", e))?
        .port();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("plug bind", e))?;
    let s = shared.clone();
    spawn("plug", SMALL_STACK, move || {
        wait(&s, &label, &listener, port, registrant);
        drop(slot);
    })
    .map_err(|e| Error::io("spawn thread", e))?;
    Ok(port)
}

fn wait(shared: &Shared, label: &Label, listener: &TcpListener, port: u16, registrant: IpAddr) {
    let deadline = Instant::now() + shared.config.plug_timeout;
    let mut tick = Duration::from_millis(1);
    // Connections refused for their address and accept errors: the first of
    // each is logged, the rest counted in the closing line.
    let (mut refused, mut errors) = (0u32, 0u32);
    while !shared.stopping() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!(
                "plug {port} for {}: no connection within {} ({} s); refused {refused} from other addresses, {errors} accept errors",
                label.name,
                Limit::PlugTimeout,
                shared.config.plug_timeout.as_secs_f64()
            );
            shared.metrics.refused(Limit::PlugTimeout);
            return;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if shared.config.plug_same_ip && peer.ip() != registrant {
                    refused += 1;
                    if refused == 1 {
                        log::warn!(
                            "plug {port} for {}: refused {peer}, registered from {registrant} ({})",
                            label.name,
                            Limit::PlugSameIp
                        );
                    }
                    shared.metrics.refused(Limit::PlugSameIp);
                    continue;
                }
                // Set now, off the way of the mobile client it will be paired with.
                if let Err(e) = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_nodelay(true))
                    .and_then(|()| set_keepalive(&stream))
                {
                    log::warn!("plug {port} for {}: {peer}: {e}", label.name);
                    return;
                }
                if let Some(old) = label.push(Responder { stream, peer }) {
                    log::info!("{}: pool full, closed oldest responder {old}", label.name);
                }
                log::info!(
                    "plug {port} for {}: responder {peer} waiting ({} in pool)",
                    label.name,
                    label.waiting()
                );
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(tick.min(left));
                tick = (tick * 2).min(MAX_TICK);
            }
            Err(e) => {
                errors += 1;
                if errors == 1 {
                    log::warn!("plug {port} for {}: accept: {e}", label.name);
                }
                std::thread::sleep(MAX_TICK.min(left));
            }
        }
    }
}
