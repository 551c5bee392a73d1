//! Who may register (PROTOCOL.md section 1): the `Authorization: TOTP` grammar, the
//! failure throttle (RFC 4226 section 7.3) and the replay rule.
//!
//! Invariants: the throttle is checked before any secret is touched; a success never
//! refills a budget; the replay table only grows with accounts that authenticated,
//! and the throttle table is capped at `MAX_TRACKED`; no token reaches a log line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::{Account, Store};

/// Longest ID accepted in a header (a UUID is 36; legacy IDs are short too).
pub const MAX_ID: usize = 128;
/// Most addresses and IDs the throttle tracks at once; past it, buckets that have
/// refilled are forgotten first, and if none has, a new key is not tracked (the
/// per-address bucket of the attacker is still there).
pub const MAX_TRACKED: usize = 100_000;

/// The two parameters of `Authorization: TOTP username="ID", response="TOKEN"`.
pub struct Credentials {
    /// The account ID.
    pub username: String,
    /// The TOTP token (a secret until its step has passed: never logged).
    pub response: String,
}

/// Parses an `Authorization` value. Parameters may be quoted or bare, in any
/// order, separated by commas and optional spaces; unknown ones are ignored.
pub fn parse_authorization(value: &str) -> Result<Credentials> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("totp") {
        return Err(Error::BadRequest("Authorization scheme is not TOTP".into()));
    }
    let (mut username, mut response) = (None, None);
    let mut rest = rest.trim_start();
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| Error::BadRequest("Authorization parameter without '='".into()))?;
        let after = after.trim_start();
        let (val, after) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| Error::BadRequest("unterminated quote in Authorization".into()))?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim_end(), &after[end..])
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "username" => username = Some(val.to_string()),
            "response" => response = Some(val.to_string()),
            _ => {}
        }
        rest = after.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    match (username, response) {
        (Some(u), Some(r)) if !u.is_empty() && !r.is_empty() && u.len() <= MAX_ID => {
            Ok(Credentials {
                username: u,
                response: r,
            })
        }
        _ => Err(Error::BadRequest(
            "Authorization needs username and response".into(),
        )),
    }
}

/// A failure budget that refills by one every `refill`.
struct Bucket {
    /// Failures that may still happen before refusal, as of `at`.
    left: f64,
    /// When `left` was computed.
    at: Instant,
}

/// What a throttle bucket is kept for.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    /// A source address.
    Addr(IpAddr),
    /// An account ID as sent.
    Id(String),
}

/// Checks credentials against the store, with the throttle and the replay rule.
pub struct Guard {
    /// Failures allowed before 429.
    budget: f64,
    /// One failure forgiven per this long.
    refill: Duration,
    /// Failure buckets by address and by ID.
    buckets: Mutex<HashMap<Key, Bucket>>,
    /// Per ID: the last step accepted and the address it came from.
    last_step: Mutex<HashMap<String, (u64, IpAddr)>>,
}

impl Guard {
    /// A guard with `budget` failures refilling one per `refill`.
    pub fn new(budget: u32, refill: Duration) -> Guard {
        Guard {
            budget: f64::from(budget),
            refill,
            buckets: Mutex::new(HashMap::new()),
            last_step: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the account when `creds` are good for it at `unix_time`, from `peer`.
    pub fn authenticate(
        &self,
        store: &Store,
        creds: &Credentials,
        peer: IpAddr,
        unix_time: u64,
    ) -> Result<Account> {
        let keys = [
            Key::Addr(crate::server::source(peer)),
            Key::Id(creds.username.clone()),
        ];
        self.check(&keys)?;
        let Some(account) = store.get(&creds.username)? else {
            self.fail(&keys);
            return Err(Error::AuthFailed);
        };
        let totp = match account.totp() {
            Ok(t) => t,
            Err(e) => {
                log::error!("account {}: unusable TOTP parameters: {e}", account.uuid);
                self.fail(&keys);
                return Err(Error::AuthFailed);
            }
        };
        let Some(step) = totp.verify(&creds.response, unix_time) else {
            self.fail(&keys);
            return Err(Error::AuthFailed);
        };
        if !self.accept_step(&account.uuid, step, peer) {
            log::warn!(
                "account {}: replayed token from {peer} refused",
                account.uuid
            );
            self.fail(&keys);
            return Err(Error::AuthFailed);
        }
        Ok(account)
    }

    /// The replay rule: a newer step is taken; the same step only from the same
    /// address; an older one never.
    fn accept_step(&self, id: &str, step: u64, peer: IpAddr) -> bool {
        let mut table = self.last_step.lock().unwrap_or_else(|p| p.into_inner());
        match table.get(id) {
            Some(&(last, _)) if step < last => false,
            Some(&(last, addr)) if step == last => addr == peer,
            _ => {
                table.insert(id.to_string(), (step, peer));
                true
            }
        }
    }

    /// `Throttled` when any key's budget is spent.
    fn check(&self, keys: &[Key]) -> Result<()> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for key in keys {
            if let Some(b) = buckets.get_mut(key) {
                self.refill_bucket(b, now);
                if b.left < 1.0 {
                    let wait = self.refill.mul_f64(1.0 - b.left);
                    return Err(Error::Throttled(wait.max(Duration::from_secs(1))));
                }
            }
        }
        Ok(())
    }

    /// Spends one failure from each key's budget.
    fn fail(&self, keys: &[Key]) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if buckets.len() >= MAX_TRACKED {
            let budget = self.budget;
            let refill = self.refill;
            buckets.retain(|_, b| {
                let gained = now.duration_since(b.at).as_secs_f64() / refill.as_secs_f64();
                b.left + gained < budget
            });
        }
        for key in keys {
            if !buckets.contains_key(key) && buckets.len() >= MAX_TRACKED {
                continue;
            }
            let b = buckets.entry(key.clone()).or_insert(Bucket {
                left: self.budget,
                at: now,
            });
            self.refill_bucket(b, now);
            b.left -= 1.0;
        }
    }

    fn refill_bucket(&self, b: &mut Bucket, now: Instant) {
        let gained = now.duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64();
        b.left = (b.left + gained).min(self.budget);
        b.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_quoted_bare_any_order() {
        for v in [
            r#"TOTP username="abc", response="123456""#,
            r#"totp response="123456",username="abc""#,
            "TOTP username=abc, response=123456",
            r#"TOTP  realm="x" , username = abc ,response="123456", extra=1"#,
        ] {
            let c = parse_authorization(v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(
                (c.username.as_str(), c.response.as_str()),
                ("abc", "123456"),
                "{v}"
            );
        }
    }

    #[test]
    fn grammar_refusals() {
        for v in [
            "Basic dXNlcjpwYXNz",
            "TOTP username=abc",
            "TOTP response=1",
            r#"TOTP username="abc, response=1"#,
            "TOTP username",
            "TOTP",
            "",
        ] {
            assert!(
                matches!(parse_authorization(v), Err(Error::BadRequest(_))),
                "{v}"
            );
        }
    }

    #[test]
    fn replay_rule() {
        let g = Guard::new(10, Duration::from_secs(6));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(g.accept_step("id", 100, a));
        assert!(
            g.accept_step("id", 100, a),
            "same step, same address: burst allowed"
        );
        assert!(!g.accept_step("id", 100, b), "same step, other address");
        assert!(!g.accept_step("id", 99, a), "older step");
        assert!(g.accept_step("id", 101, b), "newer step from anywhere");
        assert!(!g.accept_step("id", 101, a));
    }

    #[test]
    fn throttle_budget_and_refill() {
        let g = Guard::new(3, Duration::from_millis(200));
        let keys = [Key::Addr("10.0.0.1".parse().unwrap())];
        for _ in 0..3 {
            assert!(g.check(&keys).is_ok());
            g.fail(&keys);
        }
        match g.check(&keys) {
            Err(Error::Throttled(d)) => assert!(d >= Duration::from_secs(1)),
            _ => panic!("expected Throttled"),
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(g.check(&keys).is_ok(), "one failure refilled");
        g.fail(&keys);
        assert!(g.check(&keys).is_err());
    }
}
