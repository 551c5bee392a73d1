//! Who may register (docs/PROTOCOL.md section 1): the `Authorization: TOTP` grammar, the
//! failure throttle (RFC 4226 section 7.3) and the replay rule.
//!
//! Invariants: the throttle is checked before any secret is touched; a success never
//! refills a budget; a stranger's failures never hold back a source the ID trusts;
//! the replay and trust tables only grow with successes, the throttle table is
//! capped at `MAX_TRACKED` (plus one key per trusted source and ID) and fails
//! closed for strangers when full; no token reaches a log line.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::directory::{self, Directory};
use crate::error::{Error, Result};
use crate::limits::source;
use crate::store::{Account, Store};
use crate::sys::lock;

/// Longest ID accepted in a header (a UUID is 36; legacy IDs are short too).
pub const MAX_ID: usize = 128;

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
    /// A source address (`limits::source`): every failure from it, and the
    /// one bucket of the unknown IDs it tries.
    Addr(IpAddr),
    /// An existing account ID: failures of sources it does not trust.
    Id(String),
    /// A source the ID trusts: that source's own failures for that ID (in place
    /// of the ID's budget).
    Trusted(IpAddr, String),
}

impl Key {
    /// The same bucket in the shared directory.
    fn bucket(&self) -> directory::Bucket<'_> {
        match self {
            Key::Addr(src) => directory::Bucket::Addr(*src),
            Key::Id(id) => directory::Bucket::Id(id),
            Key::Trusted(src, id) => directory::Bucket::Trusted(*src, id),
        }
    }
}

/// Failure buckets, bounded: a queue of keys, each due a whole refill period
/// after it was queued (so in due order), prunes a few per failure (amortised
/// O(1)): a refilled bucket is forgotten, another queued again. A new key at a
/// full table is not tracked: the caller then refuses (fails closed).
struct Buckets {
    /// Bucket by key.
    map: HashMap<Key, Bucket>,
    /// Every key of `map` once, with when its bucket was (last seen) due full.
    due: VecDeque<(Key, Instant)>,
    /// The table was found full and that was logged.
    full_logged: bool,
}

/// How many throttle keys are tracked at once (about 100 bytes each: 5 MB).
pub const MAX_TRACKED: usize = 50_000;
/// How long a success from a source makes the ID trust it (the owner's agent
/// registers again after every pairing, so it stays trusted while it runs).
pub const TRUST_FOR: Duration = Duration::from_secs(24 * 3600);
/// Most (source, ID) pairs trusted at once; only successes add them.
pub const MAX_TRUSTED: usize = 50_000;
/// Expired entries pruned per failure.
const PRUNE_PER_FAILURE: usize = 2;

/// Checks credentials against the store, with the throttle and the replay rule.
///
/// The per-ID budget never locks the owner out (OWASP: lock out untrusted
/// clients only): a source that authenticated as an ID within `TRUST_FOR` is
/// held back only by budgets of its own (its address's, and its own for that
/// ID), while strangers' failures spend the ID's budget, so guessing spread over many addresses stays
/// throttled. Unknown IDs spend only the source's budget and create no entry.
pub struct Guard {
    /// Failures allowed before 429.
    budget: f64,
    /// One failure forgiven per this long.
    refill: Duration,
    /// Failure buckets.
    buckets: Mutex<Buckets>,
    /// (source, ID) to the time of its last success.
    trusted: Mutex<HashMap<(IpAddr, String), Instant>>,
    /// Per ID: the last step accepted and the address it came from.
    last_step: Mutex<HashMap<String, (u64, IpAddr)>>,
    /// When this relay is a node of several: budgets, trust and the replay
    /// rule live in the shared directory instead of the fields above.
    shared: Option<Arc<Directory>>,
}

impl Guard {
    /// A guard with `budget` failures refilling one per `refill`.
    pub fn new(budget: u32, refill: Duration, shared: Option<Arc<Directory>>) -> Guard {
        Guard {
            budget: f64::from(budget),
            refill,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                due: VecDeque::new(),
                full_logged: false,
            }),
            trusted: Mutex::new(HashMap::new()),
            last_step: Mutex::new(HashMap::new()),
            shared,
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
        let src = source(peer);
        let id = &creds.username;
        // The source's own budget always; then the ID's, or, for a source the
        // ID trusts, that source's budget for the ID.
        let trusted = self.trusts(src, id)?;
        let keys = if trusted {
            [Key::Addr(src), Key::Trusted(src, id.clone())]
        } else {
            [Key::Addr(src), Key::Id(id.clone())]
        };
        self.begin(&keys, trusted)?;
        let Some(account) = store.get(id)? else {
            // No entry for an ID that does not exist: the source pays alone.
            self.settle(&keys, 1);
            return Err(Error::AuthFailed);
        };
        let totp = match account.totp() {
            Ok(t) => t,
            Err(e) => {
                log::error!("account {}: unusable TOTP parameters: {e}", account.uuid);
                self.settle(&keys, keys.len());
                return Err(Error::AuthFailed);
            }
        };
        let Some(step) = totp.verify(&creds.response, unix_time) else {
            self.settle(&keys, keys.len());
            return Err(Error::AuthFailed);
        };
        let accepted = self.accept_step(&account.uuid, step, src)?;
        // A right token is not a guess: nothing is spent either way.
        self.settle(&keys, 0);
        if let Err(last) = accepted {
            // Already used elsewhere: the next step's token will do.
            let next = (last + 1).saturating_mul(totp.step);
            let wait = Duration::from_secs(next.saturating_sub(unix_time).max(1));
            log::warn!(
                "account {}: token of step {step} already used (or older than one used); {peer} may retry in {} s",
                account.uuid,
                wait.as_secs()
            );
            return Err(Error::Replay(wait));
        }
        self.trust(src, id);
        Ok(account)
    }

    /// Did `src` authenticate as `id` within `TRUST_FOR` (at any node, when
    /// the nodes share their state)?
    fn trusts(&self, src: IpAddr, id: &str) -> Result<bool> {
        match &self.shared {
            Some(dir) => dir.trusts(src, id),
            None => Ok(self.local_trusts(src, id)),
        }
    }

    /// Notes a success; a shared note that cannot be written is logged (the
    /// source is then a stranger at the other nodes, which fails closed).
    fn trust(&self, src: IpAddr, id: &str) {
        match &self.shared {
            Some(dir) => {
                if let Err(e) = dir.trust(src, id, TRUST_FOR) {
                    log::warn!(
                        "account {id}: success of {src} not shared with the other nodes: {e}"
                    );
                }
            }
            None => self.local_trust(src, id),
        }
    }

    /// The replay rule (`local_accept_step`), across nodes when shared.
    fn accept_step(
        &self,
        id: &str,
        step: u64,
        src: IpAddr,
    ) -> Result<std::result::Result<(), u64>> {
        match &self.shared {
            Some(dir) => dir.accept_step(id, step, src),
            None => Ok(self.local_accept_step(id, step, src)),
        }
    }

    /// Lets an attempt go on, or refuses it (`Throttled`) when a key's budget
    /// is spent. Alone, it looks (`local_check`; `trusted`: the source the ID
    /// trusts is let through a full table). Shared by nodes, it takes one
    /// failure from every key at once, in one script per key, before the token
    /// is looked at, so a burst or a Redis failure later on cannot let a guess
    /// through unpaid (`settle` gives back what was not owed; a refused
    /// attempt owes nothing, and gets back what it was charged); an error when
    /// Redis cannot say (fail closed).
    fn begin(&self, keys: &[Key], trusted: bool) -> Result<()> {
        let Some(dir) = &self.shared else {
            return self.local_check(keys, trusted);
        };
        for (i, key) in keys.iter().enumerate() {
            let wait = dir.bucket_take(&key.bucket(), self.budget as u32, self.refill)?;
            if wait > 0 {
                // This key was not charged; the ones before it were.
                self.settle(&keys[..i], 0);
                return Err(Error::Throttled(Duration::from_millis(wait)));
            }
        }
        Ok(())
    }

    /// The attempt's outcome: the first `pay` keys pay one failure. Alone,
    /// they are charged now (`local_fail`); shared, `begin` charged every key
    /// and the others get theirs back (a give-back that fails leaves the
    /// budget spent, the safe way).
    fn settle(&self, keys: &[Key], pay: usize) {
        let Some(dir) = &self.shared else {
            self.local_fail(&keys[..pay.min(keys.len())]);
            return;
        };
        for key in keys.iter().skip(pay) {
            if let Err(e) = dir.bucket_refund(&key.bucket(), self.budget as u32, self.refill) {
                log::warn!("a failure budget stays spent: {e}");
            }
        }
    }

    /// Did `src` authenticate as `id` within `TRUST_FOR`?
    fn local_trusts(&self, src: IpAddr, id: &str) -> bool {
        let trusted = lock(&self.trusted);
        trusted
            .get(&(src, id.to_string()))
            .is_some_and(|t| t.elapsed() < TRUST_FOR)
    }

    /// Notes a success of `src` as `id`.
    fn local_trust(&self, src: IpAddr, id: &str) {
        let mut trusted = lock(&self.trusted);
        if trusted.len() >= MAX_TRUSTED && !trusted.contains_key(&(src, id.to_string())) {
            // Rare (successes only): forget the expired, else trust no more.
            trusted.retain(|_, t| t.elapsed() < TRUST_FOR);
            if trusted.len() >= MAX_TRUSTED {
                return;
            }
        }
        trusted.insert((src, id.to_string()), Instant::now());
    }

    /// The replay rule: a newer step is taken; the same step only from the same
    /// source (`limits::source`: an IPv6 address by its /64, as the throttle
    /// counts it); an older one never. A refusal gives the last accepted step.
    fn local_accept_step(&self, id: &str, step: u64, peer: IpAddr) -> std::result::Result<(), u64> {
        let mut table = lock(&self.last_step);
        match table.get(id) {
            Some(&(last, _)) if step < last => Err(last),
            Some(&(last, addr)) if step == last => {
                if addr == peer {
                    Ok(())
                } else {
                    Err(last)
                }
            }
            _ => {
                table.insert(id.to_string(), (step, peer));
                Ok(())
            }
        }
    }

    /// `Throttled` when any key's budget is spent, or when a key is not
    /// tracked and the table is full (fail closed), unless the source is one
    /// the ID trusts (`trusted`): strangers filling the table must not lock
    /// the owner out.
    fn local_check(&self, keys: &[Key], trusted: bool) -> Result<()> {
        let mut buckets = lock(&self.buckets);
        let now = Instant::now();
        let full = buckets.map.len() >= MAX_TRACKED;
        for key in keys {
            if let Some(b) = buckets.map.get_mut(key) {
                self.refill_bucket(b, now);
                if b.left < 1.0 {
                    return Err(Error::Throttled(self.refill.mul_f64(1.0 - b.left)));
                }
            } else if full && !trusted {
                self.prune(&mut buckets, now, MAX_TRACKED);
                if buckets.map.len() >= MAX_TRACKED {
                    // Once per spell of fullness: a flood must not flood the log.
                    if !buckets.full_logged {
                        buckets.full_logged = true;
                        log::warn!(
                            "failed-authentication table full ({MAX_TRACKED} keys): refusing untracked sources"
                        );
                    }
                    return Err(Error::Throttled(self.refill));
                }
                buckets.full_logged = false;
            }
        }
        Ok(())
    }

    /// Spends one failure from each key's budget.
    fn local_fail(&self, keys: &[Key]) {
        let mut buckets = lock(&self.buckets);
        let now = Instant::now();
        self.prune(&mut buckets, now, PRUNE_PER_FAILURE);
        for key in keys {
            if !buckets.map.contains_key(key) {
                // Past the cap only a trusted source's own key goes in (at most
                // MAX_TRUSTED of them): `local_check` lets that source through a
                // full table, so its failures must still be counted.
                if buckets.map.len() >= MAX_TRACKED && !matches!(key, Key::Trusted(..)) {
                    continue; // check() refuses this key from now on.
                }
                buckets.map.insert(
                    key.clone(),
                    Bucket {
                        left: self.budget,
                        at: now,
                    },
                );
                // Every key goes in with the same offset, so the queue stays in
                // due order and pruning never waits behind one key.
                buckets
                    .due
                    .push_back((key.clone(), now + self.full_refill()));
            }
            if let Some(b) = buckets.map.get_mut(key) {
                self.refill_bucket(b, now);
                b.left -= 1.0;
            }
        }
    }

    /// Looks at up to `n` keys at the front of the queue: a bucket that has
    /// refilled is forgotten, one that has not goes to the back with the time
    /// it will have.
    fn prune(&self, buckets: &mut Buckets, now: Instant, n: usize) {
        for _ in 0..n {
            match buckets.due.front() {
                Some((_, due)) if *due <= now => {}
                _ => return,
            }
            let Some((key, _)) = buckets.due.pop_front() else {
                return;
            };
            let Some(b) = buckets.map.get_mut(&key) else {
                continue;
            };
            self.refill_bucket(b, now);
            if b.left >= self.budget {
                buckets.map.remove(&key);
            } else {
                buckets.due.push_back((key, now + self.full_refill()));
            }
        }
    }

    /// How long a spent bucket takes to refill whole.
    fn full_refill(&self) -> Duration {
        self.refill.mul_f64(self.budget)
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
        let g = Guard::new(10, Duration::from_secs(6), None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(g.local_accept_step("id", 100, a).is_ok());
        assert!(
            g.local_accept_step("id", 100, a).is_ok(),
            "same step, same address: burst allowed"
        );
        assert_eq!(
            g.local_accept_step("id", 100, b),
            Err(100),
            "same step, other address"
        );
        assert_eq!(g.local_accept_step("id", 99, a), Err(100), "older step");
        assert!(
            g.local_accept_step("id", 101, b).is_ok(),
            "newer step from anywhere"
        );
        assert_eq!(g.local_accept_step("id", 101, a), Err(101));
    }

    #[test]
    fn throttle_budget_and_refill() {
        let g = Guard::new(3, Duration::from_millis(200), None);
        let keys = [Key::Addr("10.0.0.1".parse().unwrap())];
        for _ in 0..3 {
            assert!(g.local_check(&keys, false).is_ok());
            g.local_fail(&keys);
        }
        match g.local_check(&keys, false) {
            Err(e @ Error::Throttled(_)) => assert_eq!(e.retry_after(), Some(1)),
            _ => panic!("expected Throttled"),
        }
        std::thread::sleep(Duration::from_millis(250));
        assert!(g.local_check(&keys, false).is_ok(), "one failure refilled");
        g.local_fail(&keys);
        assert!(g.local_check(&keys, false).is_err());
    }

    #[test]
    fn a_trusted_source_is_not_held_back_by_strangers() {
        let g = Guard::new(3, Duration::from_secs(60), None);
        let owner: IpAddr = "10.0.0.1".parse().unwrap();
        let id = "id".to_string();
        g.trust(owner, &id);
        assert!(g.local_trusts(owner, &id));
        // Strangers from many addresses spend the ID's budget…
        for i in 0..3u8 {
            let stranger = IpAddr::from([10, 1, 0, i]);
            g.local_fail(&[Key::Addr(stranger), Key::Id(id.clone())]);
        }
        let another = IpAddr::from([10, 1, 0, 9]);
        assert!(
            g.local_check(&[Key::Addr(another), Key::Id(id.clone())], false)
                .is_err()
        );
        // …but the owner's own budget is untouched.
        assert!(
            g.local_check(&[Key::Trusted(owner, id.clone())], true)
                .is_ok()
        );
        for _ in 0..3 {
            g.local_fail(&[Key::Trusted(owner, id.clone())]);
        }
        assert!(
            g.local_check(&[Key::Trusted(owner, id)], false).is_err(),
            "its own budget"
        );
    }

    #[test]
    fn a_full_table_fails_closed_and_refilled_keys_are_pruned() {
        let fill = |g: &Guard| {
            for i in 0..MAX_TRACKED as u32 {
                g.local_fail(&[Key::Addr(IpAddr::from(i.to_be_bytes()))]);
            }
        };
        let newcomer = [Key::Addr("192.0.2.1".parse().unwrap())];
        // Nothing refills within the test: a new key is refused, not let through,
        // and a tracked key is still throttled by its own bucket.
        let slow = Guard::new(2, Duration::from_secs(3600), None);
        fill(&slow);
        assert!(matches!(
            slow.local_check(&newcomer, false),
            Err(Error::Throttled(_))
        ));
        let tracked = [Key::Addr(IpAddr::from(7u32.to_be_bytes()))];
        assert!(
            slow.local_check(&tracked, false).is_ok(),
            "one failure of two spent"
        );
        slow.local_fail(&tracked);
        assert!(slow.local_check(&tracked, false).is_err());
        // The source an ID trusts is not locked out by strangers' keys; its
        // own tracked bucket still holds it back.
        let owner: IpAddr = "198.51.100.7".parse().unwrap();
        let own = [Key::Addr(owner), Key::Trusted(owner, "id".into())];
        assert!(
            slow.local_check(&own, false).is_err(),
            "a stranger is refused"
        );
        assert!(
            slow.local_check(&own, true).is_ok(),
            "the trusted source is not"
        );
        assert!(slow.local_check(&tracked, true).is_err());
        // …and its failures still count at a full table: its budget of two ends.
        slow.local_fail(&own);
        slow.local_fail(&own);
        assert!(
            slow.local_check(&own, true).is_err(),
            "no unlimited guesses"
        );
        // Buckets that refilled are forgotten, and the newcomer is tracked again.
        let quick = Guard::new(1, Duration::from_millis(1), None);
        fill(&quick);
        let deadline = Instant::now() + Duration::from_secs(10);
        while quick.local_check(&newcomer, false).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(quick.local_check(&newcomer, false).is_ok());
        assert!(lock(&quick.buckets).map.len() < MAX_TRACKED);
        quick.local_fail(&newcomer);
        assert!(lock(&quick.buckets).map.contains_key(&newcomer[0]));
    }
}
