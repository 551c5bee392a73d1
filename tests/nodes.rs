//! Several relays, one Redis (issue 14, docs/PROTOCOL.md section 6): `taas
//! serve` processes named a, b, c on 127.0.0.2, .3 and .4 share one real
//! `redis-server`, each through a TCP proxy of its own that a test can cut.
//! Waits are bounded polls of `/status` (at most a heartbeat or a TTL past the
//! event), never fixed sleeps.
#[path = "support/steward.rs"]
mod steward;
mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::nodes::{Cluster, LABEL, bytes_both_ways, location, timed};
use support::{taas, wait_until};
use taas::directory::{HEARTBEAT, TTL};

/// A bound past the event for what one heartbeat should bring (the beat
/// itself, plus the time a loaded CI machine takes to run it).
fn one_beat() -> Duration {
    HEARTBEAT * 2
}

/// A bound for what a TTL should bring (the TTL, then one heartbeat of the
/// observer to read it).
fn one_ttl() -> Duration {
    TTL + HEARTBEAT * 2
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn registered_at_one_node_reached_through_another() {
    let c = Cluster::start(&["a", "b", "c"], "");
    let mut r1 = c.responder("a");
    let _r2 = c.responder("a");
    // a's pool went from empty to not: published at once, seen by b.
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));

    let r = c.get("b", "/app?x=1");
    assert_eq!(r.status, 307, "{r:?}");
    let (host, q) = location(&r);
    assert_eq!(host, format!("{LABEL}.a.taas.localhost"), "names node a");
    assert!(r.header("location").unwrap().ends_with("/app?x=1"));
    bytes_both_ways(ip("127.0.0.2"), q, &mut r1);
    assert_eq!(c.node("b").counter("redirects_given"), 1);
    assert!(wait_until(one_beat(), || c
        .node("a")
        .counter("redirects_received")
        == 1));

    // The pairing is listed at every node, with the path of b's 307.
    let list = c.pairings("c");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["pathname"], "/app?x=1");
    assert!(
        list[0]["initiator"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1 ")
    );

    // The second responder taken at a: its pool is empty, which is published
    // at once, so b stops redirecting there (503) well before a's entry's TTL.
    let mut direct = std::net::TcpStream::connect(("127.0.0.2", q)).unwrap();
    std::io::Write::write_all(&mut direct, b"x").unwrap();
    assert!(wait_until(one_beat(), || c.waiting("a") == 0));
    assert!(
        wait_until(one_beat(), || c.get("b", "/").status == 503),
        "b still redirects to a drained node"
    );

    // Local responders always win.
    let _r3 = c.responder("a");
    let _rb = c.responder("b");
    let r = c.get("b", "/");
    assert_eq!(r.status, 307);
    assert_eq!(
        location(&r).0,
        format!("{LABEL}.taas.localhost"),
        "b's own port"
    );
}

#[test]
fn redirect_host_address_names_the_other_nodes_public_host() {
    let c = Cluster::start(&["a", "b"], "redirect_host = \"address\"");
    let mut r1 = c.responder("a");
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    let r = c.get("b", "/");
    assert_eq!(r.status, 307, "{r:?}");
    let (host, q) = location(&r);
    assert_eq!(host, "127.0.0.2");
    bytes_both_ways(ip("127.0.0.2"), q, &mut r1);
}

#[test]
fn cross_node_redirects_can_be_turned_off() {
    let c = Cluster::start(&["a", "b"], "cross_node_redirects = false");
    let _r1 = c.responder("a");
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    assert_eq!(c.get("b", "/").status, 503);
    assert_eq!(c.node("b").counter("redirects_given"), 0);
}

#[test]
fn a_killed_node_is_forgotten_and_its_labels_live_on_at_the_others() {
    let mut c = Cluster::start(&["a", "b", "c"], "");
    let _at_a: Vec<_> = (0..2).map(|_| c.responder("a")).collect();
    let mut at_c: Vec<_> = (0..4).map(|_| c.responder("c")).collect();
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 2));
    c.node_mut("a").kill();
    let killed = Instant::now();
    assert!(
        wait_until(one_ttl(), || !c
            .node("b")
            .peers()
            .contains(&"a".to_string())),
        "b still lists a, killed {:?} ago",
        killed.elapsed()
    );
    // No 307 to a any more: every request goes to c, and gets through.
    for _ in 0..4 {
        let r = c.get("b", "/");
        assert_eq!(r.status, 307, "{r:?}");
        let (host, q) = location(&r);
        assert_eq!(host, format!("{LABEL}.c.taas.localhost"));
        let mut responder = at_c.remove(0);
        // The oldest responder at c is the one paired.
        bytes_both_ways(ip("127.0.0.4"), q, &mut responder);
    }
}

#[test]
fn a_graceful_stop_withdraws_at_once_and_sends_registrations_to_another_node_while_it_drains() {
    // Drains for pair_wait (longer than a TTL): the window the checks below
    // run in.
    let drain = "pair_wait = 16\nshutdown_grace = 20";
    let mut c = Cluster::start(&["a", "b"], drain);
    let _r = c.responder("a");
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    c.node("a").signal("TERM");
    let termed = Instant::now();
    // Withdrawn, not left to expire: gone from b within a heartbeat; while
    // its ports drain, a answers /ready and registrations 503.
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        == 0));
    assert_eq!(c.get("b", "/").status, 503);
    assert!(wait_until(one_beat(), || {
        c.node("a")
            .status_get("/ready")
            .is_some_and(|(s, _)| s == 503)
    }));
    // A registration at a is sent to b's registrar, by b's own name for it
    // (the one registrar certificate names `*.registrar_name`).
    let r = c.register("a", &c.token(), None);
    assert_eq!(r.status, 307, "{r:?}");
    let b = c.node("b");
    let to_b = format!("https://b.registrar.localhost:{}/register/{LABEL}", b.port);
    assert_eq!(r.header("location"), Some(to_b.as_str()));
    // curl as the hidden server follows it (PUT kept, Authorization sent on
    // to the new host), checking b's certificate by that name.
    let (a_addr, ca) = (c.node("a").addr(), c.dir.path().join("ca.crt"));
    let (ok, out, err) = support::curl(&[
        "-sS",
        "-L",
        "--location-trusted",
        "--cacert",
        ca.to_str().unwrap(),
        "--connect-to",
        &format!("registrar.localhost::{}:", a_addr.ip()),
        "--connect-to",
        &format!("b.registrar.localhost::{}:", b.ip),
        "-X",
        "PUT",
        "-H",
        &format!(
            "Authorization: TOTP username=\"{}\", response=\"{}\"",
            c.prov.id(),
            c.token()
        ),
        "-w",
        "\n%{http_code} %{url_effective}",
        &format!(
            "https://registrar.localhost:{}/register/{LABEL}",
            a_addr.port()
        ),
    ]);
    assert!(ok, "curl: {err}");
    let (plug, last) = out.rsplit_once('\n').unwrap();
    assert_eq!(last, format!("200 {to_b}"));
    let plug: std::net::SocketAddr = plug.parse().unwrap();
    assert_eq!(plug.ip(), b.ip, "the plug is b's");
    // Past the peers' TTL (a withdrawn node hears no heartbeats; its last
    // read of them is at most a heartbeat after SIGTERM) it still sends
    // registrations to b, not 503.
    let past_ttl = TTL + HEARTBEAT * 2 + Duration::from_secs(1);
    while termed.elapsed() < past_ttl {
        let r = c.register("a", &c.token(), None);
        assert_eq!(r.status, 307, "{:?} after SIGTERM: {r:?}", termed.elapsed());
        // The poll's interval (the loop ends at `past_ttl`).
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(c.register("a", &c.token(), None).status, 307);
    // The drain (16 s) and the grace, bounded.
    assert!(c.node_mut("a").terminate(Duration::from_secs(40)));
    // With no other node live, a draining node answers 503.
    let mut c = Cluster::start(&["a"], drain);
    c.node("a").signal("TERM");
    assert!(wait_until(one_beat(), || {
        c.node("a")
            .status_get("/ready")
            .is_some_and(|(s, _)| s == 503)
    }));
    assert_eq!(c.register("a", &c.token(), None).status, 503);
    assert!(c.node_mut("a").terminate(Duration::from_secs(40)));
}

#[test]
fn a_label_only_at_a_killed_node_is_refused_before_its_entries_expire() {
    let mut c = Cluster::start(&["a", "b"], "");
    let _r = c.responder("a");
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    assert_eq!(c.get("b", "/").status, 307);
    c.node_mut("a").kill();
    let killed = Instant::now();
    // Passed over once its beat is missed (FRESH), at b's next heartbeat.
    assert!(wait_until(taas::directory::FRESH + one_beat(), || c
        .get("b", "/")
        .status
        == 503));
    assert!(killed.elapsed() < TTL + HEARTBEAT, "{:?}", killed.elapsed());
}

#[test]
fn redis_down_local_labels_served_other_labels_refused_fast_then_back() {
    let mut c = Cluster::start(&["a", "b"], "");
    let mut at_a: Vec<_> = (0..3).map(|_| c.responder("a")).collect();
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    c.redis.stop();
    assert!(wait_until(
        one_beat() * 2,
        || c.node("a").node_status()["redis_up"] == false
    ));
    // a's own label: every request is served.
    for _ in 0..2 {
        let r = c.get("a", "/");
        assert_eq!(r.status, 307, "{r:?}");
        let (host, q) = location(&r);
        assert_eq!(host, format!("{LABEL}.taas.localhost"));
        bytes_both_ways(ip("127.0.0.2"), q, &mut at_a.remove(0));
    }
    // At b, once a's offer has passed its TTL there, the label is answered
    // 503, without waiting on Redis (well inside the store's deadline).
    assert!(wait_until(one_ttl(), || c.get("b", "/").status == 503));
    let (r, took) = timed(|| c.get("b", "/"));
    assert_eq!(r.status, 503);
    assert!(took < taas::store::STORE_DEADLINE, "took {took:?}");
    // Redis back, empty: a's heartbeat writes everything again.
    c.redis.restart();
    assert!(
        wait_until(one_beat() * 2, || c.node("b").counter("directory_size")
            >= 1),
        "the directory did not come back"
    );
    assert_eq!(c.get("b", "/").status, 307);
}

#[test]
fn a_node_cut_from_redis_serves_its_labels_and_publishes_again() {
    let c = Cluster::start(&["a", "b"], "");
    let mut at_a: Vec<_> = (0..3).map(|_| c.responder("a")).collect();
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    c.node("a").proxy.cut();
    // Its entries expire at b; a itself still serves its label.
    assert!(wait_until(one_ttl(), || c
        .node("b")
        .counter("directory_size")
        == 0));
    let r = c.get("a", "/");
    assert_eq!(r.status, 307);
    bytes_both_ways(ip("127.0.0.2"), location(&r).1, &mut at_a.remove(0));
    c.node("a").proxy.restore();
    assert!(wait_until(one_beat() * 2, || c
        .node("b")
        .counter("directory_size")
        >= 1));
    assert!(wait_until(one_beat(), || c
        .node("b")
        .peers()
        .contains(&"a".to_string())));
}

#[test]
fn guessing_spread_over_nodes_meets_one_budget_and_a_token_is_not_replayed_elsewhere() {
    let c = Cluster::start(&["a", "b", "c"], "");
    // A right token used at a by the owner...
    let token = c.token();
    let r = c.register("a", &token, None);
    assert_eq!(r.status, 200, "{r:?}");
    // ... is a replay at b from another address (429 with a Retry-After).
    let r = c.register("b", &token, Some(ip("127.0.0.9")));
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some());

    // Wrong tokens for the ID from many addresses, spread over the three
    // nodes: one budget (10) for them all, not one per node.
    let mut unauthorized = 0;
    let mut throttled = false;
    for i in 0..30u8 {
        let node = ["a", "b", "c"][usize::from(i % 3)];
        let from = ip(&format!("127.0.1.{}", i + 1));
        let r = c.register(node, "000000", Some(from));
        match r.status {
            401 => unauthorized += 1,
            429 => {
                throttled = true;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(throttled, "never throttled over {unauthorized} guesses");
    assert!(unauthorized <= 11, "{unauthorized} guesses before 429");
    // The owner, trusted since its success at a, is not locked out at c.
    let r = c.register("c", &token, None);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn churn_every_live_node_is_listed_and_no_dead_one_stays() {
    let mut c = Cluster::start(&["a", "b"], "");
    let watcher = "a";
    // Each name's last kill.
    let mut dead: std::collections::HashMap<String, Instant> = Default::default();
    // A replacement every second or two for a minute: b and each newcomer in
    // turn killed and replaced by a new node (new name, or b's name again
    // with a new boot number).
    let mut current = "b".to_string();
    // For a minute (at most 60 rounds).
    let start = Instant::now();
    for round in 0..60 {
        if start.elapsed() > Duration::from_secs(60) {
            break;
        }
        c.node_mut(&current).kill();
        c.remove(&current);
        dead.insert(current.clone(), Instant::now());
        current = if round % 2 == 0 {
            format!("n{round}")
        } else {
            "b".to_string()
        };
        let idx = c.add(&current);
        let name = c.nodes[idx].name.clone();
        let listed = Instant::now();
        assert!(
            wait_until(one_beat(), || c.node(watcher).peers().contains(&name)),
            "{name} not listed {:?} after it started",
            listed.elapsed()
        );
        // Every node killed more than a TTL ago, and not back, is gone.
        let peers = c.node(watcher).peers();
        for (d, at) in &dead {
            if at.elapsed() > one_ttl() && *d != current {
                assert!(
                    !peers.contains(d),
                    "{d} killed {:?} ago still listed",
                    at.elapsed()
                );
            }
        }
    }
    // At the end, only the live one.
    assert!(wait_until(one_ttl(), || c.node(watcher).peers()
        == vec![current.clone()]));
}

#[test]
fn node_with_a_file_store_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "node = \"a\"\nstore = \"file:x.json\"\n").unwrap();
    let (ok, _, err) = taas(dir.path(), &["serve", "-c", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("node") && err.contains("Redis store"), "{err}");
}

/// `taas expose --tls` with `--relay` at a and c; curl as the mobile at b
/// follows the cross-node 307 and checks the label certificate by the name
/// the 307 gave (`demo.a.taas.localhost` or `demo.c.…`: `taas users add`
/// names every node). a killed: once b has passed over it (about one
/// heartbeat), no request fails.
#[test]
fn curl_follows_a_cross_node_307_to_taas_expose_and_losing_a_node_loses_no_request() {
    if !support::need_tool("/usr/bin/curl", "curl") {
        return;
    }
    let mut c = Cluster::start(&["a", "b", "c"], "");
    let app = support::PlainApp::start();
    let prov_dir = c.dir.path().join("prov");
    let json = prov_dir.join(format!("{}.json", c.prov.id()));
    let log = c.dir.path().join("agent.log");
    let (a, cc) = (
        c.node("a").addr().to_string(),
        c.node("c").addr().to_string(),
    );
    let _agent = support::expose(
        &json,
        app.port,
        &["--tls", "--relay", &a, "--relay", &cc, "--pool", "2"],
        &log,
    );
    assert!(
        wait_until(Duration::from_secs(15), || c.waiting("a") == 2
            && c.waiting("c") == 2),
        "agent log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 2));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..6 {
        let (ok, out, err) = c.curl("b", &format!("/page{i}?q={i}"));
        assert!(ok, "curl: {err}");
        assert!(out.contains(support::APP_TEXT), "{out}");
        assert!(
            out.contains(&format!("/page{i}")),
            "the path reached the app: {out}"
        );
        let effective = out.lines().last().unwrap().to_string();
        seen.insert(effective.split('.').nth(1).unwrap().to_string());
    }
    assert!(seen.iter().all(|n| n == "a" || n == "c"), "{seen:?}");

    c.node_mut("a").kill();
    assert!(
        wait_until(one_beat(), || !c
            .node("b")
            .peers()
            .contains(&"a".to_string())),
        "b still lists a"
    );
    for i in 0..8 {
        let (ok, out, err) = c.curl("b", &format!("/after{i}"));
        assert!(ok, "request {i} after a was killed: {err}");
        assert!(out.contains(support::APP_TEXT));
        assert!(
            out.lines()
                .last()
                .unwrap()
                .contains("demo.c.taas.localhost"),
            "{out}"
        );
    }
}

/// A node whose clock is off from Redis's by more than a TOTP step refuses
/// registrations (503, saying why) and logs it; the others go on.
#[test]
fn a_node_whose_clock_is_off_from_redis_refuses_registrations_and_says_so() {
    // libfaketime (Debian's faketime), preloaded into the node itself.
    let lib = std::fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1".into());
    if !support::need_tool(lib.to_str().unwrap(), "faketime") {
        return;
    }
    let mut c = Cluster::start(&["a"], "");
    c.add_with_env(
        "b",
        &[("LD_PRELOAD", lib.to_str().unwrap()), ("FAKETIME", "+90")],
    );
    assert!(wait_until(one_beat(), || {
        c.node("b").node_status()["clock_off_ms"]
            .as_i64()
            .is_some_and(|off| off > 60_000)
    }));
    let token = c.token();
    let r = c.register("b", &token, None);
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("30"));
    let log = std::fs::read_to_string(&c.node("b").log).unwrap();
    assert!(log.contains("off from Redis"), "{log}");
    assert_eq!(c.register("a", &token, None).status, 200);
}

/// A mobile another node sent that never pairs (the responder it was sent
/// for taken meanwhile) is counted as a stale redirect where it arrived.
#[test]
fn a_redirect_that_never_pairs_is_counted_stale() {
    let c = Cluster::start(&["a", "b"], "pair_wait = 1");
    let _r = c.responder("a");
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    let r = c.get("b", "/late");
    assert_eq!(r.status, 307);
    let q = location(&r).1;
    // Someone else (another address) takes a's only responder first.
    let mut other = support::connect_from(
        ip("127.0.0.9"),
        std::net::SocketAddr::new(ip("127.0.0.2"), q),
    )
    .unwrap();
    std::io::Write::write_all(&mut other, b"first").unwrap();
    assert!(wait_until(one_beat(), || c.waiting("a") == 0));
    // The redirected mobile arrives and sends: nobody to pair with.
    let mut late = std::net::TcpStream::connect(("127.0.0.2", q)).unwrap();
    std::io::Write::write_all(&mut late, b"late").unwrap();
    assert!(wait_until(one_beat() * 2, || c
        .node("a")
        .counter("stale_redirects")
        == 1));
    assert_eq!(c.node("a").counter("redirects_received"), 0);
}

/// The original ecosystem's hidden server (the steward's behaviour: 15 kept
/// waiting, a new registration after every pairing), registered at node a
/// only, is reached through node b by cross-node 307s, and settles.
#[test]
fn an_original_hidden_server_at_one_node_is_reached_through_another() {
    let c = Cluster::start(&["a", "b"], "");
    let app = support::PlainApp::start();
    let s = steward::Steward::start(steward::Params {
        relay: c.node("a").addr(),
        registrar: "registrar.localhost".into(),
        ca_pem: c.ca_pem.clone(),
        id: c.prov.id().to_string(),
        totp: c.prov.totp().unwrap(),
        label: LABEL.into(),
        service: std::net::SocketAddr::from(([127, 0, 0, 1], app.port)),
        keep: 15,
    });
    assert!(
        wait_until(Duration::from_secs(20), || c.waiting("a") == 15),
        "steward: {} registrations, errors {:?}",
        s.registrations(),
        s.errors()
    );
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    for i in 0..5 {
        let r = c.get("b", &format!("/from-b/{i}"));
        assert_eq!(r.status, 307, "{r:?}");
        let (host, q) = location(&r);
        assert_eq!(host, format!("{LABEL}.a.taas.localhost"));
        let mut mobile = std::net::TcpStream::connect(("127.0.0.2", q)).unwrap();
        mobile
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        std::io::Write::write_all(
            &mut mobile,
            format!("GET /from-b/{i} HTTP/1.0\r\nHost: {LABEL}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let got = support::read_until_closed(&mut mobile).unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains(support::APP_TEXT), "{text}");
    }
    // Every pairing's path came across from b's 307.
    assert!(wait_until(one_beat(), || c
        .node("a")
        .counter("redirects_received")
        == 5));
    // It keeps 15 waiting, and registers no more than once per pairing.
    assert!(wait_until(Duration::from_secs(10), || c.waiting("a") == 15));
    assert!(
        s.registrations() <= 15 + 5 + 1,
        "{} registrations",
        s.registrations()
    );
}

/// An agent that knows one node only (`--relay` a): a killed, then
/// restarted, a is registered at again after the agent's back-off, and the
/// label is reached through b again by cross-node 307s (curl as the mobile).
#[test]
fn an_agent_at_one_node_comes_back_through_the_others_after_its_node_restarts() {
    if !support::need_tool("/usr/bin/curl", "curl") {
        return;
    }
    let mut c = Cluster::start(&["a", "b"], "");
    let app = support::PlainApp::start();
    let json = c
        .dir
        .path()
        .join("prov")
        .join(format!("{}.json", c.prov.id()));
    let log = c.dir.path().join("agent.log");
    let a = c.node("a").addr().to_string();
    let _agent = support::expose(
        &json,
        app.port,
        &["--tls", "--relay", &a, "--pool", "2"],
        &log,
    );
    assert!(wait_until(Duration::from_secs(15), || c.waiting("a") == 2));
    assert!(
        wait_until(one_beat(), || c.curl("b", "/").0),
        "not reached through b before"
    );
    c.node_mut("a").kill();
    assert!(wait_until(one_ttl(), || c.get("b", "/").status == 503));
    c.node_mut("a").restart();
    // The agent's slots back off (at most 30 s) and register at a again.
    assert!(
        wait_until(taas::agent::MAX_BACKOFF + one_beat(), || c.waiting("a")
            >= 1),
        "agent log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(wait_until(one_beat(), || {
        let (ok, out, _) = c.curl("b", "/");
        ok && out.contains(support::APP_TEXT)
    }));
}

/// A fixed-port label (`cam:PORT`) listens on PORT at every node that holds
/// its responders, and another node's 307 names that node and PORT.
#[test]
fn a_fixed_port_label_listens_at_each_node_that_holds_its_responders() {
    let c = Cluster::start(&["a", "b"], "");
    // A port outside every node's port_range (those lie below 23000).
    let port = support::free_port();
    let out = c.dir.path().join("prov-cam");
    let (ok, stdout, err) = support::users_add(
        c.dir.path(),
        &c.node("a").config,
        &format!("cam:{port}"),
        &out,
    );
    assert!(ok, "users add: {err}");
    let prov =
        taas::provision::Provision::load(std::path::Path::new(stdout.lines().next().unwrap()))
            .unwrap();
    let responder_at = |node: &str| {
        let mut r = taas::agent::Registrar::from_provision(&prov).unwrap();
        r.connect = c.node(node).addr().to_string();
        let plug = r.register("cam").unwrap();
        let s = std::net::TcpStream::connect(plug).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let listeners = || {
        let want = format!(":{port:04X}");
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
            .count()
    };
    let mut at_a = responder_at("a");
    assert!(
        wait_until(one_beat(), || listeners() == 1),
        "a listens on {port}"
    );
    assert!(wait_until(one_beat(), || c
        .node("b")
        .counter("directory_size")
        >= 1));
    // b has none: its 307 names a and the fixed port.
    let get = |node: &str| {
        let tcp = std::net::TcpStream::connect(c.node(node).addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = support::tls_stream(&c.ca_pem, "cam.taas.localhost", tcp);
        std::io::Write::write_all(
            &mut tls,
            b"GET /cam HTTP/1.1\r\nHost: cam.taas.localhost\r\n\r\n",
        )
        .unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut tls, &mut got);
        support::Reply::parse(&got)
    };
    let r = get("b");
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(location(&r), ("cam.a.taas.localhost".to_string(), port));
    bytes_both_ways(ip("127.0.0.2"), port, &mut at_a);
    // A responder at b too: b listens on the same port at its own address.
    let _at_b = responder_at("b");
    assert!(
        wait_until(one_beat(), || listeners() == 2),
        "b listens on {port}"
    );
    let r = get("b");
    assert_eq!(location(&r), ("cam.taas.localhost".to_string(), port));
}
