//! The status listener for operators (`status_listen`, loopback by default): plain
//! HTTP, `GET /metrics` (Prometheus text), `GET /status` (JSON), `GET /ready`.
//!
//! Invariants: it shares nothing with the well-known port but the counters; at most
//! `MAX_STATUS_CONNS` requests are served at once, each in its own thread, its
//! head under `STATUS_HEAD_TIMEOUT` and its answer under `STATUS_TIMEOUT`.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::http::{self, DeadlineStream, Response, Serving};
use crate::state::Shared;
use crate::sys::SMALL_STACK;

/// Requests served at once, each in its own thread; more are closed (a
/// scraper needs one; a few idle connections must not shut it out).
pub const MAX_STATUS_CONNS: usize = 64;
/// Deadline for a status request's head (a scraper sends it at once).
pub const STATUS_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline for writing the answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves the relay's `shared` state there until dropped.
pub fn bind(addr: SocketAddr, shared: Arc<Shared>) -> Result<Serving> {
    let (listener, addr) = http::bind("status_listen", addr)?;
    if !addr.ip().is_loopback() {
        log::warn!(
            "status listener on {addr} is not loopback: anyone who reaches it sees the metrics"
        );
    }
    let serve = move |stream, _| serve(&shared, stream);
    let serving = Serving::start(
        listener,
        addr,
        MAX_STATUS_CONNS,
        ("status-conn", SMALL_STACK),
        serve,
    )?;
    log::info!("status on http://{addr}/metrics, /status, /ready");
    Ok(serving)
}

fn serve(shared: &Shared, stream: TcpStream) {
    let mut io = DeadlineStream {
        inner: stream,
        deadline: Instant::now() + STATUS_HEAD_TIMEOUT,
    };
    let head = http::read_head(&mut io, 4096);
    io.deadline = Instant::now() + STATUS_TIMEOUT;
    let response = match head {
        Ok(head) if head.method != "GET" => Response::from_error(&Error::MethodNotAllowed("GET")),
        Ok(head) => match head.path() {
            "/metrics" => Response::with_body(
                200,
                "text/plain; version=0.0.4",
                shared.metrics_text().into_bytes(),
            ),
            "/status" => {
                Response::with_body(200, "application/json", status_json(shared).into_bytes())
            }
            "/ready" => match shared.store.ping() {
                Ok(()) if !shared.stopping() && !shared.withdrawn() => Response::text(200, "ready"),
                Ok(()) => Response::text(503, "stopping"),
                Err(e) => Response::text(503, e.to_string()),
            },
            _ => Response::from_error(&Error::NotFound),
        },
        Err(e) => Response::from_error(&e),
    };
    let _ = response.write_to(&mut io);
}

fn status_json(shared: &Shared) -> String {
    let c = &shared.config;
    let snap = shared.snapshot();
    let labels: Vec<serde_json::Value> = snap
        .labels
        .iter()
        .map(|l| serde_json::json!({ "label": l.name, "waiting": l.waiting }))
        .collect();
    let node = shared.directory.as_ref().map(|d| d.status());
    serde_json::json!({
        "version": crate::version(),
        "node": node,
        "uptime_seconds": snap.uptime_seconds,
        "labels": labels,
        // The same figure as /metrics' taas_pairs_active: pairs relaying now.
        "pairs_active": snap.pairs_active,
        // Pair slots held, mobiles waiting for their first octet included.
        "pair_slots": snap.pair_slots,
        "limits": {
            "max_connections": c.max_connections,
            "max_connections_per_ip": c.max_connections_per_ip,
            "max_pairs": c.max_pairs,
            "max_pairs_per_ip": c.max_pairs_per_ip,
            "first_octet_timeout": c.first_octet_timeout.as_secs_f64(),
            "max_waiting": c.max_waiting,
            "max_head": c.max_head,
            "head_timeout": c.head_timeout.as_secs_f64(),
            "plug_timeout": c.plug_timeout.as_secs_f64(),
            "pair_wait": c.pair_wait.as_secs_f64(),
            "rendezvous_idle": c.rendezvous_idle.as_secs_f64(),
            "auth_fail_budget": c.auth_fail_budget,
            "auth_fail_refill": c.auth_fail_refill.as_secs_f64(),
        },
    })
    .to_string()
}
