//! The shared directory of several relays ("nodes") on one Redis
//! (docs/PROTOCOL.md section 7): which node has responders waiting for which
//! label, the path a cross-node 307 was given for, the pairings of every node,
//! and the security state (replay rule, failure budgets, trusted sources) that
//! must hold across nodes.
//!
//! Keys (a label's and an ID's keys share one hash tag, so each would live in
//! one Redis Cluster slot):
//!
//! | key | type | written by | dies |
//! | --- | --- | --- | --- |
//! | `taas:{LABEL}:nodes` | hash NODE → entry JSON (`boot`, `host`, `port`, `waiting`, `until`) | each node its own field | its `until` passes (readers skip it; writers drop passed fields); the key by TTL |
//! | `taas:{LABEL}:path:IP` | string: the path of the 307 given to IP | the node that gave it | `PATH_TTL`, or read once |
//! | `taas:{LABEL}:pairings` | list of pairing JSON, newest first | the pairing node | kept to `MAX_PAIRINGS` |
//! | `taas:node:{NODE}` | string: the node's record (`boot`, `host`, its offers) | that node | `TTL` |
//! | `taas:node:{NODE}:boot` | counter | that node, once per start | never |
//! | `taas:{nodes}` | sorted set NODE → until (ms) | each node its own member | readers skip passed members; writers drop them |
//! | `taas:{nodes}:known` | set of every node name that ever joined | each node | never (label certificates name them) |
//! | `taas:{ID}:step`, `taas:{ID}:trust:SRC`, `taas:{ID}:fail`, `taas:{ID}:fail:SRC`, `taas:addr:{SRC}:fail` | replay rule, trust, budgets | any node, in one script each | by TTL |
//!
//! Every change is also published on `CHANNEL`; every node re-reads the whole
//! directory on each heartbeat and after a reconnect, so a lost message costs
//! at most one heartbeat. Times inside Redis are Redis's own (`TIME` in the
//! scripts), so node clocks only matter to TOTP, which `clock_off` checks.
//!
//! Invariants: a node writes only its own entries, and they die by their
//! `until` or TTL unless refreshed; another node's entry is never deleted
//! while alive; a node's entries from an earlier boot are ignored; a request
//! thread waits on Redis at most `SHORT_READ` for a lookup and
//! `SECURITY_DEADLINE` for a security check, and a failed security check is
//! an error (the registrar answers 503: fail closed).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::redis_link::RedisLink;
use crate::sys::{lock, now_millis, random_bytes};

/// How often a node re-writes its entries and re-reads everyone's.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long an entry lives unless refreshed: three heartbeats.
pub const TTL: Duration = Duration::from_secs(6);
/// A node that has not beaten for this long is not redirected to (one beat
/// missed, with room for a slow one): a killed node is passed over within
/// about one heartbeat, well before its entries' TTL.
pub const FRESH: Duration = Duration::from_millis(3000);
/// The longest a mobile request waits for a directory read (a cache miss).
pub const SHORT_READ: Duration = Duration::from_millis(300);
/// The longest a registration waits for a shared security check.
pub const SECURITY_DEADLINE: Duration = Duration::from_secs(2);
/// How long the path of a cross-node 307 is kept for the pairing node.
pub const PATH_TTL: Duration = Duration::from_secs(30);
/// Pairings kept per label across nodes.
pub const MAX_PAIRINGS: usize = 100;
/// How long a label's shared pairings outlive its last pairing.
pub const PAIRINGS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Paths kept per (label, mobile address) at once.
const MAX_PATHS: usize = 16;
/// The pub/sub channel of directory changes.
pub const CHANNEL: &str = "taas:directory";
/// Live nodes (sorted set: node → until, in Redis's milliseconds).
pub const NODES: &str = "taas:{nodes}";
/// Every node name that ever joined.
pub const KNOWN: &str = "taas:{nodes}:known";
/// The largest clock difference from Redis a node registers with: one TOTP
/// step (a token is good for its step, and the replay rule compares steps
/// across nodes).
pub const MAX_CLOCK_OFF: Duration = Duration::from_secs(30);
/// Labels the cache holds at most (mobiles may ask for any name: a miss
/// beyond it is not read, and answered 503).
const MAX_CACHED_LABELS: usize = 20_000;
/// Registrations that may wait on the security connection at once.
const MAX_WAITERS: usize = 32;
/// Mobile requests and pairings that may wait on the lookup connection at
/// once (beyond: no cross-node 307, no shared record, at once).
const MAX_LOOKUP_WAITERS: usize = 8;

/// What a node offers for one label: its rendezvous port and how many wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The label's rendezvous port there.
    pub port: u16,
    /// Responders waiting there.
    pub waiting: usize,
}

/// Another node's offer, as this node knows it.
#[derive(Clone, Debug)]
pub struct Remote {
    /// The node's name.
    pub node: String,
    /// Its `public_host`.
    pub host: String,
    /// Its offer.
    pub offer: Offer,
    /// The node's boot number the offer came with.
    boot: u64,
    /// When the offer dies here unless refreshed.
    until: Instant,
}

/// A node's record (`taas:node:{NODE}`).
#[derive(Serialize, Deserialize)]
struct NodeRecord {
    boot: u64,
    #[serde(default)]
    seq: u64,
    host: String,
    /// The node's well-known port, where its registrar answers (absent in a
    /// record of a node before this field).
    #[serde(default)]
    registrar: Option<u16>,
    offers: BTreeMap<String, Offer>,
}

/// One field of `taas:{LABEL}:nodes`, and a published change's body.
#[derive(Serialize, Deserialize)]
struct Entry {
    boot: u64,
    host: String,
    port: u16,
    waiting: usize,
    /// Redis milliseconds (set by the script).
    #[serde(default)]
    until: u64,
}

/// A published change: `offer` absent when the node withdrew the label.
#[derive(Serialize, Deserialize)]
struct Change {
    node: String,
    boot: u64,
    #[serde(default)]
    seq: u64,
    host: String,
    label: String,
    offer: Option<Offer>,
}

/// The other nodes' offers, by label then node, and the peers seen.
#[derive(Default)]
struct Cache {
    offers: HashMap<String, HashMap<String, Remote>>,
    /// The nodes that beat within `FRESH`, by name.
    peers: BTreeMap<String, Peer>,
    /// Node → the newest (boot, seq) applied from it.
    seen: HashMap<String, (u64, u64)>,
}

/// Another live node, as its record and messages tell it.
struct Peer {
    /// Its `public_host`.
    host: String,
    /// Its boot number.
    boot: u64,
    /// Its registrar's port, once its record was read.
    registrar: Option<u16>,
    /// When it counts as gone unless heard from again.
    until: Instant,
}

/// Counters for `/metrics` and `/status`.
#[derive(Default)]
pub struct Counters {
    /// Cross-node 307s this node gave.
    pub redirects_given: AtomicU64,
    /// Pairings here of mobiles another node sent (their path came from Redis).
    pub redirects_received: AtomicU64,
    /// Connections here that never paired though another node sent them.
    pub stale_redirects: AtomicU64,
}

/// This node's view of the shared directory, and its way to write its part.
pub struct Directory {
    /// This node's name.
    pub node: String,
    /// This node's `public_host`.
    pub host: String,
    /// This node's well-known port (its registrar's).
    registrar: u16,
    /// This start's boot number (`taas:node:{NODE}:boot`).
    pub boot: u64,
    /// Request threads' connection for lookups, paths and pairings.
    link: RedisLink,
    /// Registrations' connection for the shared security state, apart so
    /// that mobile traffic (anyone's) never queues ahead of it.
    security: RedisLink,
    /// The heartbeat's connection (its own, so a slow request never delays it).
    beat: RedisLink,
    /// A second copy of the URL's client for the subscriber.
    sub: RedisLink,
    /// The other nodes' offers.
    cache: Mutex<Cache>,
    /// What this node last wrote, by label.
    own: Mutex<BTreeMap<String, Offer>>,
    /// Did the last heartbeat reach Redis?
    up: AtomicBool,
    /// A write failed: the next one writes every entry.
    dirty: AtomicBool,
    /// Raised at every publish: readers keep the newest of a node's record
    /// and messages.
    seq: AtomicU64,
    /// Local clock minus Redis's `TIME`, in ms (last heartbeat).
    clock_off_ms: AtomicI64,
    /// The clock was found off and that was logged.
    clock_warned: AtomicBool,
    /// The counters.
    pub counters: Counters,
    /// Work a pair's thread hands off (its stack is small, and a pairing
    /// must not wait on Redis): run by the node's worker thread.
    later: Sender<Job>,
    /// The other end, until the worker takes it.
    jobs: Mutex<Option<Receiver<Job>>>,
}

/// A piece of directory work run off the caller's thread.
pub type Job = Box<dyn FnOnce(&Directory) + Send>;

/// Jobs queued for the worker before more are dropped (and logged).
const MAX_JOBS: usize = 4096;

/// Writes one label's entry of this node: sets the field with its `until`
/// from Redis's clock, drops fields whose `until` has passed, keeps the key
/// alive as long as its longest-lived field. KEYS: the label's hash.
/// ARGV: node, entry JSON without `until`, TTL ms.
const SET_ENTRY: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local e = cjson.decode(ARGV[2])
e['until'] = now + ttl
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(e))
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, f = pcall(cjson.decode, all[i + 1])
  if not ok or type(f) ~= 'table' or (tonumber(f['until']) or 0) < now then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return now
";

/// The live fields of a label's hash, with Redis's time. KEYS: the hash.
const GET_ENTRIES: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('HGETALL', KEYS[1])}
";

/// Joins (or leaves) the live-node set and drops members whose time has
/// passed; returns Redis's time and the members that beat within `FRESH` (a
/// node that missed its beat is not redirected to, though its entries live
/// on to their TTL). KEYS: `NODES`, `KNOWN`. ARGV: node, TTL ms, FRESH ms,
/// `join` or `leave`.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[4] == 'join' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], now + ttl - tonumber(ARGV[3]), '+inf')}
";

/// A token bucket, in Redis's time. KEYS: the bucket. ARGV: budget, refill
/// ms, `take` (one failure, when one is left) or `refund` (one back). Returns
/// the ms to wait before one more try is allowed (0: allowed, and taken).
const BUCKET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local budget = tonumber(ARGV[1])
local refill = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'left', 'at')
local left = tonumber(b[1])
local at = tonumber(b[2])
if left == nil or at == nil then
  left = budget
else
  left = math.min(budget, left + math.max(0, now - at) / refill)
end
if ARGV[3] == 'take' then
  if left < 1 then return math.ceil((1 - left) * refill) end
  left = left - 1
else
  left = math.min(budget, left + 1)
end
redis.call('HSET', KEYS[1], 'left', tostring(left), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((budget - left) * refill) + 1000)
return 0
";

/// The replay rule: a newer step is taken, the same step only from the same
/// source, an older one never. KEYS: `taas:{ID}:step`. ARGV: step, source,
/// TTL s. Returns -1 when taken, else the last accepted step.
const ACCEPT_STEP: &str = r"
local v = redis.call('GET', KEYS[1])
local step = tonumber(ARGV[1])
local sp = v and string.find(v, ' ')
if sp then
  local last = tonumber(string.sub(v, 1, sp - 1)) or 0
  local src = string.sub(v, sp + 1)
  if step < last then return last end
  if step == last and src ~= ARGV[2] then return last end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'EX', tonumber(ARGV[3]))
return -1
";

/// One failed-authentication bucket, as the guard names it.
pub enum Bucket<'a> {
    /// A source's own budget.
    Addr(IpAddr),
    /// An ID's budget, spent by strangers.
    Id(&'a str),
    /// A trusted source's budget for an ID.
    Trusted(IpAddr, &'a str),
}

impl Bucket<'_> {
    fn key(&self) -> String {
        match self {
            Bucket::Addr(src) => format!("taas:addr:{{{src}}}:fail"),
            Bucket::Id(id) => format!("taas:{{{id}}}:fail"),
            Bucket::Trusted(src, id) => format!("taas:{{{id}}}:fail:{src}"),
        }
    }
}

impl Directory {
    /// Joins the directory of the Redis at `url` as `node` with `host` and its
    /// registrar at `registrar` (the well-known port): takes a new boot
    /// number. Fails when Redis cannot be reached (the relay does not start
    /// half-joined).
    pub fn join(url: &str, node: &str, host: &str, registrar: u16) -> Result<Directory> {
        let link = RedisLink::parse(url, MAX_LOOKUP_WAITERS)?;
        let boot_key = format!("taas:node:{{{node}}}:boot");
        let (boot, redis_now, local, live_until) = link.with(SECURITY_DEADLINE, |c| {
            let live_until: Option<f64> = redis::cmd("ZSCORE").arg(NODES).arg(node).query(c)?;
            let boot: u64 = redis::cmd("INCR").arg(&boot_key).query(c)?;
            // Known from its first moment (label certificates issued from
            // now on name it), not from its first heartbeat.
            redis::cmd("SADD").arg(KNOWN).arg(node).query::<i64>(c)?;
            let sent = now_millis();
            let (secs, micros): (u64, u64) = redis::cmd("TIME").query(c)?;
            let local = sent / 2 + now_millis() / 2;
            Ok((boot, secs * 1000 + micros / 1000, local, live_until))
        })?;
        // Its last beat within FRESH: another process may be running as this
        // node (or this one restarted at once). Two with one name overwrite
        // each other's entries.
        let fresh_until = redis_now + (TTL - FRESH).as_millis() as u64;
        if live_until.is_some_and(|until| until > fresh_until as f64) {
            log::warn!(
                "node {node}: a node of this name beat less than {} s ago; if another \
                 process runs as {node}, give each node its own name",
                FRESH.as_secs()
            );
        }
        let (later, jobs) = bounded(MAX_JOBS);
        Ok(Directory {
            later,
            jobs: Mutex::new(Some(jobs)),
            node: node.to_string(),
            host: host.to_string(),
            registrar,
            boot,
            link,
            security: RedisLink::parse(url, MAX_WAITERS)?,
            beat: RedisLink::parse(url, 1)?,
            sub: RedisLink::parse(url, 1)?,
            cache: Mutex::new(Cache::default()),
            own: Mutex::new(BTreeMap::new()),
            up: AtomicBool::new(true),
            dirty: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            // Measured before the first registration can be checked.
            clock_off_ms: AtomicI64::new(local as i64 - redis_now as i64),
            clock_warned: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    /// Runs `job` on the node's worker thread, soon; dropped (and logged)
    /// when `MAX_JOBS` wait already.
    pub fn later(&self, job: Job) {
        if self.later.try_send(job).is_err() {
            log::warn!(
                "node {}: directory work queue full; a pairing record is lost",
                self.node
            );
        }
    }

    /// Runs queued jobs until every sender is gone or `stop` is set (the
    /// node's worker thread).
    pub fn work(&self, stop: &AtomicBool) {
        let Some(jobs) = lock(&self.jobs).take() else {
            return;
        };
        while !stop.load(Ordering::SeqCst) {
            match jobs.recv_timeout(HEARTBEAT / 4) {
                Ok(job) => job(self),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Did the last heartbeat reach Redis?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Local clock minus Redis's, in ms, as of the last heartbeat.
    pub fn clock_off_ms(&self) -> i64 {
        self.clock_off_ms.load(Ordering::SeqCst)
    }

    /// Is this node's clock too far from Redis's to register?
    fn clock_off(&self) -> bool {
        self.clock_off_ms().unsigned_abs() > MAX_CLOCK_OFF.as_millis() as u64
    }

    /// Logs a clock off from Redis's by more than `MAX_CLOCK_OFF` (once, and
    /// when it is right again): the heartbeat's check.
    pub fn check_clock(&self) {
        let bad = self.clock_off();
        if bad && !self.clock_warned.swap(true, Ordering::SeqCst) {
            log::error!(
                "node {}: this clock is {:.1} s off from Redis's: registrations are refused \
                 until it is within {} s (run NTP)",
                self.node,
                self.clock_off_ms() as f64 / 1000.0,
                MAX_CLOCK_OFF.as_secs()
            );
        } else if !bad && self.clock_warned.swap(false, Ordering::SeqCst) {
            log::info!(
                "node {}: clock within {} s of Redis's again",
                self.node,
                MAX_CLOCK_OFF.as_secs()
            );
        }
    }

    /// `ClockOff` when this node's clock is too far from Redis's to register.
    pub fn clock_ok(&self) -> Result<()> {
        let off = self.clock_off_ms();
        if self.clock_off() {
            return Err(Error::ClockOff {
                node: self.node.clone(),
                off_ms: off,
            });
        }
        Ok(())
    }

    fn node_key(node: &str) -> String {
        format!("taas:node:{{{node}}}")
    }

    fn label_key(label: &str) -> String {
        format!("taas:{{{label}}}:nodes")
    }

    /// The key of the paths 307s gave `mobile` for `label`: by its whole
    /// address, as the pairing node matches it (two phones in one /64 are two
    /// mobiles). Bounded: `MAX_PATHS` a key, each cut to `pool::MAX_KEPT_PATH`
    /// by the caller, for `PATH_TTL`.
    fn path_key(label: &str, mobile: IpAddr) -> String {
        format!("taas:{{{label}}}:path:{mobile}")
    }

    fn pairings_key(label: &str) -> String {
        format!("taas:{{{label}}}:pairings")
    }

    // ----- this node's part (the heartbeat thread) -----

    /// Writes this node's offers (`offers`: every label with responders
    /// waiting and its rendezvous port listening): its record first (so a
    /// node that reads it after a change's message sees that change), each
    /// changed label's entry, the labels it no longer offers withdrawn, its
    /// place among the live nodes, and a message per change; then re-reads
    /// every live node's record. Two round trips. `all`: re-write every entry
    /// (a heartbeat), else only changes. After a failure every entry is
    /// written again at the next call.
    pub fn publish(&self, offers: BTreeMap<String, Offer>, all: bool) -> Result<()> {
        let all = self.dirty.swap(false, Ordering::SeqCst) || all;
        let before = lock(&self.own).clone();
        let changed: Vec<(&String, Option<&Offer>)> = offers
            .iter()
            .filter(|(l, o)| all || before.get(*l) != Some(*o))
            .map(|(l, o)| (l, Some(o)))
            .chain(
                before
                    .keys()
                    .filter(|l| !offers.contains_key(*l))
                    .map(|l| (l, None)),
            )
            .collect();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ttl = TTL.as_millis() as u64;
        let record = serde_json::to_string(&NodeRecord {
            boot: self.boot,
            seq,
            host: self.host.clone(),
            registrar: Some(self.registrar),
            offers: offers.clone(),
        })
        .map_err(|e| Error::Encode(e.to_string()))?;
        let mut messages = Vec::new();
        for (label, offer) in &changed {
            let change = Change {
                node: self.node.clone(),
                boot: self.boot,
                seq,
                host: self.host.clone(),
                label: (*label).clone(),
                offer: offer.cloned(),
            };
            messages
                .push(serde_json::to_string(&change).map_err(|e| Error::Encode(e.to_string()))?);
        }
        let result = self.beat.with(HEARTBEAT, |c| {
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(Self::node_key(&self.node))
                .arg(&record)
                .arg("PX")
                .arg(ttl)
                .ignore();
            for ((label, offer), message) in changed.iter().zip(&messages) {
                let key = Self::label_key(label);
                match offer {
                    Some(o) => {
                        let entry = serde_json::json!({
                            "boot": self.boot, "host": self.host,
                            "port": o.port, "waiting": o.waiting,
                        });
                        p.cmd("EVAL")
                            .arg(SET_ENTRY)
                            .arg(1)
                            .arg(&key)
                            .arg(&self.node)
                            .arg(entry.to_string())
                            .arg(ttl)
                            .ignore();
                    }
                    // Its own entry: withdrawn by its only writer.
                    None => {
                        p.cmd("HDEL").arg(&key).arg(&self.node).ignore();
                    }
                }
                p.cmd("PUBLISH").arg(CHANNEL).arg(message).ignore();
            }
            p.cmd("EVAL")
                .arg(BEAT)
                .arg(2)
                .arg(NODES)
                .arg(KNOWN)
                .arg(&self.node)
                .arg(ttl)
                .arg(FRESH.as_millis() as u64)
                .arg("join");
            let sent = now_millis();
            let ((redis_now, live),): ((u64, Vec<String>),) = p.query(c)?;
            let local = sent / 2 + now_millis() / 2;
            let others: Vec<String> = live.into_iter().filter(|n| *n != self.node).collect();
            let texts: Vec<Option<String>> = if others.is_empty() {
                Vec::new()
            } else {
                let mut p = redis::pipe();
                for node in &others {
                    p.cmd("GET").arg(Self::node_key(node));
                }
                p.query(c)?
            };
            let records: Vec<(String, String)> = others
                .into_iter()
                .zip(texts)
                .filter_map(|(n, t)| t.map(|t| (n, t)))
                .collect();
            Ok((redis_now, local, records))
        });
        match result {
            Ok((redis_now, local, records)) => {
                *lock(&self.own) = offers;
                let off = local as i64 - redis_now as i64;
                self.clock_off_ms.store(off, Ordering::SeqCst);
                if !self.up.swap(true, Ordering::SeqCst) {
                    log::info!(
                        "node {}: Redis {} reached again; directory re-published",
                        self.node,
                        self.link.describe()
                    );
                }
                self.replace_all(records);
                Ok(())
            }
            Err(e) => {
                if self.up.swap(false, Ordering::SeqCst) {
                    log::warn!(
                        "node {}: directory not written ({e}); local labels are still served, \
                         other nodes' labels answer 503 until Redis is back",
                        self.node
                    );
                }
                // What may have been written stays known (to be withdrawn),
                // and everything is written again at the next call.
                lock(&self.own).extend(offers);
                self.dirty.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Withdraws every entry of this node and its record (a graceful stop).
    pub fn withdraw(&self) {
        let labels: Vec<String> = lock(&self.own).keys().cloned().collect();
        let _ = self.publish(BTreeMap::new(), false);
        let _ = self.beat.with(HEARTBEAT, |c| {
            redis::cmd("DEL")
                .arg(Self::node_key(&self.node))
                .query::<i64>(c)?;
            redis::cmd("EVAL")
                .arg(BEAT)
                .arg(2)
                .arg(NODES)
                .arg(KNOWN)
                .arg(&self.node)
                .arg(TTL.as_millis() as u64)
                .arg(FRESH.as_millis() as u64)
                .arg("leave")
                .query::<redis::Value>(c)
                .map(|_| ())
        });
        log::info!(
            "node {}: withdrew {} label(s) from the directory",
            self.node,
            labels.len()
        );
    }

    /// Rebuilds the cache from every live node's record (the heartbeat's full
    /// read): nodes no longer live are forgotten; a record older than what a
    /// message already brought from its node keeps the newer offers.
    fn replace_all(&self, records: Vec<(String, String)>) {
        let until = Instant::now() + TTL;
        let mut cache = lock(&self.cache);
        let mut offers: HashMap<String, HashMap<String, Remote>> = HashMap::new();
        let mut peers = BTreeMap::new();
        let mut seen = HashMap::new();
        for (node, text) in records {
            let Ok(record) = serde_json::from_str::<NodeRecord>(&text) else {
                log::warn!(
                    "node {}: unreadable directory record of node {node:?}",
                    self.node
                );
                continue;
            };
            if !valid_peer(&node, &record.host) {
                continue;
            }
            peers.insert(
                node.clone(),
                Peer {
                    host: record.host.clone(),
                    boot: record.boot,
                    registrar: record.registrar,
                    until,
                },
            );
            let known = cache.seen.get(&node).copied().unwrap_or_default();
            if (record.boot, record.seq) < known {
                // A message was newer: keep what it said.
                seen.insert(node.clone(), known);
                for (label, nodes) in &cache.offers {
                    if let Some(r) = nodes.get(&node) {
                        offers
                            .entry(label.clone())
                            .or_default()
                            .insert(node.clone(), r.clone());
                    }
                }
                continue;
            }
            seen.insert(node.clone(), (record.boot, record.seq));
            for (label, offer) in record.offers {
                if crate::label::validate(&label).is_err() {
                    continue;
                }
                offers.entry(label).or_default().insert(
                    node.clone(),
                    Remote {
                        node: node.clone(),
                        host: record.host.clone(),
                        offer,
                        boot: record.boot,
                        until,
                    },
                );
            }
        }
        cache.offers = offers;
        cache.peers = peers;
        cache.seen = seen;
    }

    // ----- the subscriber -----

    /// Listens to `CHANNEL` until `stop` says so, applying every change of
    /// another node to the cache; reconnects after a failure (the next
    /// heartbeat's full read covers what was missed).
    pub fn subscribe(&self, stop: &AtomicBool) {
        let mut failures = 0u32;
        while !stop.load(Ordering::SeqCst) {
            match self.listen(stop) {
                Ok(()) => return,
                Err(e) => {
                    if failures == 0 {
                        log::warn!("node {}: directory subscription lost: {e}", self.node);
                    }
                    failures = failures.saturating_add(1);
                    std::thread::sleep(HEARTBEAT / 4);
                }
            }
        }
    }

    fn listen(&self, stop: &AtomicBool) -> redis::RedisResult<()> {
        let mut conn = self.sub.connect(HEARTBEAT)?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(CHANNEL)?;
        pubsub.set_read_timeout(Some(HEARTBEAT / 2))?;
        while !stop.load(Ordering::SeqCst) {
            let msg = match pubsub.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e),
            };
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            if let Ok(change) = serde_json::from_str::<Change>(&text) {
                self.apply(change);
            }
        }
        Ok(())
    }

    fn apply(&self, change: Change) {
        if change.node == self.node
            || !valid_peer(&change.node, &change.host)
            || crate::label::validate(&change.label).is_err()
        {
            return;
        }
        let mut cache = lock(&self.cache);
        let known = cache.seen.get(&change.node).copied().unwrap_or_default();
        if (change.boot, change.seq) < known {
            return; // older than what is known of that node
        }
        cache
            .seen
            .insert(change.node.clone(), (change.boot, change.seq));
        let until = Instant::now() + TTL;
        // A message does not say the registrar's port: the record did.
        let registrar = cache
            .peers
            .get(&change.node)
            .filter(|p| p.boot == change.boot)
            .and_then(|p| p.registrar);
        cache.peers.insert(
            change.node.clone(),
            Peer {
                host: change.host.clone(),
                boot: change.boot,
                registrar,
                until,
            },
        );
        if cache.offers.len() >= MAX_CACHED_LABELS && !cache.offers.contains_key(&change.label) {
            return;
        }
        let nodes = cache.offers.entry(change.label).or_default();
        match change.offer {
            Some(offer) => {
                nodes.insert(
                    change.node.clone(),
                    Remote {
                        node: change.node,
                        host: change.host,
                        offer,
                        boot: change.boot,
                        until,
                    },
                );
            }
            None => {
                nodes.remove(&change.node);
            }
        }
    }

    // ----- lookups (request threads) -----

    /// Another node with responders waiting for `label`, chosen at random
    /// weighted by how many wait: from the cache, or on a miss by one short
    /// read of the label's entries (none when Redis is down).
    pub fn pick(&self, label: &str) -> Option<Remote> {
        let fresh = |cache: &Cache, now: Instant| -> Option<Vec<Remote>> {
            let nodes = cache.offers.get(label)?;
            Some(
                nodes
                    .values()
                    .filter(|r| {
                        r.until > now
                            && r.offer.waiting > 0
                            // Only nodes that beat lately, at this boot.
                            && cache
                                .peers
                                .get(&r.node)
                                .is_some_and(|p| p.until > now && p.boot <= r.boot)
                    })
                    .cloned()
                    .collect(),
            )
        };
        let (cached, room) = {
            let cache = lock(&self.cache);
            (
                fresh(&cache, Instant::now()),
                cache.offers.len() < MAX_CACHED_LABELS,
            )
        };
        let candidates = match cached {
            Some(c) => c,
            // A miss: one short read, unless Redis is known down or the
            // cache (of names anyone may ask for) is full.
            None if self.is_up() && room => {
                let _ = self.read_label(label);
                fresh(&lock(&self.cache), Instant::now()).unwrap_or_default()
            }
            None => Vec::new(),
        };
        weighted(candidates)
    }

    /// Reads the label's live entries of other nodes from Redis into the
    /// cache (an empty entry when none: asked again at the next heartbeat).
    fn read_label(&self, label: &str) -> Result<()> {
        let key = Self::label_key(label);
        let (redis_now, fields): (u64, Vec<String>) = self.link.with(SHORT_READ, |c| {
            redis::cmd("EVAL")
                .arg(GET_ENTRIES)
                .arg(1)
                .arg(&key)
                .query(c)
        })?;
        let here = Instant::now();
        let mut found = Vec::new();
        for pair in fields.chunks(2) {
            let [node, text] = pair else { continue };
            if *node == self.node {
                continue;
            }
            let Ok(e) = serde_json::from_str::<Entry>(text) else {
                continue;
            };
            if e.until <= redis_now || !valid_peer(node, &e.host) {
                continue;
            }
            found.push(Remote {
                node: node.clone(),
                host: e.host,
                offer: Offer {
                    port: e.port,
                    waiting: e.waiting,
                },
                boot: e.boot,
                until: here + Duration::from_millis(e.until - redis_now).min(TTL),
            });
        }
        let mut cache = lock(&self.cache);
        let nodes = cache.offers.entry(label.to_string()).or_default();
        for r in found {
            nodes.entry(r.node.clone()).or_insert(r);
        }
        Ok(())
    }

    /// The other live nodes: (name, host), as of the last heartbeat or message.
    pub fn peers(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        lock(&self.cache)
            .peers
            .iter()
            .filter(|(_, p)| p.until > now)
            .map(|(n, p)| (n.clone(), p.host.clone()))
            .collect()
    }

    /// Another node and its registrar's port, chosen at random among those
    /// whose record said the port: where a draining node sends a
    /// registration. The peers as last known: a withdrawn node reads no more
    /// heartbeats, and its drain may outlast their TTL (every heartbeat before
    /// that rebuilt the list from the live nodes' records).
    pub fn registrar_elsewhere(&self) -> Option<(String, u16)> {
        let live: Vec<(String, u16)> = lock(&self.cache)
            .peers
            .iter()
            .filter_map(|(node, p)| Some((node.clone(), p.registrar?)))
            .collect();
        let i = random_below(live.len() as u64) as usize;
        live.into_iter().nth(i)
    }

    /// Offers of other nodes known here (live).
    pub fn size(&self) -> usize {
        let now = Instant::now();
        lock(&self.cache)
            .offers
            .values()
            .map(|nodes| nodes.values().filter(|r| r.until > now).count())
            .sum()
    }

    /// The node's part of `/status` (JSON).
    pub fn status(&self) -> serde_json::Value {
        let peers: Vec<serde_json::Value> = self
            .peers()
            .into_iter()
            .map(|(node, host)| serde_json::json!({ "node": node, "host": host }))
            .collect();
        let c = &self.counters;
        serde_json::json!({
            "name": self.node,
            "boot": self.boot,
            "host": self.host,
            "redis_up": self.is_up(),
            "clock_off_ms": self.clock_off_ms(),
            "peers": peers,
            "directory_size": self.size(),
            "offered": lock(&self.own).len(),
            "redirects_given": c.redirects_given.load(Ordering::Relaxed),
            "redirects_received": c.redirects_received.load(Ordering::Relaxed),
            "stale_redirects": c.stale_redirects.load(Ordering::Relaxed),
        })
    }

    /// The node's part of `/metrics` (Prometheus text).
    pub fn metrics_text(&self) -> String {
        let c = &self.counters;
        let rows = [
            (
                "taas_node_peers",
                "gauge",
                "Other live nodes known here.",
                self.peers().len() as u64,
            ),
            (
                "taas_node_directory_offers",
                "gauge",
                "Other nodes' offers (label, node) known here.",
                self.size() as u64,
            ),
            (
                "taas_node_labels_offered",
                "gauge",
                "Labels this node offers to the others.",
                lock(&self.own).len() as u64,
            ),
            (
                "taas_node_redis_up",
                "gauge",
                "1 when the last heartbeat reached Redis.",
                u64::from(self.is_up()),
            ),
            (
                "taas_cross_node_redirects_given_total",
                "counter",
                "307s to another node.",
                c.redirects_given.load(Ordering::Relaxed),
            ),
            (
                "taas_cross_node_redirects_received_total",
                "counter",
                "Pairings here of mobiles another node sent.",
                c.redirects_received.load(Ordering::Relaxed),
            ),
            (
                "taas_stale_redirects_total",
                "counter",
                "Connections another node sent here that never paired.",
                c.stale_redirects.load(Ordering::Relaxed),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }

    // ----- paths and pairings -----

    /// Keeps the path of the cross-node 307 given to `mobile` for `label`, for
    /// the node that will pair it (a queue per address, as one relay keeps
    /// them: several mobiles behind one NAT each get theirs). Done before the
    /// 307 is answered.
    pub fn remember_path(&self, label: &str, mobile: IpAddr, path: &str) -> Result<()> {
        let key = Self::path_key(label, mobile);
        let ttl = PATH_TTL.as_millis() as u64;
        self.link.with(SHORT_READ, |c| {
            redis::pipe()
                .cmd("RPUSH")
                .arg(&key)
                .arg(path)
                .ignore()
                .cmd("LTRIM")
                .arg(&key)
                .arg(-(MAX_PATHS as i64))
                .arg(-1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl)
                .ignore()
                .query::<()>(c)
        })
    }

    /// The oldest path another node's 307 gave `mobile` for `label`, taken;
    /// `None` when there is none or Redis cannot say.
    pub fn take_path(&self, label: &str, mobile: IpAddr) -> Option<String> {
        let key = Self::path_key(label, mobile);
        self.link
            .with(SHORT_READ, |c| redis::cmd("LPOP").arg(&key).query(c))
            .ok()
            .flatten()
    }

    /// Adds a pairing (JSON) to the label's shared list, keeping the last
    /// `MAX_PAIRINGS` for `PAIRINGS_TTL` after the last one (they hold paths
    /// and queries).
    pub fn record_pairing(&self, label: &str, json: &str) -> Result<()> {
        let key = Self::pairings_key(label);
        self.link.with(SHORT_READ, |c| {
            redis::pipe()
                .cmd("LPUSH")
                .arg(&key)
                .arg(json)
                .ignore()
                .cmd("LTRIM")
                .arg(&key)
                .arg(0)
                .arg(MAX_PAIRINGS - 1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(PAIRINGS_TTL.as_millis() as u64)
                .ignore()
                .query::<()>(c)
        })
    }

    /// The label's pairings at every node (JSON), oldest first.
    pub fn pairings(&self, label: &str) -> Result<Vec<String>> {
        let key = Self::pairings_key(label);
        let mut list: Vec<String> = self.link.with(SECURITY_DEADLINE, |c| {
            redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(MAX_PAIRINGS - 1)
                .query(c)
        })?;
        list.reverse();
        Ok(list)
    }

    // ----- security state shared by the nodes -----

    /// Takes one failure from `bucket` when one is left: 0, else the
    /// milliseconds to wait before one is.
    pub fn bucket_take(&self, bucket: &Bucket, budget: u32, refill: Duration) -> Result<u64> {
        self.bucket(bucket, budget, refill, "take")
    }

    /// Gives one failure back to `bucket` (the attempt did not owe it).
    pub fn bucket_refund(&self, bucket: &Bucket, budget: u32, refill: Duration) -> Result<()> {
        self.bucket(bucket, budget, refill, "refund").map(|_| ())
    }

    fn bucket(&self, bucket: &Bucket, budget: u32, refill: Duration, mode: &str) -> Result<u64> {
        let key = bucket.key();
        let refill = refill.as_millis().max(1) as u64;
        self.security.with(SECURITY_DEADLINE, |c| {
            redis::cmd("EVAL")
                .arg(BUCKET)
                .arg(1)
                .arg(&key)
                .arg(budget)
                .arg(refill)
                .arg(mode)
                .query(c)
        })
    }

    /// The replay rule across nodes: `Ok(Ok(()))` when `step` is taken for
    /// `id` from `src`, `Ok(Err(last))` when refused.
    pub fn accept_step(
        &self,
        id: &str,
        step: u64,
        src: IpAddr,
    ) -> Result<std::result::Result<(), u64>> {
        let key = format!("taas:{{{id}}}:step");
        let got: i64 = self.security.with(SECURITY_DEADLINE, |c| {
            redis::cmd("EVAL")
                .arg(ACCEPT_STEP)
                .arg(1)
                .arg(&key)
                .arg(step)
                .arg(src.to_string())
                .arg(24 * 3600)
                .query(c)
        })?;
        Ok(match u64::try_from(got) {
            Ok(last) => Err(last),
            Err(_) => Ok(()),
        })
    }

    /// Did `src` authenticate as `id` at any node within `window`?
    pub fn trusts(&self, src: IpAddr, id: &str) -> Result<bool> {
        let key = format!("taas:{{{id}}}:trust:{src}");
        self.security.with(SECURITY_DEADLINE, |c| {
            redis::cmd("EXISTS").arg(&key).query(c)
        })
    }

    /// Notes a success of `src` as `id` for `window`.
    pub fn trust(&self, src: IpAddr, id: &str, window: Duration) -> Result<()> {
        let key = format!("taas:{{{id}}}:trust:{src}");
        self.security.with(SECURITY_DEADLINE, |c| {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("EX")
                .arg(window.as_secs())
                .query::<()>(c)
        })
    }

    /// Every node name that ever joined (for label certificates).
    pub fn known_nodes(link: &RedisLink) -> Result<Vec<String>> {
        let mut names: Vec<String> = link.with(SECURITY_DEADLINE, |c| {
            redis::cmd("SMEMBERS").arg(KNOWN).query(c)
        })?;
        names.sort();
        Ok(names)
    }
}

/// A node name and host read from Redis that may go in a `Location`: a DNS
/// label, and a host without white space, `/`, `@` or control characters.
fn valid_peer(node: &str, host: &str) -> bool {
    crate::label::validate(node).is_ok_and(|n| n == node)
        && !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
}

/// A number below `n` at random (0 when `n` is 0, or when the system gives
/// no random bytes: then the first of a list is taken).
fn random_below(n: u64) -> u64 {
    let mut r = [0u8; 8];
    match random_bytes(&mut r) {
        Ok(()) if n > 0 => u64::from_le_bytes(r) % n,
        _ => 0,
    }
}

/// One of `candidates` at random, weighted by responders waiting.
fn weighted(candidates: Vec<Remote>) -> Option<Remote> {
    let total = candidates
        .iter()
        .fold(0u64, |sum, r| sum.saturating_add(r.offer.waiting as u64));
    if total == 0 {
        return None;
    }
    let mut pick = random_below(total);
    for c in candidates {
        let w = c.offer.waiting as u64;
        if pick < w {
            return Some(c);
        }
        pick -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(node: &str, waiting: usize) -> Remote {
        Remote {
            node: node.into(),
            host: "127.0.0.2".into(),
            offer: Offer { port: 1, waiting },
            boot: 1,
            until: Instant::now() + TTL,
        }
    }

    #[test]
    fn the_pick_is_weighted_by_waiting_and_never_an_empty_node() {
        assert!(weighted(Vec::new()).is_none());
        assert!(weighted(vec![remote("a", 0)]).is_none());
        let mut seen = HashMap::new();
        for _ in 0..2000 {
            let r = weighted(vec![remote("a", 1), remote("b", 3), remote("c", 0)]).unwrap();
            *seen.entry(r.node).or_insert(0usize) += 1;
        }
        assert!(!seen.contains_key("c"), "{seen:?}");
        let (a, b) = (seen["a"], seen["b"]);
        // 1 : 3, loosely (2000 draws: far outside these bounds is a bug).
        assert!(a > 300 && a < 700 && b > 1300, "{seen:?}");
        let huge = weighted(vec![remote("a", usize::MAX), remote("b", usize::MAX)]);
        assert!(huge.is_some(), "no overflow");
    }

    #[test]
    fn names_and_hosts_from_redis_are_checked_before_a_location() {
        assert!(valid_peer("a", "127.0.0.2"));
        assert!(valid_peer("node-2", "relay.example.com"));
        assert!(valid_peer("b", "::1"));
        for (node, host) in [
            ("A", "127.0.0.2"),
            ("a.b", "127.0.0.2"),
            ("a", ""),
            ("a", "x\r\nSet-Cookie: y"),
            ("a", "x/y"),
            ("a", "user@host"),
            ("a", "h ost"),
        ] {
            assert!(!valid_peer(node, host), "{node:?} {host:?}");
        }
    }

    #[test]
    fn keys_share_a_hash_tag_per_label_and_per_id() {
        assert_eq!(Directory::label_key("cam"), "taas:{cam}:nodes");
        assert!(
            Directory::path_key("cam", "127.0.0.1".parse().unwrap()).starts_with("taas:{cam}:")
        );
        assert!(Directory::pairings_key("cam").starts_with("taas:{cam}:"));
        let id = "8f6b2c1e-4d3a-4b5c-9e7f-0a1b2c3d4e5f";
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(Bucket::Id(id).key().starts_with(&format!("taas:{{{id}}}:")));
        assert!(
            Bucket::Trusted(src, id)
                .key()
                .starts_with(&format!("taas:{{{id}}}:"))
        );
        assert!(NODES.starts_with("taas:{nodes}") && KNOWN.starts_with("taas:{nodes}"));
    }
}
