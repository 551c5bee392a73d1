//! The registrar over real TLS (docs/PROTOCOL.md sections 1 and 4): every row of the
//! answer tables, the throttle, the replay rule, Host matching, the pairings list,
//! registration with real `curl` and `oathtool`, and the whole path on Redis.
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use support::{Reply, TestRelay, metric, send};
use taas::provision::Provision;

const REGISTRAR: &str = "registrar.localhost";

/// Another loopback address, to play a second host.
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// `Authorization` for `p` with its token at `unix_time`.
fn auth_at(p: &Provision, unix_time: u64) -> String {
    let token = p.totp().unwrap().generate(unix_time);
    format!("TOTP username=\"{}\", response=\"{token}\"", p.id())
}

/// A token of the right length that no step of the accepted window gives.
fn wrong_token(p: &Provision) -> String {
    let totp = p.totp().unwrap();
    let now = taas::unix_time();
    let window: Vec<String> = (0..=4).map(|i| totp.generate(now + 60 - i * 30)).collect();
    let mut n: u32 = window[0].parse().unwrap();
    loop {
        n = (n + 1) % 1_000_000;
        let candidate = format!("{n:06}");
        if !window.contains(&candidate) {
            return candidate;
        }
    }
}

/// `Authorization` for `p` with a wrong token.
fn wrong_auth(p: &Provision) -> String {
    format!(
        "TOTP username=\"{}\", response=\"{}\"",
        p.id(),
        wrong_token(p)
    )
}

fn put(relay: &TestRelay, label: &str, auth: Option<&str>) -> Reply {
    relay.request("PUT", REGISTRAR, &format!("/register/{label}"), auth)
}

fn pairings(relay: &TestRelay, label: &str, auth: Option<&str>) -> Reply {
    relay.request("GET", REGISTRAR, &format!("/pairings/{label}"), auth)
}

/// `put` with `p`'s current token.
fn put_as(relay: &TestRelay, label: &str, p: &Provision) -> Reply {
    put(relay, label, Some(&TestRelay::auth(p)))
}

/// `pairings` with `p`'s current token.
fn pairings_as(relay: &TestRelay, label: &str, p: &Provision) -> Reply {
    pairings(relay, label, Some(&TestRelay::auth(p)))
}

/// `PUT /register/demo` with `auth`, sent from the local address `from`.
fn put_from(relay: &TestRelay, from: IpAddr, auth: &str) -> Reply {
    let head = format!(
        "PUT /register/demo HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {auth}\r\n\r\n"
    );
    support::try_raw(relay, Some(from), REGISTRAR, head.as_bytes()).unwrap()
}

fn assert_closes(r: &Reply) {
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
}

fn assert_challenge(r: &Reply) {
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("www-authenticate"), Some("TOTP realm=\"taas\""));
    assert_closes(r);
}

/// `r` is a 503 with Retry-After that closes the connection.
fn assert_unavailable(r: &Reply) {
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert_closes(r);
}

#[test]
fn success_is_200_text_plain_host_port_and_the_plug_listens() {
    let relay = TestRelay::start("plug_timeout = 5");
    let p = relay.add_account("demo");
    let r = put_as(&relay, "demo", &p);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_closes(&r);
    let body = r.body.trim_end();
    let (host, port) = body.rsplit_once(':').unwrap();
    assert_eq!(host, "127.0.0.1");
    let port: u16 = port.parse().unwrap();
    assert!((20000..=29999).contains(&port), "{port} outside port_range");
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );
    let _hidden = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(support::wait_until(Duration::from_secs(5), || relay
        .waiting("demo")
        == 1));
}

#[test]
fn missing_authorization_is_401_with_challenge() {
    let relay = TestRelay::start("");
    relay.add_account("demo");
    assert_challenge(&put(&relay, "demo", None));
    assert_challenge(&pairings(&relay, "demo", None));
}

#[test]
fn malformed_authorization_is_400() {
    let relay = TestRelay::start("auth_fail_budget = 3\nauth_fail_refill = 60");
    let p = relay.add_account("demo");
    let token = p.totp().unwrap().generate(taas::unix_time());
    let id = p.id();
    for bad in [
        "Basic dXNlcjpwYXNz".to_string(),
        format!("TOTP response=\"{token}\""),
        format!("TOTP username=\"{id}\""),
        format!("TOTP username=\"\", response=\"{token}\""),
        "TOTP".to_string(),
    ] {
        let r = put(&relay, "demo", Some(&bad));
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert_closes(&r);
        assert_eq!(pairings(&relay, "demo", Some(&bad)).status, 400, "{bad}");
    }
    // Malformed headers are not failed attempts: the budget is untouched.
    assert_eq!(put_as(&relay, "demo", &p).status, 200);
}

#[test]
fn unknown_id_and_wrong_token_are_401() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let token = p.totp().unwrap().generate(taas::unix_time());
    let unknown =
        format!("TOTP username=\"00000000-0000-4000-8000-000000000000\", response=\"{token}\"");
    assert_challenge(&put(&relay, "demo", Some(&unknown)));
    let wrong = wrong_auth(&p);
    assert_challenge(&put(&relay, "demo", Some(&wrong)));
    assert_challenge(&pairings(&relay, "demo", Some(&wrong)));
    assert_challenge(&pairings(&relay, "demo", Some(&unknown)));
    // Bare parameters in another order are the same credentials.
    let bare = format!("totp response={token},username={}", p.id());
    assert_eq!(put(&relay, "demo", Some(&bare)).status, 200);
}

#[test]
fn label_not_owned_is_403() {
    let relay = TestRelay::start("plug_timeout = 1");
    let _owner = relay.add_account("demo");
    let other = relay.add_account("other");
    let r = put_as(&relay, "demo", &other);
    assert_eq!(r.status, 403, "{r:?}");
    assert_closes(&r);
    let r = pairings_as(&relay, "demo", &other);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(put_as(&relay, "other", &other).status, 200);
}

#[test]
fn failures_past_the_budget_are_429_and_a_success_does_not_reset_it() {
    let relay = TestRelay::start("auth_fail_budget = 3\nauth_fail_refill = 60\nplug_timeout = 1");
    let p = relay.add_account("demo");
    let wrong = wrong_auth(&p);
    assert_challenge(&put(&relay, "demo", Some(&wrong)));
    assert_challenge(&put(&relay, "demo", Some(&wrong)));
    // A success in between leaves the two failures counted.
    assert_eq!(put_as(&relay, "demo", &p).status, 200);
    assert_challenge(&put(&relay, "demo", Some(&wrong)));
    // Budget spent: even good credentials are refused until it refills.
    for auth in [wrong.as_str(), &TestRelay::auth(&p)] {
        let r = put(&relay, "demo", Some(auth));
        assert_eq!(r.status, 429, "{r:?}");
        assert_closes(&r);
        let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(secs >= 1, "{secs}");
    }
    assert_eq!(pairings_as(&relay, "demo", &p).status, 429);
}

#[test]
fn per_address_budget_applies_across_ids() {
    let relay = TestRelay::start("auth_fail_budget = 3\nauth_fail_refill = 60");
    let p = relay.add_account("demo");
    for i in 0..3 {
        let unknown = format!(
            "TOTP username=\"00000000-0000-4000-8000-00000000000{i}\", response=\"123456\""
        );
        assert_challenge(&put(&relay, "demo", Some(&unknown)));
    }
    // This ID never failed, but the address spent its budget.
    let r = put_as(&relay, "demo", &p);
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some());
}

#[test]
fn per_id_budget_applies_from_another_address() {
    let relay = TestRelay::start("auth_fail_budget = 2\nauth_fail_refill = 60");
    let p = relay.add_account("demo");
    let wrong = wrong_auth(&p);
    for _ in 0..2 {
        let r = put_from(&relay, OTHER_IP, &wrong);
        assert_eq!(r.status, 401);
    }
    // The ID's budget is spent, so this address is refused too.
    let r = put_as(&relay, "demo", &p);
    assert_eq!(r.status, 429, "{r:?}");
}

#[test]
fn replay_rule_burst_from_same_address_but_never_an_older_step() {
    let relay = TestRelay::start("plug_timeout = 1");
    let p = relay.add_account("demo");
    let now = taas::unix_time();
    let current = auth_at(&p, now);
    let older = auth_at(&p, now - 30);
    assert_eq!(put(&relay, "demo", Some(&current)).status, 200);
    assert_eq!(
        put(&relay, "demo", Some(&current)).status,
        200,
        "same token, same address: a burst"
    );
    // An older step, and the same token from another address, are replays:
    // 429 until the next step, and no failure budget spent (two agents of one
    // account must not lock each other out).
    let step_end = (now / 30 + 1) * 30;
    for r in [
        put(&relay, "demo", Some(&older)),
        put_from(&relay, OTHER_IP, &current),
        put_from(&relay, OTHER_IP, &current),
    ] {
        assert_eq!(r.status, 429, "{r:?}");
        let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
        let left = step_end.saturating_sub(taas::unix_time()).max(1);
        assert!(
            wait >= 1 && wait <= left + 1,
            "Retry-After {wait}, step ends in {left}"
        );
    }
    assert_eq!(metric(&relay, "taas_auth_failures_total"), 0);
}

/// Knowing an account's ID does not lock its owner out: a source that
/// authenticated as the ID is held back only by its own budget, while a
/// stranger's failures still spend the ID's budget for every other address.
#[test]
fn a_stranger_burning_the_id_budget_does_not_lock_the_owner_out() {
    let relay = TestRelay::start("auth_fail_budget = 2\nauth_fail_refill = 600\nplug_timeout = 1");
    let p = relay.add_account("demo");
    assert_eq!(put_as(&relay, "demo", &p).status, 200, "the owner's agent");
    let wrong = wrong_auth(&p);
    for _ in 0..2 {
        assert_eq!(put_from(&relay, OTHER_IP, &wrong).status, 401);
    }
    assert_eq!(
        put_from(&relay, OTHER_IP, &wrong).status,
        429,
        "stranger throttled"
    );
    let third: IpAddr = "127.0.0.3".parse().unwrap();
    let r = put_from(&relay, third, &TestRelay::auth(&p));
    assert_eq!(
        r.status, 429,
        "an untrusted address meets the ID's budget: {r:?}"
    );
    for _ in 0..3 {
        let r = put_as(&relay, "demo", &p);
        assert_eq!(r.status, 200, "the owner is not locked out: {r:?}");
    }
}

#[test]
fn other_methods_on_register_are_405_allow_put() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    for method in ["GET", "POST", "DELETE"] {
        let r = relay.request(method, REGISTRAR, "/register/x", None);
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("allow"), Some("PUT"));
        assert_closes(&r);
    }
    let r = relay.request(
        "GET",
        REGISTRAR,
        "/register/demo",
        Some(&TestRelay::auth(&p)),
    );
    assert_eq!(r.status, 405);
}

#[test]
fn unknown_path_is_404() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    for path in [
        "/",
        "/registerdemo",
        "/register",
        "/foo/demo",
        "/pairing/demo",
    ] {
        let r = relay.request("PUT", REGISTRAR, path, Some(&TestRelay::auth(&p)));
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert_closes(&r);
    }
}

#[test]
fn store_unreachable_is_503_with_retry_after() {
    let mut redis = support::RedisServer::start();
    let relay = TestRelay::start_with_store("", Some(&redis.url()));
    let p = relay.add_account("demo");
    redis.stop();
    let r = put_as(&relay, "demo", &p);
    assert_unavailable(&r);
    assert!(
        !r.body.contains("127.0.0.1"),
        "internals stay in the log: {r:?}"
    );
    assert_eq!(pairings_as(&relay, "demo", &p).status, 503);
}

#[test]
fn no_free_port_is_503_with_retry_after() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let relay = TestRelay::start(&format!("port_range = \"{port}-{port}\""));
    let p = relay.add_account("demo");
    assert_unavailable(&put_as(&relay, "demo", &p));
    drop(held);
}

#[test]
fn redirecting_registrar_answers_307_with_location() {
    let relay = TestRelay::start("registrar_redirect = \"https://other.example\"");
    let p = relay.add_account("demo");
    let r = put_as(&relay, "demo", &p);
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://other.example/register/demo")
    );
    assert_closes(&r);
    assert_eq!(relay.waiting("demo"), 0);
}

#[test]
fn two_host_or_two_authorization_headers_are_400() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let a = TestRelay::auth(&p);
    let two_hosts = format!(
        "PUT /register/demo HTTP/1.1\r\nHost: {REGISTRAR}\r\nhost: {REGISTRAR}\r\nAuthorization: {a}\r\n\r\n"
    );
    let two_auths = format!(
        "PUT /register/demo HTTP/1.1\r\nHost: {REGISTRAR}\r\nAuthorization: {a}\r\nAUTHORIZATION: {a}\r\n\r\n"
    );
    for head in [two_hosts, two_auths] {
        let r = relay.raw(REGISTRAR, head.as_bytes());
        assert_eq!(r.status, 400, "{head}: {r:?}");
        assert_closes(&r);
    }
    assert_eq!(relay.waiting("demo"), 0);
}

#[test]
fn host_matching_ignores_case_and_port() {
    let relay = TestRelay::start("plug_timeout = 1");
    let p = relay.add_account("demo");
    for host in [
        "REGISTRAR.LocalHost",
        "registrar.localhost:1",
        "Registrar.localhost:65535",
    ] {
        let head = format!(
            "PUT /register/demo HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\n\r\n",
            TestRelay::auth(&p)
        );
        let r = relay.raw(REGISTRAR, head.as_bytes());
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    let r = relay.request(
        "PUT",
        "demo.taas.localhost",
        "/register/demo",
        Some(&TestRelay::auth(&p)),
    );
    assert_ne!(r.status, 200, "a label host is not the registrar: {r:?}");
}

#[test]
fn pairings_list_oldest_first_as_json() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let r = pairings_as(&relay, "demo", &p);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, "[]");
    let mut mobiles = Vec::new();
    let mut hiddens = Vec::new();
    for path in ["/first", "/second?n=2"] {
        let mut hidden = relay.responder(&p, "demo");
        let q = relay.rendezvous("demo", path).unwrap();
        let mut mobile = TcpStream::connect(q).unwrap();
        send(&mut mobile, &mut hidden, path.as_bytes());
        mobiles.push(mobile);
        hiddens.push(hidden);
    }
    // A direct connection to the rendezvous port, from an address that got no
    // 307: its record has an empty pathname.
    let mut hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/not-this-one").unwrap();
    let mut direct = support::connect_from(OTHER_IP, q).unwrap();
    send(&mut direct, &mut hidden, b"direct");
    let r = pairings_as(&relay, "demo", &p);
    assert_eq!(r.status, 200, "{r:?}");
    assert_closes(&r);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[2]["pathname"], "");
    let d = direct.local_addr().unwrap();
    assert_eq!(list[2]["initiator"], format!("127.0.0.2 {}", d.port()));
    for (i, path) in ["/first", "/second?n=2"].iter().enumerate() {
        let rec = &list[i];
        assert_eq!(rec["pathname"], *path);
        let m = mobiles[i].local_addr().unwrap();
        assert_eq!(rec["initiator"], format!("{} {}", m.ip(), m.port()));
        let h = hiddens[i].local_addr().unwrap();
        assert_eq!(rec["responder"], format!("{} {}", h.ip(), h.port()));
        assert!(rec["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    }
    assert!(list[0]["timestamp"].as_u64() <= list[1]["timestamp"].as_u64());
}

/// Reads an HTTP request head from `s` (up to the blank line).
fn read_request_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Runs `curl -sS -i ARGS https://HOST:PORT/PATH` against the relay, trusting
/// its certificate; returns (exit ok, stdout, stderr).
fn curl_relay(relay: &TestRelay, host: &str, path: &str, args: &[&str]) -> (bool, String, String) {
    let cert = relay.config().cert.to_str().unwrap().to_string();
    let port = relay.addr.port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}{path}");
    let mut all = vec!["-sS", "-i", "--cacert", &cert, "--resolve", &resolve];
    all.extend_from_slice(args);
    all.push(&url);
    support::curl(&all)
}

#[test]
fn curl_and_oathtool_register_and_a_curl_mobile_reaches_the_hidden_server() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let token = support::oathtool(&p.base32, p.digits, &p.algorithm);
    let now = taas::unix_time();
    let totp = p.totp().unwrap();
    assert!(
        [now - 30, now, now + 30]
            .iter()
            .any(|&t| totp.generate(t) == token),
        "oathtool and taas agree on the code"
    );
    let auth = format!(
        "Authorization: TOTP username=\"{}\", response=\"{token}\"",
        p.id()
    );
    let (ok, out, err) = curl_relay(
        &relay,
        "registrar.localhost",
        "/register/demo",
        &["-X", "PUT", "-H", &auth],
    );
    assert!(ok, "curl register: {err}");
    let r = Reply::parse(out.as_bytes());
    assert_eq!(r.status, 200, "{out}");
    let plug = r.body.trim().to_string();
    let mut hidden = TcpStream::connect(&plug).unwrap();
    hidden
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(support::wait_until(Duration::from_secs(5), || relay
        .waiting("demo")
        == 1));

    let (ok, out, err) = curl_relay(&relay, "demo.taas.localhost", "/hello?x=1", &[]);
    assert!(ok, "curl rendezvous: {err}");
    let r = Reply::parse(out.as_bytes());
    assert_eq!(r.status, 307, "{out}");
    let location = r.header("location").unwrap().to_string();
    let q = location
        .strip_prefix("https://demo.taas.localhost:")
        .and_then(|rest| rest.strip_suffix("/hello?x=1"))
        .unwrap_or_else(|| panic!("Location {location}"));

    // The 307 says https; the hidden server here speaks plain HTTP, so the mobile
    // curl goes to the same address with http://.
    let server = std::thread::spawn(move || {
        let head = read_request_head(&mut hidden);
        hidden
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from hidden\n")
            .unwrap();
        hidden.shutdown(Shutdown::Write).unwrap();
        head
    });
    let (ok, out, err) = support::curl(&["-sS", &format!("http://127.0.0.1:{q}/hello?x=1")]);
    assert!(ok, "curl mobile: {err}");
    assert_eq!(out, "hello from hidden\n");
    let head = server.join().unwrap();
    assert!(head.starts_with("GET /hello?x=1 HTTP/1.1\r\n"), "{head}");
}

#[test]
fn whole_path_on_the_redis_store() {
    let redis = support::RedisServer::start();
    let relay = TestRelay::start_with_store("", Some(&redis.url()));
    let p = relay.add_account("demo");
    let mut hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/on-redis").unwrap();
    let mut mobile = TcpStream::connect(q).unwrap();
    mobile
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    send(&mut mobile, &mut hidden, b"ping");
    send(&mut hidden, &mut mobile, b"pong");
    let r = pairings_as(&relay, "demo", &p);
    assert_eq!(r.status, 200, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v[0]["pathname"], "/on-redis");
}
