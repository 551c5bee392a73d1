//! `taas expose` spreads its pool over every relay node it knows: two
//! `taas serve` processes on 127.0.0.2 and 127.0.0.3 sharing one accounts file
//! and one certificate, a plain-HTTP app, and the agent with `--relay` for
//! each. Both nodes keep `--pool` waiting; a mobile gets through each; one node
//! SIGKILLed leaves the other serving every request with its pool full, while
//! the dead node's slots back off (counted at its address) and refill when it
//! comes back. Also: the default relays (every address of `server.hostname`),
//! and the errors for a bad `--relay` and a name that does not resolve.
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{APP_TEXT, PlainApp, Proc, Reply, TestRelay, taas, taas_bin, wait_until};

/// How long a pool may take to fill (or refill) at a node.
const FILL: Duration = Duration::from_secs(20);

/// A port free on `ip` a moment ago.
fn free_port_on(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One relay node: its config file, well-known and status addresses.
struct Node {
    config: PathBuf,
    addr: SocketAddr,
    status: SocketAddr,
    log: PathBuf,
}

impl Node {
    /// `taas serve` for this node, once its well-known port accepts.
    fn serve(&self) -> Proc {
        let child = Proc(
            Command::new(taas_bin())
                .args(["serve", "-c", self.config.to_str().unwrap()])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&self.log).unwrap())
                .spawn()
                .unwrap(),
        );
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect(self.addr)
                .is_ok()),
            "relay {} did not start: {}",
            self.addr,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        child
    }

    /// Responders waiting for `web` at this node, from its `/status`; None
    /// when the node does not answer.
    fn waiting(&self) -> Option<u64> {
        let mut s = TcpStream::connect_timeout(&self.status, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let v: serde_json::Value = serde_json::from_str(&Reply::parse(&out).body).ok()?;
        let labels = v["labels"].as_array()?;
        Some(
            labels
                .iter()
                .find(|l| l["label"] == "web")
                .and_then(|l| l["waiting"].as_u64())
                .unwrap_or(0),
        )
    }

    /// Polls `/status` until `web` has `want` waiting here.
    fn reaches(&self, want: u64, limit: Duration) -> bool {
        wait_until(limit, || self.waiting() == Some(want))
    }

    /// A mobile client through this node: `GET path` on the well-known port
    /// (TLS, trusting only the relays' CA), the 307 followed to the rendezvous
    /// port at this node's address, the request sent there in plain HTTP (the
    /// agent is a raw pipe to a plain app). The app's page, or why not.
    fn fetch(&self, ca: &str, path: &str) -> Result<String, String> {
        let host = "web.taas.localhost";
        let tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = support::tls_stream(ca, host, tcp);
        write!(tls, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")
            .and_then(|()| tls.flush())
            .map_err(|e| format!("request to {}: {e}", self.addr))?;
        let answer = support::read_until_closed(&mut tls).map_err(|e| e.to_string())?;
        let r = Reply::parse(&answer);
        let location = match (r.status, r.header("location")) {
            (307, Some(l)) => l.to_string(),
            _ => return Err(format!("{}: {} {}", self.addr, r.status, r.body)),
        };
        // The Location names web.taas.localhost:Q; Q listens on this node.
        let q = SocketAddr::new(self.addr.ip(), support::location_addr(&location).port());
        let mut m = TcpStream::connect_timeout(&q, Duration::from_secs(5))
            .map_err(|e| format!("connect {q}: {e}"))?;
        m.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            m,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("send to {q}: {e}"))?;
        let page = support::read_until_closed(&mut m).map_err(|e| format!("{q}: {e}"))?;
        let page = String::from_utf8_lossy(&page).into_owned();
        if page.contains(APP_TEXT) && page.contains(path) {
            Ok(page)
        } else {
            Err(format!("{q} gave {page:?}"))
        }
    }
}

/// Two nodes in one directory: one certificate and CA (made once by `taas
/// cert`), one accounts file, an account `web`.
struct Cluster {
    dir: tempfile::TempDir,
    a: Node,
    b: Node,
    provision: PathBuf,
    ca: String,
}

fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let node = |last: u8| {
        let ip = Ipv4Addr::new(127, 0, 0, last);
        let (port, status) = (free_port_on(ip), free_port_on(ip));
        let config = dir.path().join(format!("node{last}.toml"));
        std::fs::write(
            &config,
            format!(
                "public_host = \"{ip}\"\nport = {port}\nstatus_listen = \"{ip}:{status}\"\n\
                 store = \"file:{d}/accounts.json\"\ncert = \"{d}/r.crt\"\nkey = \"{d}/r.key\"\n\
                 ca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\npair_wait = 2\n"
            ),
        )
        .unwrap();
        Node {
            config,
            addr: SocketAddr::from((ip, port)),
            status: SocketAddr::from((ip, status)),
            log: dir.path().join(format!("node{last}.log")),
        }
    };
    let (a, b) = (node(2), node(3));
    let provision = support::cert_and_account(dir.path(), &a.config, "web");
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
    Cluster {
        dir,
        a,
        b,
        provision,
        ca,
    }
}

/// Counts the TCP connections made to `addr` (the registrations a down node's
/// slots attempt) and closes each at once; stops on drop.
struct Counter {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Counter {
    fn start(addr: SocketAddr) -> Counter {
        let listener = TcpListener::bind(addr).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (count.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if conn.is_ok() {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Counter {
            addr,
            count,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The most registrations one failing slot can attempt in `window`: one at
/// its start, then one after each wait, the waits being at least half of
/// `FIRST_BACKOFF` doubled per failure in a row (capped), the first after one
/// failure already. A slot that retried without backing off would make
/// hundreds.
fn most_attempts(window: Duration) -> usize {
    use taas::agent::{FIRST_BACKOFF, MAX_BACKOFF};
    let (mut waited, mut attempts) = (Duration::ZERO, 1u32);
    loop {
        let wait = (FIRST_BACKOFF * (1 << attempts.min(10))).min(MAX_BACKOFF) / 2;
        waited += wait;
        if waited > window {
            return attempts as usize;
        }
        attempts += 1;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_pool_waits_at_every_node_and_survives_losing_one() {
    let started = Instant::now();
    let c = cluster();
    let mut relay_a = c.a.serve();
    let _relay_b = c.b.serve();
    let app = PlainApp::start();
    let log = c.dir.path().join("agent.log");
    let (ra, rb) = (c.a.addr.to_string(), c.b.addr.to_string());
    let _agent = support::expose(
        &c.provision,
        app.port,
        &["--relay", &ra, "--relay", &rb, "--pool", "2"],
        &log,
    );
    let why = |what: &str| format!("{what}; agent log:\n{}", read(&log));

    // Two waiting at each node.
    assert!(c.a.reaches(2, FILL), "{}", why(&format!("pool at {ra}")));
    assert!(c.b.reaches(2, FILL), "{}", why(&format!("pool at {rb}")));
    assert!(
        read(&log).contains(&format!("via {ra}, {rb} with 2 waiting at each")),
        "{}",
        why("the start line names both relays")
    );

    // A mobile gets through each node, and each pool refills.
    for (node, name) in [(&c.a, "a"), (&c.b, "b")] {
        let path = format!("/through-{name}");
        if let Err(e) = node.fetch(&c.ca, &path) {
            panic!("{}", why(&e));
        }
        assert!(node.reaches(2, FILL), "{}", why("refill after a pairing"));
    }

    // Node a dies without a word. Its address is then watched: every
    // registration its slots attempt is a connection there, closed at once.
    let _ = relay_a.0.kill();
    let _ = relay_a.0.wait();
    let counter = Counter::start(c.a.addr);
    let window = Instant::now();
    // Every request through node b succeeds, and b's pool is back at 2 after
    // each: node a's slots failing slows nothing there.
    for i in 0..8 {
        let path = format!("/after-a-died/{i}");
        if let Err(e) = c.b.fetch(&c.ca, &path) {
            panic!("{}", why(&format!("request {i} through b: {e}")));
        }
        assert!(c.b.reaches(2, FILL), "{}", why("b's pool after a pairing"));
    }
    // And it stays at 2 while nothing happens.
    assert!(
        support::holds_for(Duration::from_secs(2), || c.b.waiting() == Some(2)),
        "{}",
        why("b's pool held at 2")
    );
    let (attempts, took) = (counter.count(), window.elapsed());
    let most = 2 * most_attempts(took);
    eprintln!("{attempts} registrations at the dead node in {took:?} (at most {most})");
    assert!(
        (1..=most).contains(&attempts),
        "{attempts} registrations at the dead node in {took:?}, backing off allows 1 to {most}; {}",
        why("backoff")
    );
    let text = read(&log);
    assert!(
        text.contains(&format!("relay {ra}: slot 0: ")) && text.contains("retrying"),
        "{}",
        why("the failing slots are logged with their relay")
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains(&format!("relay {rb}: slot")) && l.contains("retrying")),
        "{}",
        why("node b's slots never failed")
    );
    for line in text.lines().filter(|l| l.contains("slot")) {
        assert!(
            line.contains(&format!("relay {ra}: slot"))
                || line.contains(&format!("relay {rb}: slot")),
            "a slot line names no relay: {line}"
        );
    }

    // Node a comes back: its slots, backed off, fill its pool again.
    drop(counter);
    let _relay_a = c.a.serve();
    assert!(c.a.reaches(2, FILL), "{}", why("pool back at a"));
    if let Err(e) = c.a.fetch(&c.ca, "/a-is-back") {
        panic!("{}", why(&e));
    }
    assert_eq!(c.b.waiting(), Some(2), "b untouched");
    eprintln!("spread test ran {:?}", started.elapsed());
    if std::env::var_os("SPREAD_SHOW_LOG").is_some() {
        eprintln!("{}", read(&log));
    }
}

/// Without `--relay`, the relays are every address of `server.hostname`:
/// `localhost` here (127.0.0.1, and ::1 where the system lists it; nothing
/// listens there on ::1, so that slot only backs off).
#[test]
fn without_relay_every_address_of_the_hostname_is_a_relay() {
    let relay = TestRelay::start("");
    let mut p = relay.add_account("web");
    p.server.hostname = "localhost".into();
    p.server.port = relay.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let (json, _) = p.write(dir.path()).unwrap();
    let app = PlainApp::start();
    let log = dir.path().join("agent.log");
    let _agent = support::expose(&json, app.port, &["--pool", "3"], &log);
    let full = wait_until(FILL, || relay.waiting("web") == 3);
    let text = read(&log);
    assert!(full, "pool at 127.0.0.1; agent log:\n{text}");
    let v4 = format!("127.0.0.1:{}", relay.addr.port());
    assert!(
        text.contains(&v4) && text.contains("(every address of localhost) with 3 waiting at each"),
        "{text}"
    );
}

#[test]
fn a_bad_relay_or_a_name_that_does_not_resolve_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // RFC 6761: a name under .invalid never resolves.
    let p = support::plain_provision("relay.invalid", 8443);
    let json = p.write(dir.path()).unwrap().0;
    let json = json.to_str().unwrap();
    let expose = |more: &[&str]| {
        let mut args = vec!["expose", json, "--to", "127.0.0.1:1"];
        args.extend_from_slice(more);
        taas(dir.path(), &args)
    };
    for bad in ["127.0.0.2", "127.0.0.2:0", "::1:443", "relay:port"] {
        let (ok, _, err) = expose(&["--relay", "127.0.0.3:8443", "--relay", bad]);
        assert!(!ok, "--relay {bad} accepted");
        assert!(
            err.starts_with("taas: bad --relay ") && err.contains(&format!("{bad:?}")),
            "--relay {bad}: {err}"
        );
    }
    let (ok, _, err) = expose(&[]);
    assert!(!ok);
    assert!(
        err.contains("taas: cannot resolve relay.invalid"),
        "unresolvable server.hostname: {err}"
    );
    // A local service without its port is refused the same way, by name.
    for bad in ["nothost", "127.0.0.1", "[::1]", "app:http"] {
        let (ok, _, err) = taas(
            dir.path(),
            &["expose", json, "--to", bad, "--relay", "127.0.0.3:8443"],
        );
        assert!(!ok, "--to {bad} accepted");
        assert!(
            err.starts_with("taas: bad --to ") && err.contains(&format!("{bad:?}")),
            "--to {bad}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}
