//! The relay's limits, named once: `Limit` gives each its config key, which is
//! also its metric label (`taas_refusals_total{limit="…"}`) and the word its log
//! lines start with; the address a per-address limit counts (`source`); the
//! per-address counter whose slots are guards; the refusal log.
//!
//! Invariants: a slot of a `PerAddress` is given back exactly once, when its
//! `Slot` drops, so no path (an error, a thread that failed to start) can leak
//! one; a burst of refusals by one limit is logged once, then as a count.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sys::lock;

/// A burst of refusals is summed up after this long without one.
pub const REFUSAL_QUIET: Duration = Duration::from_secs(5);

/// Declares a closed set of named things: the enum, `ALL` and `name()` from one
/// table, so a name is written once (metrics' `Registration` uses it too).
macro_rules! named_set {
    ($(#[doc = $what:literal])* $set:ident { $($(#[doc = $doc:literal])* $v:ident = $name:literal,)* }) => {
        $(#[doc = $what])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $set {
            $($(#[doc = $doc])* $v,)*
        }

        impl $set {
            /// Every value, in the order `/metrics` lists them.
            pub const ALL: &[$set] = &[$($set::$v,)*];

            /// Its name: a config key for a limit (the operating system's two: what
            /// runs out), and the metric label.
            pub fn name(self) -> &'static str {
                match self {
                    $($set::$v => $name,)*
                }
            }
        }
    };
}
pub(crate) use named_set;

named_set! {
    /// Everything that refuses a newcomer.
    Limit {
        /// Connections open on the well-known port.
        MaxConnections = "max_connections",
        /// Connections open on the well-known port from one address.
        MaxConnectionsPerIp = "max_connections_per_ip",
        /// Pairs relayed, and mobile connections waiting for a responder.
        MaxPairs = "max_pairs",
        /// The same, with mobiles from one address.
        MaxPairsPerIp = "max_pairs_per_ip",
        /// Responders waiting and plugs open, per label.
        MaxWaiting = "max_waiting",
        /// How long a plug waits for its one connection.
        PlugTimeout = "plug_timeout",
        /// A plug takes its connection only from the registering address.
        PlugSameIp = "plug_same_ip",
        /// How long a mobile connection waits for a responder.
        PairWait = "pair_wait",
        /// How long a mobile connection may stay silent before it takes a responder.
        FirstOctetTimeout = "first_octet_timeout",
        /// The operating system refused an accept (out of descriptors, most likely).
        Accept = "accept",
        /// The operating system refused a thread.
        Threads = "threads",
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The address a per-address limit counts: an IPv6 address by its /64 (one
/// host commonly has a whole /64), an IPv4-mapped one as IPv4.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !0u128 << 64).into()),
        },
        v4 => v4,
    }
}

/// Things open at once, in total and per `source` address.
pub struct PerAddress {
    /// Cap in total, and the limit that names it.
    max: (usize, Limit),
    /// Cap per address, and the limit that names it.
    max_per_ip: (usize, Limit),
    /// Total and per-address counts.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A place in a `PerAddress`, given back on drop.
pub struct Slot {
    /// The counter it was taken from.
    table: Arc<PerAddress>,
    /// The `source` address it counts against.
    ip: IpAddr,
}

impl PerAddress {
    /// A counter with caps `max` (named `limit`) and `max_per_ip` (`per_ip_limit`).
    pub fn new(max: (usize, Limit), max_per_ip: (usize, Limit)) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for `ip` and how many are open with it, or the limit that refused.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<(Slot, usize), Limit> {
        let ip = source(ip);
        let mut open = lock(&self.open);
        if open.0 >= self.max.0 {
            return Err(self.max.1);
        }
        let n = open.1.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.0 {
            return Err(self.max_per_ip.1);
        }
        *n += 1;
        open.0 += 1;
        let slot = Slot {
            table: self.clone(),
            ip,
        };
        Ok((slot, open.0))
    }

    /// Slots taken now.
    pub fn open(&self) -> usize {
        lock(&self.open).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = lock(&self.table.open);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Logs the first refusal of a burst per limit, and the count when it ends.
#[derive(Default)]
pub struct RefusalLog {
    /// Limit to refusals since the first was logged, and the last one's time.
    bursts: Mutex<HashMap<Limit, (u64, Instant)>>,
}

impl RefusalLog {
    /// Notes a refusal by `limit`; only the first of a burst is logged.
    pub fn note(&self, limit: Limit, detail: &str) {
        let mut bursts = lock(&self.bursts);
        match bursts.get_mut(&limit) {
            Some((n, at)) => {
                *n += 1;
                *at = Instant::now();
            }
            None => {
                log::warn!("{limit} reached: refused {detail}; further refusals are counted");
                bursts.insert(limit, (0, Instant::now()));
            }
        }
    }

    /// Ends bursts quiet for `REFUSAL_QUIET`, logging their counts.
    pub fn flush(&self) {
        lock(&self.bursts).retain(|limit, (n, at)| {
            if at.elapsed() < REFUSAL_QUIET {
                return true;
            }
            if *n > 0 {
                log::warn!("{limit}: {n} more refusals in that burst");
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_limits_count_ipv6_by_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_ne!(source(ip("2001:db8:1:3::1")), source(ip("2001:db8:1:2::1")));
        let limit = PerAddress::new((2, Limit::MaxPairs), (1, Limit::MaxPairsPerIp));
        let (first, open) = limit.acquire(ip("2001:db8::1")).unwrap();
        assert_eq!(open, 1);
        let refused = |a: &str| limit.acquire(ip(a)).err();
        assert_eq!(refused("2001:db8::2"), Some(Limit::MaxPairsPerIp));
        let _other = limit.acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(refused("192.0.2.2"), Some(Limit::MaxPairs));
        drop(first);
        assert_eq!(limit.open(), 1, "the slot was given back on drop");
        assert!(limit.acquire(ip("2001:db8::2")).is_ok());
    }

    #[test]
    fn every_limit_has_one_distinct_name() {
        let mut names: Vec<&str> = Limit::ALL.iter().map(|l| l.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Limit::ALL.len());
        // The first nine are config keys: the file accepts each by that name.
        for l in &Limit::ALL[..9] {
            let text = format!("{} = 1", l.name());
            if let Err(e) = crate::config::Config::from_toml(&text, "t") {
                assert!(!e.to_string().contains("unknown field"), "{l}: {e}");
            }
        }
    }
}
