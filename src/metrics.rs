//! Counters for operators (`GET /metrics` in the Prometheus text format), kept with
//! atomics and small maps so the hot relay path only adds to integers.
//!
//! Invariant: every label value is one of a fixed set chosen in the code (results,
//! statuses, limit names), never a peer's string, so the maps stay small.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Every limit a newcomer can be refused by (`taas_refusals_total{limit}`).
pub const REFUSAL_LIMITS: [&str; 9] = [
    "first_octet_timeout",
    "max_connections",
    "max_connections_per_ip",
    "max_pairs",
    "max_pairs_per_ip",
    "max_waiting",
    "pair_wait",
    "plug_same_ip",
    "plug_timeout",
];
/// Every result of a registration (`taas_registrations_total{result}`).
pub const REGISTRATION_RESULTS: [&str; 7] = [
    "bad_request",
    "forbidden",
    "ok",
    "replay",
    "store_unavailable",
    "throttled",
    "unauthorized",
];
/// Every status the well-known port answers (`taas_requests_total{status}`).
pub const REQUEST_STATUSES: [u16; 14] = [
    200, 307, 400, 401, 403, 404, 405, 408, 409, 421, 429, 431, 500, 503,
];

/// The relay's counters. Counters whose labels come from a fixed set are
/// exported at 0 for each value from the start, so a first event is not lost
/// to `rate()` (Prometheus' instrumentation guidance).
pub struct Metrics {
    /// Registrations by result.
    registrations: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests on the well-known port by status.
    requests: Mutex<BTreeMap<u16, u64>>,
    /// Refusals by the limit that caused them.
    refusals: Mutex<BTreeMap<&'static str, u64>>,
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

impl Default for Metrics {
    fn default() -> Metrics {
        let zeros = |keys: &[&'static str]| Mutex::new(keys.iter().map(|k| (*k, 0)).collect());
        Metrics {
            registrations: zeros(&REGISTRATION_RESULTS),
            requests: Mutex::new(REQUEST_STATUSES.iter().map(|s| (*s, 0)).collect()),
            refusals: zeros(&REFUSAL_LIMITS),
            pairs_opened: AtomicU64::new(0),
            pairs_closed: AtomicU64::new(0),
            pairs_idle_closed: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            rendezvous_open: AtomicI64::new(0),
        }
    }
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(0) += 1;
}

impl Metrics {
    /// A registration ended with `result`.
    pub fn registration(&self, result: &'static str) {
        bump(&self.registrations, result);
    }
    /// A request on the well-known port was answered `status`.
    pub fn request(&self, status: u16) {
        bump(&self.requests, status);
    }
    /// A newcomer was refused by `limit`.
    pub fn refused(&self, limit: &'static str) {
        bump(&self.refusals, limit);
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
    /// Pairs relaying now.
    pub fn pairs_active(&self) -> u64 {
        self.pairs_opened
            .load(Relaxed)
            .saturating_sub(self.pairs_closed.load(Relaxed))
    }

    /// The Prometheus text exposition; `waiting` is responders per label.
    pub fn render(&self, waiting: &[(String, usize)]) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        let by = |key: &str, map: Vec<(String, u64)>| {
            map.into_iter()
                .map(|(k, v)| (format!("{{{key}=\"{k}\"}}"), v.to_string()))
                .collect()
        };
        let snap = |m: &Mutex<BTreeMap<&'static str, u64>>| {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            m.iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<Vec<_>>()
        };
        let requests: Vec<(String, u64)> = {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        family(
            "taas_registrations_total",
            "counter",
            "Registrations by result.",
            by("result", snap(&self.registrations)),
        );
        family(
            "taas_requests_total",
            "counter",
            "Requests on the well-known port by status.",
            by("status", requests),
        );
        family(
            "taas_pairs_opened_total",
            "counter",
            "Pairs that began relaying.",
            one(self.pairs_opened.load(Relaxed)),
        );
        family(
            "taas_pairs_closed_total",
            "counter",
            "Pairs that ended.",
            one(self.pairs_closed.load(Relaxed)),
        );
        family(
            "taas_pairs_active",
            "gauge",
            "Pairs relaying now.",
            one(self.pairs_active()),
        );
        family(
            "taas_relayed_bytes_total",
            "counter",
            "Octets relayed, by direction (counted when a pair closes).",
            vec![
                (
                    "{direction=\"up\"}".into(),
                    self.bytes_up.load(Relaxed).to_string(),
                ),
                (
                    "{direction=\"down\"}".into(),
                    self.bytes_down.load(Relaxed).to_string(),
                ),
            ],
        );
        family(
            "taas_waiting_responders",
            "gauge",
            "Responders waiting, by label.",
            waiting
                .iter()
                .map(|(l, n)| (format!("{{label=\"{l}\"}}"), n.to_string()))
                .collect(),
        );
        family(
            "taas_rendezvous_ports_open",
            "gauge",
            "Rendezvous ports open now.",
            one(self.rendezvous_open.load(Relaxed).max(0) as u64),
        );
        family(
            "taas_refusals_total",
            "counter",
            "Newcomers refused, by limit.",
            by("limit", snap(&self.refusals)),
        );
        family(
            "taas_pairs_idle_closed_total",
            "counter",
            "Pairs closed after idle_timeout with no octet either way.",
            one(self.pairs_idle_closed.load(Relaxed)),
        );
        family(
            "taas_auth_failures_total",
            "counter",
            "Failed authentications.",
            one(self.auth_failures.load(Relaxed)),
        );
        family(
            "taas_store_errors_total",
            "counter",
            "Account store errors.",
            one(self.store_errors.load(Relaxed)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_label_sets_are_exported_at_zero_from_the_start() {
        let text = Metrics::default().render(&[]);
        for limit in REFUSAL_LIMITS {
            let row = format!("taas_refusals_total{{limit=\"{limit}\"}} 0");
            assert!(text.lines().any(|l| l == row), "{row}");
        }
        for result in REGISTRATION_RESULTS {
            let row = format!("taas_registrations_total{{result=\"{result}\"}} 0");
            assert!(text.lines().any(|l| l == row), "{row}");
        }
        assert!(
            text.lines()
                .any(|l| l == "taas_requests_total{status=\"503\"} 0")
        );
    }
}
