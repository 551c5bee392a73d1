//! Counters for operators (`GET /metrics` in the Prometheus text format), kept in
//! atomics so the hot relay path only adds to integers.
//!
//! Invariants: every label value is one of a fixed set chosen in the code
//! (`Registration`, `http::STATUSES`, `Limit`: one counter each), never a peer's
//! string; every value of those sets is exported from the start, at 0, so a
//! first event is not lost to `rate()`.

use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::http::STATUSES;
use crate::limits::{Limit, named_set};

named_set! {
    /// How a registration (or a pairings request) ended, as `/metrics` counts it.
    Registration {
        /// A plug was opened.
        Ok = "ok",
        /// No credentials, an unknown ID or a wrong token.
        Unauthorized = "unauthorized",
        /// The ID does not own the label.
        Forbidden = "forbidden",
        /// Too many failures.
        Throttled = "throttled",
        /// A token already used from another address.
        Replay = "replay",
        /// The account store did not answer.
        StoreUnavailable = "store_unavailable",
        /// Malformed credentials.
        BadRequest = "bad_request",
    }
}

/// The relay's counters.
#[derive(Default)]
pub struct Metrics {
    /// Registrations by result, in `Registration::ALL`'s order.
    registrations: [AtomicU64; Registration::ALL.len()],
    /// Requests on the well-known port by status, in `STATUSES`' order.
    requests: [AtomicU64; STATUSES.len()],
    /// Refusals by the limit that caused them, in `Limit::ALL`'s order.
    refusals: [AtomicU64; Limit::ALL.len()],
    /// Pairs opened.
    pairs_opened: AtomicU64,
    /// Pairs closed.
    pairs_closed: AtomicU64,
    /// Pairs closed by `idle_timeout`.
    pairs_idle_closed: AtomicU64,
    /// Octets mobile → hidden.
    bytes_up: AtomicU64,
    /// Octets hidden → mobile.
    bytes_down: AtomicU64,
    /// Failed authentications (unknown ID, wrong or replayed token).
    auth_failures: AtomicU64,
    /// Account store errors.
    store_errors: AtomicU64,
    /// Rendezvous ports open now.
    rendezvous_open: AtomicI64,
}

/// The rows `{key="value"} count` of a fixed set's values and their counters.
fn rows(
    key: &str,
    values: impl Iterator<Item = impl Display>,
    counts: &[AtomicU64],
) -> Vec<(String, u64)> {
    values
        .zip(counts)
        .map(|(k, n)| (format!("{{{key}=\"{k}\"}}"), n.load(Relaxed)))
        .collect()
}

impl Metrics {
    /// A registration ended with `result`.
    pub fn registration(&self, result: Registration) {
        self.registrations[result as usize].fetch_add(1, Relaxed);
    }
    /// A request on the well-known port was answered `status` (one of
    /// `http::STATUSES`; any other is counted as the 500 it is answered as).
    pub fn request(&self, status: u16) {
        let at = |status| STATUSES.iter().position(|(s, _)| *s == status);
        if let Some(i) = at(status).or_else(|| at(500)) {
            self.requests[i].fetch_add(1, Relaxed);
        }
    }
    /// A newcomer was refused by `limit`.
    pub fn refused(&self, limit: Limit) {
        self.refusals[limit as usize].fetch_add(1, Relaxed);
    }
    /// A pair was closed by `idle_timeout` (also counted by `pair_closed`).
    pub fn pair_idle_closed(&self) {
        self.pairs_idle_closed.fetch_add(1, Relaxed);
    }
    /// A pair began relaying.
    pub fn pair_opened(&self) {
        self.pairs_opened.fetch_add(1, Relaxed);
    }
    /// A pair ended after moving `up` and `down` octets.
    pub fn pair_closed(&self, up: u64, down: u64) {
        self.pairs_closed.fetch_add(1, Relaxed);
        self.bytes_up.fetch_add(up, Relaxed);
        self.bytes_down.fetch_add(down, Relaxed);
    }
    /// An authentication failed.
    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Relaxed);
    }
    /// The store failed.
    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Relaxed);
    }
    /// A rendezvous port opened (+1) or closed (-1).
    pub fn rendezvous_open(&self, delta: i64) {
        self.rendezvous_open.fetch_add(delta, Relaxed);
    }

    /// The Prometheus text exposition; `waiting` is responders per label and
    /// `pairs_active` the pairs relaying now (the relay's table says both).
    pub fn render(&self, waiting: &[(String, usize)], pairs_active: usize) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: &AtomicU64| vec![(String::new(), v.load(Relaxed))];
        let counters = [
            (
                "pairs_opened",
                &self.pairs_opened,
                "Pairs that began relaying.",
            ),
            ("pairs_closed", &self.pairs_closed, "Pairs that ended."),
            (
                "pairs_idle_closed",
                &self.pairs_idle_closed,
                "Pairs closed after idle_timeout with no octet either way.",
            ),
            (
                "auth_failures",
                &self.auth_failures,
                "Failed authentications.",
            ),
            ("store_errors", &self.store_errors, "Account store errors."),
        ];
        family(
            "taas_registrations_total",
            "counter",
            "Registrations by result.",
            rows(
                "result",
                Registration::ALL.iter().map(|r| r.name()),
                &self.registrations,
            ),
        );
        family(
            "taas_requests_total",
            "counter",
            "Requests on the well-known port by status.",
            rows("status", STATUSES.iter().map(|s| s.0), &self.requests),
        );
        family(
            "taas_refusals_total",
            "counter",
            "Newcomers refused, by limit.",
            rows("limit", Limit::ALL.iter(), &self.refusals),
        );
        for (name, value, help) in counters {
            family(&format!("taas_{name}_total"), "counter", help, one(value));
        }
        family(
            "taas_relayed_bytes_total",
            "counter",
            "Octets relayed, by direction (counted when a pair closes).",
            vec![
                ("{direction=\"up\"}".into(), self.bytes_up.load(Relaxed)),
                ("{direction=\"down\"}".into(), self.bytes_down.load(Relaxed)),
            ],
        );
        family(
            "taas_pairs_active",
            "gauge",
            "Pairs relaying now.",
            vec![(String::new(), pairs_active as u64)],
        );
        family(
            "taas_waiting_responders",
            "gauge",
            "Responders waiting, by label.",
            waiting
                .iter()
                .map(|(l, n)| (format!("{{label=\"{l}\"}}"), *n as u64))
                .collect(),
        );
        family(
            "taas_rendezvous_ports_open",
            "gauge",
            "Rendezvous ports open now.",
            vec![(
                String::new(),
                self.rendezvous_open.load(Relaxed).max(0) as u64,
            )],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_label_sets_are_exported_at_zero_from_the_start() {
        let text = Metrics::default().render(&[], 0);
        for limit in Limit::ALL {
            let row = format!("taas_refusals_total{{limit=\"{limit}\"}} 0");
            assert!(text.lines().any(|l| l == row), "{row}");
        }
        for result in Registration::ALL {
            let row = format!("taas_registrations_total{{result=\"{}\"}} 0", result.name());
            assert!(text.lines().any(|l| l == row), "{row}");
        }
        for (status, _) in STATUSES {
            let row = format!("taas_requests_total{{status=\"{status}\"}} 0");
            assert!(text.lines().any(|l| l == row), "{row}");
        }
        assert!(text.lines().any(|l| l == "taas_pairs_idle_closed_total 0"));
        // A count shows in its own row only.
        let m = Metrics::default();
        m.refused(Limit::MaxWaiting);
        let text = m.render(&[], 1);
        assert!(text.contains("taas_refusals_total{limit=\"max_waiting\"} 1\n"));
        assert!(text.contains("taas_refusals_total{limit=\"pair_wait\"} 0\n"));
        assert!(text.contains("taas_pairs_active 1\n"));
    }
}
