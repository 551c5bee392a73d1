//! `redis+sentinel://` store URLs (src/redis_link.rs) against real processes on
//! loopback: a `redis-server` master, a replica of it, three `redis-sentinel`s
//! watching it, and a relay whose store names only the sentinels. The master
//! is killed; once the sentinels have promoted the replica, registrations and a
//! new account go to it, while one sentinel is stalled (SIGSTOP) throughout.
//!
//! The tools are required: a missing `redis-server` or `redis-sentinel` fails
//! the test (`.ci/run` installs both). Every process started here is killed by
//! `Cluster`'s guards; every wait is bounded.
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Proc, TestRelay, free_port, wait_until};

/// The master's name in the sentinels' configuration.
const MASTER: &str = "taasmaster";
/// Bound of each wait for the processes to agree on something.
const SETTLE: Duration = Duration::from_secs(30);
/// Bound of the wait for the sentinels to promote the replica.
const FAILOVER: Duration = Duration::from_secs(40);

/// The master, the replica and the sentinels; each killed on drop (then the
/// directory with their configs and logs goes).
struct Cluster {
    master: Proc,
    master_port: u16,
    /// (Only held, to be killed on drop.)
    _replica: Proc,
    replica_port: u16,
    /// The sentinels and their ports.
    sentinels: Vec<(Proc, u16)>,
    dir: tempfile::TempDir,
}

/// A `redis-server` on `port`, a replica of `replica_of` when given.
fn redis_server(dir: &Path, port: u16, replica_of: Option<u16>) -> Proc {
    let data = dir.join(format!("data-{port}"));
    std::fs::create_dir(&data).unwrap();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&data);
    if let Some(master) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
    }
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("redis-{port}.log"))).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)"),
    )
}

/// A `redis-sentinel` on `port` watching the master on `master_port` (its own,
/// writable config file: a sentinel rewrites it).
fn redis_sentinel(dir: &Path, port: u16, master_port: u16) -> Proc {
    let config = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &config,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER} 1000\n\
             sentinel failover-timeout {MASTER} 5000\n",
            dir.display()
        ),
    )
    .unwrap();
    Proc(
        Command::new("redis-sentinel")
            .arg(&config)
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("sentinel-{port}.log"))).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel must be installed (.ci/run installs it)"),
    )
}

/// One command to the server on `port`, each step within 1 s.
fn ask<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    conn.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

impl Cluster {
    /// Starts everything and waits until the replica is in sync and every
    /// sentinel knows the replica and the two other sentinels.
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (master_port, replica_port) = (free_port(), free_port());
        let master = redis_server(dir.path(), master_port, None);
        let replica = redis_server(dir.path(), replica_port, Some(master_port));
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                (redis_sentinel(dir.path(), port, master_port), port)
            })
            .collect();
        let c = Cluster {
            master,
            master_port,
            _replica: replica,
            replica_port,
            sentinels,
            dir,
        };
        assert!(
            wait_until(SETTLE, || ask::<String>(
                c.replica_port,
                &["INFO", "replication"]
            )
            .is_ok_and(|info| info.contains("master_link_status:up"))),
            "the replica never synced\n{}",
            c.logs()
        );
        for &(_, port) in &c.sentinels {
            let knows = |what: &str, n: usize| {
                ask::<Vec<redis::Value>>(port, &["SENTINEL", what, MASTER])
                    .is_ok_and(|v| v.len() == n)
            };
            assert!(
                wait_until(SETTLE, || knows("replicas", 1) && knows("sentinels", 2)),
                "sentinel {port} never learnt the replica and the other sentinels\n{}",
                c.logs()
            );
        }
        c
    }

    /// The store URL: the sentinels only.
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The master's port as sentinel `port` names it now.
    fn master_per(&self, port: u16) -> Option<u16> {
        let addr: Option<(String, String)> =
            ask(port, &["SENTINEL", "get-master-addr-by-name", MASTER]).ok()?;
        addr.and_then(|(_, p)| p.parse().ok())
    }

    /// Every process's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("--- {} (last lines)\n", p.display()));
            for line in tail.iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Registers `label` until it answers 200 (503 "account store unreachable",
/// `Retry-After: 5`, while the store finds no master is expected; anything else
/// fails at once); returns the 503s seen.
fn register_until_ok(relay: &TestRelay, p: &taas::provision::Provision, label: &str) -> usize {
    let end = Instant::now() + Duration::from_secs(30);
    let mut unavailable = 0;
    loop {
        let r = relay.register(p, label);
        match r.status {
            200 => return unavailable,
            503 if Instant::now() < end && r.header("retry-after") == Some("5") => {
                unavailable += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => panic!("register {label}: {r:?} after {unavailable} times 503"),
        }
    }
}

#[test]
fn registrations_follow_a_sentinel_failover() {
    let started = Instant::now();
    let cluster = Cluster::start();
    // A node of the shared directory: its heartbeat, subscriber and shared
    // security state go through the sentinels too.
    let relay = TestRelay::start_with_store("node = \"a\"", Some(&cluster.url()));
    assert!(
        relay
            .server
            .config()
            .store
            .describe()
            .starts_with("redis sentinel 127.0.0.1:"),
        "{}",
        relay.server.config().store.describe()
    );

    // An account made by `taas users add` through the sentinels is on the
    // master and, once replicated, on the replica.
    let p = relay.add_account("demo");
    let on = |port: u16, id: &str| ask::<Option<String>>(port, &["GET", id]).ok().flatten();
    assert!(
        on(cluster.master_port, p.id()).is_some(),
        "not on the master"
    );
    assert!(
        wait_until(SETTLE, || on(cluster.replica_port, p.id()).is_some()),
        "never replicated\n{}",
        cluster.logs()
    );
    let r = relay.register(&p, "demo");
    assert_eq!(r.status, 200, "{r:?}");

    // One sentinel stalls (accepts connections, never answers); the master
    // dies. Until the sentinels promote the replica, registrations are 503
    // (every lookup fails), each answered within the store's deadline though
    // lookups also reach the stalled sentinel.
    let (stalled, live) = cluster.sentinels.split_first().unwrap();
    stalled.0.signal("STOP");
    cluster.master.signal("KILL");
    let killed = Instant::now();
    let mut during = Vec::new();
    assert!(
        wait_until(FAILOVER, || {
            let asked = Instant::now();
            let r = relay.register(&p, "demo");
            let retry = r.header("retry-after").map(str::to_string);
            during.push((r.status, retry, asked.elapsed()));
            live.iter()
                .all(|&(_, port)| cluster.master_per(port) == Some(cluster.replica_port))
        }),
        "the sentinels never promoted the replica\n{}",
        cluster.logs()
    );
    let promoted = killed.elapsed();
    let limit = taas::store::STORE_DEADLINE + Duration::from_secs(1);
    for (status, retry, took) in &during {
        // 503 with Retry-After: 5 is "account store unreachable".
        assert!(
            *status == 200 || (*status == 503 && retry.as_deref() == Some("5")),
            "{during:?}"
        );
        assert!(*took < limit, "a registration took {took:?}: {during:?}");
    }
    assert!(
        during.iter().any(|(status, _, _)| *status == 503),
        "no registration failed while there was no master: {during:?}"
    );
    let role: Vec<redis::Value> = ask(cluster.replica_port, &["ROLE"]).unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec())),
        "{role:?}"
    );

    // The relay's next connection asks the sentinels again: the account is
    // found on the new master.
    let unavailable = register_until_ok(&relay, &p, "demo");
    assert!(
        unavailable <= 5,
        "{unavailable} times 503 after the promotion"
    );

    // A write goes there too: a new account made through the sentinels (by a
    // new process, which asks them from the start) lands on the new master and
    // registers.
    let q = relay.add_account("second");
    assert!(
        on(cluster.replica_port, q.id()).is_some(),
        "not on the new master"
    );
    let r = relay.register(&q, "second");
    assert_eq!(r.status, 200, "{r:?}");

    // The directory followed: a responder waiting now is offered on the new
    // master, and the subscriber listens there again.
    let _responder = relay.responder(&q, "second");
    assert!(
        wait_until(FAILOVER, || ask::<bool>(
            cluster.replica_port,
            &["HEXISTS", "taas:{second}:nodes", "a"]
        )
        .unwrap_or(false)),
        "no directory entry on the new master"
    );
    assert!(
        wait_until(FAILOVER, || ask::<(String, i64)>(
            cluster.replica_port,
            &["PUBSUB", "NUMSUB", taas::directory::CHANNEL]
        )
        .is_ok_and(|(_, n)| n >= 1)),
        "the subscriber did not come back on the new master"
    );

    let slowest = during
        .iter()
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "promoted {:.1} s after the kill; {} registrations meanwhile (slowest {:.1} s), \
         {unavailable} times 503 after; {:.1} s in all",
        promoted.as_secs_f64(),
        during.len(),
        slowest.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(relay);
    drop(cluster);
}
