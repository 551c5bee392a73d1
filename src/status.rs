//! The status listener for operators (`status_listen`, loopback by default): plain
//! HTTP, `GET /metrics` (Prometheus text), `GET /status` (JSON), `GET /ready`.
//!
//! Invariants: it shares nothing with the well-known port but the counters; at most
//! `MAX_STATUS_CONNS` requests are served at once, each in its own thread, its
//! head under `STATUS_HEAD_TIMEOUT` and its answer under `STATUS_TIMEOUT`.

use std::net::{SocketAddr, TcpListener, TcpStream};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::http::{self, DeadlineStream, Response};
use crate::server::{SMALL_STACK, Shared, spawn, wake};

/// Requests served at once, each in its own thread; more are closed (a
/// scraper needs one; a few idle connections must not shut it out).
pub const MAX_STATUS_CONNS: usize = 64;
/// Deadline for a status request's head (a scraper sends it at once).
pub const STATUS_HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline for writing the answer.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A running status listener; dropping it stops it.
pub struct StatusServer {
    /// Where it listens.
    addr: SocketAddr,
    /// Set to stop the accept loop.
    stop: Arc<AtomicBool>,
}

impl StatusServer {
    /// Binds `addr` and serves the relay's `shared` state.
    pub fn bind(addr: SocketAddr, shared: Arc<Shared>) -> Result<StatusServer> {
        let listener = crate::server::listen(addr)
            .map_err(|e| Error::Usage(format!("cannot listen on status_listen {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("status bind", e))?;
        if !addr.ip().is_loopback() {
            log::warn!(
                "status listener on {addr} is not loopback: anyone who reaches it sees the metrics"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        spawn("status", SMALL_STACK, move || {
            accept_loop(&listener, &shared, &s)
        })?;
        log::info!("status on http://{addr}/metrics, /status, /ready");
        Ok(StatusServer { addr, stop })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        wake(self.addr);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_STATUS_CONNS {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (s, b) = (shared.clone(), busy.clone());
        let spawned = spawn("status-conn", SMALL_STACK, move || {
            serve(&s, stream);
            b.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::SeqCst);
        }
    }
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
            "/metrics" => {
                let mut r = Response::text(200, "");
                r.body = shared.metrics.render(&waiting(shared)).into_bytes();
                r.content_type = "text/plain; version=0.0.4";
                r
            }
            "/status" => {
                let mut r = Response::text(200, "");
                r.body = status_json(shared).into_bytes();
                r.content_type = "application/json";
                r
            }
            "/ready" => match shared.store.ping() {
                Ok(()) if !shared.stopping() => Response::text(200, "ready"),
                Ok(()) => Response::text(503, "stopping"),
                Err(e) => Response::text(503, e.to_string()),
            },
            _ => Response::from_error(&Error::NotFound),
        },
        Err(e) => Response::from_error(&e),
    };
    let _ = response.write_to(&mut io);
}

/// Responders waiting per label, by label name.
fn waiting(shared: &Shared) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = shared
        .labels
        .all()
        .iter()
        .map(|l| (l.name.clone(), l.waiting()))
        .collect();
    v.sort();
    v
}

fn status_json(shared: &Shared) -> String {
    let c = &shared.config;
    let labels: Vec<serde_json::Value> = waiting(shared)
        .into_iter()
        .map(|(name, n)| serde_json::json!({ "label": name, "waiting": n }))
        .collect();
    serde_json::json!({
        "version": crate::version(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "labels": labels,
        // The same figure as /metrics' taas_pairs_active: pairs relaying now.
        "pairs_active": shared.metrics.pairs_active(),
        // Pair slots held, mobiles waiting for their first octet included.
        "pair_slots": shared.pairs.count(),
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
