//! Operations: `/metrics` and `/status` move by exactly what happened, `/ready`,
//! `taas --version`, SIGHUP reopens the log file, SIGTERM lets a live pair finish
//! and exits 0, and the systemd unit verifies.
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{TestRelay, free_port, taas, taas_bin, wait_until};

/// `GET path` on the status listener: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let r = support::Reply::parse(&out);
    (r.status, r.body)
}

/// The samples of a Prometheus text exposition.
fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, key: &str) -> f64 {
    b.get(key).copied().unwrap_or(0.0) - a.get(key).copied().unwrap_or(0.0)
}

#[test]
fn metrics_and_status_count_exactly_one_registration_and_pair() {
    let relay = TestRelay::start("status_listen = \"127.0.0.1:0\"");
    let status = relay.server.status_addr().unwrap();
    let p = relay.add_account("demo");
    assert_eq!(get(status, "/ready").0, 200);
    let before = metrics(status);

    let mut hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/m").unwrap();
    let mut mobile = TcpStream::connect(q).unwrap();
    mobile.write_all(&[1u8; 1000]).unwrap();
    mobile.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    hidden.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 1000);
    hidden.write_all(&[2u8; 300]).unwrap();
    hidden.shutdown(Shutdown::Write).unwrap();
    mobile.read_to_end(&mut got).unwrap();
    let closed = |m: &HashMap<String, f64>| delta(&before, m, "taas_pairs_closed_total") >= 1.0;
    assert!(wait_until(Duration::from_secs(10), || closed(&metrics(
        status
    ))));

    let after = metrics(status);
    for (key, want) in [
        ("taas_registrations_total{result=\"ok\"}", 1.0),
        ("taas_requests_total{status=\"200\"}", 1.0),
        ("taas_requests_total{status=\"307\"}", 1.0),
        ("taas_pairs_opened_total", 1.0),
        ("taas_pairs_closed_total", 1.0),
        ("taas_pairs_active", 0.0),
        ("taas_relayed_bytes_total{direction=\"up\"}", 1000.0),
        ("taas_relayed_bytes_total{direction=\"down\"}", 300.0),
        ("taas_auth_failures_total", 0.0),
        ("taas_rendezvous_ports_open", 1.0),
    ] {
        assert_eq!(delta(&before, &after, key), want, "{key}");
    }
    assert_eq!(
        after.get("taas_waiting_responders{label=\"demo\"}"),
        Some(&0.0)
    );

    // A failed authentication moves its counter by one.
    let r = relay.request(
        "PUT",
        "registrar.localhost",
        "/register/demo",
        Some(&format!(
            "TOTP username=\"{}\", response=\"000000\"",
            p.id()
        )),
    );
    assert_eq!(r.status, 401);
    let later = metrics(status);
    assert_eq!(delta(&after, &later, "taas_auth_failures_total"), 1.0);
    assert_eq!(
        delta(
            &after,
            &later,
            "taas_registrations_total{result=\"unauthorized\"}"
        ),
        1.0
    );

    let (code, body) = get(status, "/status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["labels"][0]["label"], "demo");
    assert_eq!(v["pairs_active"], 0);
    assert_eq!(v["limits"]["max_waiting"], 21);
    assert!(
        v["version"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(get(status, "/nope").0, 404);
}

#[test]
fn ready_is_503_when_the_store_is_down() {
    let mut redis = support::RedisServer::start();
    let relay = TestRelay::start_with_store("status_listen = \"127.0.0.1:0\"", Some(&redis.url()));
    let status = relay.server.status_addr().unwrap();
    assert_eq!(get(status, "/ready").0, 200);
    redis.stop();
    assert_eq!(get(status, "/ready").0, 503);
}

#[test]
fn version_names_the_git_revision() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = taas(dir.path(), &["--version"]);
    assert!(ok);
    assert!(
        out.starts_with(&format!("taas {} (git ", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    let rev = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Some(rev) = rev.ok().filter(|o| o.status.success()) {
        let rev = String::from_utf8_lossy(&rev.stdout).trim().to_string();
        assert!(out.contains(&rev), "{out} does not name {rev}");
    }
}

/// A child process killed on drop, so a failed assertion leaves none behind.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sighup_reopens_the_log_and_sigterm_lets_a_live_pair_finish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let port = free_port();
    let config = dir.path().join("taas.toml");
    std::fs::write(
        &config,
        format!(
            "port = {port}\nstore = \"file:{d}/accounts.json\"\ncert = \"{d}/r.crt\"\nkey = \"{d}/r.key\"\n\
             log_file = \"{d}/taas.log\"\nshutdown_grace = 20\n"
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    assert!(taas(dir.path(), &["cert", "-c", c]).0);
    let (ok, out, _) = taas(
        dir.path(),
        &[
            "users",
            "add",
            "demo",
            "--out",
            &format!("{d}/prov"),
            "-c",
            c,
        ],
    );
    assert!(ok);
    let p = taas::provision::Provision::load(std::path::Path::new(out.trim())).unwrap();
    let mut child = Reap(
        Command::new(taas_bin())
            .args(["serve", "-c", c])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let log = dir.path().join("taas.log");
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        ("127.0.0.1", port)
    )
    .is_ok()));

    // logrotate moves the file; SIGHUP makes the relay write to a new one, and
    // re-read the store, where an account was added meanwhile.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the log names IDs and addresses");
    std::fs::rename(&log, dir.path().join("taas.log.1")).unwrap();
    let added = taas(
        dir.path(),
        &[
            "users",
            "add",
            "other",
            "--out",
            &format!("{d}/prov"),
            "-c",
            c,
        ],
    );
    assert!(added.0);
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("SIGHUP") && t.contains("accounts in the store: 2"))
    }));
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the reopened log too");

    // A live pair.
    let registrar = taas::agent::Registrar::from_provision(&p).unwrap();
    let plug = registrar.register("demo").unwrap();
    let mut hidden = TcpStream::connect(plug).unwrap();
    hidden
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("PUT registrar.localhost/register/demo"),
        "{text}"
    );
    assert!(!text.contains(&p.base32), "the secret reached the log");
    let mut q = None;
    assert!(wait_until(Duration::from_secs(10), || {
        q = rendezvous_port(&p, port);
        q.is_some()
    }));
    let mut mobile = TcpStream::connect(("127.0.0.1", q.unwrap())).unwrap();
    mobile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mobile.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    hidden.read_exact(&mut buf).unwrap();
    // The mobile's path is logged, its query (a secret of the hidden service's
    // users, often) is not.
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("pair demo"))
    }));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("/app?…"), "{text}");
    assert!(!text.contains("s3cret-query"), "a query reached the log");

    // SIGTERM: no new connections, but the pair goes on until it ends.
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        ("127.0.0.1", port)
    )
    .is_err()));
    hidden.write_all(b"after sigterm").unwrap();
    let mut back = [0u8; 13];
    mobile.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after sigterm");
    drop(mobile);
    drop(hidden);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(15), || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "exit status {status:?}");
}

/// The rendezvous port from a 307 of the relay on `port`, if any.
fn rendezvous_port(p: &taas::provision::Provision, port: u16) -> Option<u16> {
    let cfg = support::client_tls(p.server.ca.as_deref().unwrap());
    let name = rustls::pki_types::ServerName::try_from("demo.taas.localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(("127.0.0.1", port)).ok()?);
    write!(
        tls,
        "GET /app?code=s3cret-query HTTP/1.1\r\nHost: demo.taas.localhost\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let r = support::Reply::parse(&out);
    let loc = r.header("location")?;
    loc.rsplit(':').next()?.split('/').next()?.parse().ok()
}

#[test]
fn systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("skipped: systemd-analyze is not installed here");
        return;
    };
    assert!(out.status.success());
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/taas.service"))
            .unwrap();
    for key in [
        "User=taas",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "LimitNOFILE=",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(key), "unit lacks {key}");
    }
    // Verify against the binary built here (the unit names /usr/local/bin/taas).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taas.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/taas", taas_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("taas.service")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}
