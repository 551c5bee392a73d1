//! `taas expose --tls` with real parts: a relay in this process (so its waiting
//! count is read directly), `taas expose` as a process, a plain-HTTP app, and
//! mobiles that verify the label's certificate (rustls clients, and curl). The
//! agent ends TLS; the app sees plaintext; the relay carries ciphertext only.
//!
//! The default certificate is the one `taas users add` wrote beside `ID.json`,
//! verified against the relay's CA; certificates given with `--cert`/`--key`
//! come from a CA of the test's own (`support::TestCa`).
//!
//! Shortcut admitted: a build whose relay has no CA yet gets the test's CA in
//! its place, its certificate written as `ID.crt`/`ID.key`.
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{
    APP_TEXT, PlainApp, Proc, TestCa, TestRelay, der_of, expose, tls_connect, wait_until,
};

/// The label's host name.
const NAME: &str = "web.taas.localhost";

/// A relay with one account `web`, its label certificate beside `ID.json`, and
/// a plain app.
struct Setup {
    relay: TestRelay,
    /// `prov/ID.json`.
    provision: PathBuf,
    /// What a mobile trusts for the label (PEM): the relay's CA.
    ca_pem: String,
    /// A CA of the test's own, for `--cert`/`--key` certificates.
    ca: TestCa,
    /// The label certificate served by default (PEM).
    cert_pem: String,
    app: PlainApp,
    /// The agent's log.
    log: PathBuf,
}

fn setup(app: PlainApp) -> Setup {
    let relay = TestRelay::start("");
    let mut p = relay.add_account("web");
    let prov = relay.dir.path().join("prov");
    // The relay bound port 0: the file names the port it got.
    p.server.port = relay.addr.port();
    let provision = p.write(&prov).unwrap().0;
    let ca = TestCa::new();
    let crt = provision.with_extension("crt");
    let relay_ca = relay.dir.path().join("ca.crt");
    let ca_pem = if crt.exists() && relay_ca.exists() {
        std::fs::read_to_string(relay_ca).unwrap()
    } else {
        // A build whose relay has no CA yet: the test's CA stands in for it.
        ca.issue_to(&[NAME], &crt, &provision.with_extension("key"));
        ca.pem.clone()
    };
    let cert_pem = std::fs::read_to_string(&crt).unwrap();
    let log = relay.dir.path().join("agent.log");
    Setup {
        relay,
        provision,
        ca_pem,
        ca,
        cert_pem,
        app,
        log,
    }
}

impl Setup {
    /// `taas expose ID.json --to APP --tls --pool 3 MORE…`, once its pool is full.
    fn agent(&self, more: &[&str]) -> Proc {
        let mut args = vec!["--tls", "--pool", "3"];
        args.extend_from_slice(more);
        let agent = expose(&self.provision, self.app.port, &args, &self.log);
        assert!(
            wait_until(Duration::from_secs(15), || self.waiting() == 3),
            "the pool of 3 never filled; agent log:\n{}",
            self.log()
        );
        agent
    }

    fn waiting(&self) -> usize {
        self.relay.waiting("web")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The rendezvous address a 307 gives.
    fn rendezvous(&self) -> SocketAddr {
        let mut q = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                q = self.relay.rendezvous("web", "/").ok();
                q.is_some()
            }),
            "no 307 for web"
        );
        q.unwrap()
    }

    /// One mobile request over TLS, verified against the test CA: the body and
    /// the certificate the agent showed.
    fn fetch(&self, path: &str) -> std::io::Result<(String, Vec<u8>)> {
        self.fetch_trusting(path, &self.ca_pem)
    }

    /// `fetch`, trusting `ca_pem`.
    fn fetch_trusting(&self, path: &str, ca_pem: &str) -> std::io::Result<(String, Vec<u8>)> {
        let q = self.rendezvous();
        let (mut tls, shown) = tls_connect(q, NAME, ca_pem)?;
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {NAME}:{}\r\nConnection: close\r\n\r\n",
            q.port()
        )?;
        tls.flush()?;
        let got = support::read_until_closed(&mut tls)?;
        Ok((String::from_utf8_lossy(&got).into_owned(), shown))
    }
}

#[test]
fn tls_agent_serves_a_plain_http_app_over_https_with_verification() {
    let s = setup(PlainApp::start());
    let agent = s.agent(&[]);
    for i in 0..10 {
        let path = format!("/seq/{i}");
        let (body, shown) = s.fetch(&path).unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
        assert!(body.contains(APP_TEXT) && body.contains(&path), "{body}");
        assert_eq!(shown, der_of(&s.cert_pem), "the label certificate");
    }
    // curl -L, verifying both hops: the registrar's certificate and the label's.
    let bundle = s.relay.dir.path().join("bundle.pem");
    let relay_pem = s.relay.cert_pem.clone().unwrap();
    std::fs::write(&bundle, format!("{relay_pem}{}", s.ca_pem)).unwrap();
    let (ok, out, err) = support::curl(&[
        "-sS",
        "-L",
        "--cacert",
        bundle.to_str().unwrap(),
        &format!("https://{NAME}:{}/by-curl", s.relay.addr.port()),
    ]);
    assert!(ok && out.contains(APP_TEXT), "curl: {err}\n{out}");
    // A mobile that does not trust the label's certificate is refused in the
    // handshake, and the app never hears of it.
    let before = s.app.connections();
    let q = s.rendezvous();
    assert!(tls_connect(q, NAME, &TestCa::new().pem).is_err());
    assert!(
        wait_until(Duration::from_secs(10), || s.waiting() == 3),
        "the pool did not refill"
    );
    assert_eq!(s.app.connections(), before);
    drop(agent);
    let log = s.log();
    assert!(log.contains("TLS ended here with"), "{log}");
    assert!(log.contains("tls pipe via"), "{log}");
}

/// A deterministic payload larger than any buffer on the way.
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn tls_half_close_passes_both_ways() {
    let s = setup(PlainApp::echo());
    let _agent = s.agent(&[]);
    let data = payload(300 * 1024);
    // close_notify from the mobile: the app sees its EOF (shutdown(Write)),
    // answers, closes; the mobile then gets close_notify: a clean end.
    let q = s.rendezvous();
    let (mut tls, _) = tls_connect(q, NAME, &s.ca_pem).unwrap();
    tls.write_all(&data).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got)
        .expect("the answer ends with close_notify");
    assert_eq!(got.len(), 5 + data.len());
    assert!(got.starts_with(b"echo:") && got[5..] == data[..]);

    // A TCP half-close without close_notify is an end too.
    let q = s.rendezvous();
    let (mut tls, _) = tls_connect(q, NAME, &s.ca_pem).unwrap();
    tls.write_all(b"no close_notify").unwrap();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"echo:no close_notify");
}

/// The first TLS record a real client sends: its ClientHello.
fn client_hello() -> Vec<u8> {
    let cfg = support::client_tls(&TestCa::new().pem);
    let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

#[test]
fn stalled_and_garbage_tls_clients_free_their_threads_and_the_pool_stays_full() {
    let s = setup(PlainApp::start());
    let agent = s.agent(&[]);
    let baseline = agent.threads();
    let q = s.rendezvous();
    let open = |first: &[u8]| {
        let mut m = TcpStream::connect(q).unwrap();
        m.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        m.write_all(first).unwrap();
        m
    };
    // Silent: the relay gives it no responder (it has not spoken).
    let silent = TcpStream::connect(q).unwrap();
    let hello = client_hello();
    let sent = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..2).map(|_| open(&hello[..hello.len() / 2])).collect();
    let mut random = [0u8; 512];
    taas::sys::random_bytes(&mut random).unwrap();
    // Not a TLS content type: refused at the first octet, whatever follows.
    random[0] = 0xff;
    let garbage = [
        open(b"GET / HTTP/1.1\r\nHost: web.taas.localhost\r\n\r\n"),
        open(&random),
    ];
    // Each half ClientHello holds a pipe thread, in its handshake.
    assert!(
        wait_until(Duration::from_secs(5), || agent.threads() >= baseline + 2),
        "{} threads, {baseline} before",
        agent.threads()
    );
    // Garbage is refused at once, and never reaches the app.
    for mut g in garbage {
        let start = Instant::now();
        support::read_until_closed(&mut g).expect("garbage closed, not left waiting");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // The stalled ones are closed at the handshake deadline, not before.
    for m in &mut stalled {
        support::read_until_closed(m).expect("stalled client closed before 30 s");
        let after = sent.elapsed();
        assert!(
            after >= Duration::from_secs(9) && after < Duration::from_secs(20),
            "closed after {after:?}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || agent.threads() <= baseline),
        "{} threads, {baseline} before",
        agent.threads()
    );
    // The slots re-registered at each first octet: the pool is full again.
    assert!(
        wait_until(Duration::from_secs(10), || s.waiting() == 3),
        "{} waiting",
        s.waiting()
    );
    assert_eq!(s.app.connections(), 0, "no handshake, no local connection");
    let (body, _) = s.fetch("/after").unwrap();
    assert!(body.contains(APP_TEXT), "{body}");
    drop(silent);
    let log = s.log();
    assert!(log.contains("handshake timed out"), "{log}");
}

#[test]
fn sighup_gives_new_connections_the_new_certificate() {
    let s = setup(PlainApp::start());
    let dir = s.relay.dir.path().join("certs");
    std::fs::create_dir(&dir).unwrap();
    let (crt, key) = (dir.join("label.crt"), dir.join("label.key"));
    s.ca.issue_to(&[NAME], &crt, &key);
    let first = der_of(&std::fs::read_to_string(&crt).unwrap());
    let agent = s.agent(&[
        "--cert",
        crt.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let (_, shown) = s.fetch_trusting("/a", &s.ca.pem).unwrap();
    assert_eq!(shown, first);
    // A connection made before the reload: its handshake is done.
    let (mut held, _) = tls_connect(s.rendezvous(), NAME, &s.ca.pem).unwrap();

    s.ca.issue_to(&[NAME], &crt, &key);
    let second = der_of(&std::fs::read_to_string(&crt).unwrap());
    agent.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || s
            .fetch_trusting("/b", &s.ca.pem)
            .is_ok_and(|(_, shown)| shown == second)),
        "never served the new certificate; log:\n{}",
        s.log()
    );
    assert!(s.log().contains("SIGHUP: certificate"), "{}", s.log());
    // The one made before still flows.
    write!(
        held,
        "GET /held HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let got = support::read_until_closed(&mut held).unwrap();
    assert!(String::from_utf8_lossy(&got).contains("/held"));

    // A broken certificate, then a key that is not the certificate's: the old
    // one stays, and the log says why.
    std::fs::write(&crt, "not a certificate\n").unwrap();
    reload_refused(&s, &agent, 1, &crt);
    let (other, _) = s.ca.issue(&[NAME]);
    std::fs::write(&crt, other).unwrap();
    reload_refused(&s, &agent, 2, &crt);
    let (_, shown) = s.fetch_trusting("/c", &s.ca.pem).unwrap();
    assert_eq!(shown, second);
}

/// SIGHUP, then the `n`th refusal in the log; the agent runs on.
fn reload_refused(s: &Setup, agent: &Proc, n: usize, crt: &Path) {
    agent.signal("HUP");
    let refusals = || {
        s.log()
            .matches("keeping the certificate loaded before")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || refusals() == n),
        "log:\n{}",
        s.log()
    );
    let log = s.log();
    let line = log
        .lines()
        .filter(|l| l.contains("keeping the certificate"))
        .nth(n - 1)
        .unwrap();
    assert!(
        line.contains(crt.to_str().unwrap()),
        "the line names the file: {line}"
    );
    let (body, _) = s.fetch_trusting("/still", &s.ca.pem).unwrap();
    assert!(body.contains(APP_TEXT));
}

#[test]
fn expose_tls_refuses_bad_flags_and_unreadable_files() {
    let s = setup(PlainApp::start());
    let prov = s.provision.to_str().unwrap();
    let dir = s.relay.dir.path();
    let to = format!("127.0.0.1:{}", s.app.port);
    let run = |more: &[&str]| {
        let mut args = vec!["expose", prov, "--to", &to];
        args.extend_from_slice(more);
        let (ok, _, err) = support::taas_within(dir, &args, Duration::from_secs(10));
        assert!(!ok, "taas {more:?} started");
        assert!(!err.contains("killed after"), "taas {more:?} ran on: {err}");
        err
    };
    let err = run(&["--tls", "--eager"]);
    assert!(err.contains("--eager cannot be used with --tls"), "{err}");
    assert!(run(&["--tls", "--cert", "x.crt"]).contains("--cert and --key go together"));
    assert!(run(&["--cert", "x.crt", "--key", "x.key"]).contains("go with --tls"));

    let (crt, key) = (dir.join("c.crt"), dir.join("c.key"));
    s.ca.issue_to(&[NAME], &crt, &key);
    let (c, k) = (crt.to_str().unwrap(), key.to_str().unwrap());
    let missing = dir.join("missing.crt");
    let err = run(&["--tls", "--cert", missing.to_str().unwrap(), "--key", k]);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    let garbage = dir.join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let err = run(&["--tls", "--cert", c, "--key", garbage.to_str().unwrap()]);
    assert!(
        err.contains(garbage.to_str().unwrap()) && err.contains("private key"),
        "{err}"
    );
    let (_, other_key) = s.ca.issue(&[NAME]);
    let other = dir.join("other.key");
    std::fs::write(&other, other_key).unwrap();
    let err = run(&["--tls", "--cert", c, "--key", other.to_str().unwrap()]);
    assert!(err.contains(c) && err.contains("TLS"), "{err}");

    // The default, ID.crt beside ID.json: when it is not there, it is named.
    let default = s.provision.with_extension("crt");
    std::fs::remove_file(&default).unwrap();
    let err = run(&["--tls"]);
    assert!(
        err.contains(default.to_str().unwrap()) && err.contains("taas users cert"),
        "{err}"
    );
}
