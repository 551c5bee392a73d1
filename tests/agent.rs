//! End to end with real parts: `taas serve` and `taas expose` as processes, a local
//! HTTPS service (TLS end to end: the relay never terminates it), and `curl -L` as
//! the mobile client; and `taas expose` against a stand-in registrar that frames
//! its answers as the original Node.js relay does (chunked), or otherwise.
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{free_port, taas_bin, wait_until};

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A relay process on a fixed (free) port in `dir`, with `taas.toml` there.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    config: PathBuf,
    provision: PathBuf,
    /// Relay certificate + hidden server certificate: what curl trusts.
    bundle: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let config = dir.path().join("taas.toml");
    std::fs::write(
        &config,
        format!(
            "port = {port}\nstore = \"file:{d}/accounts.json\"\ncert = \"{d}/r.crt\"\nkey = \"{d}/r.key\"\npair_wait = 2\n# 50 concurrent mobiles come from one address here.\nmax_connections_per_ip = 100\n"
        ),
    )
    .unwrap();
    let provision = support::cert_and_account(dir.path(), &config, "web");
    let bundle = dir.path().join("bundle.pem");
    Setup {
        port,
        config,
        provision,
        bundle,
        dir,
    }
}

impl Setup {
    fn serve(&self) -> Proc {
        let child = Command::new(taas_bin())
            .args(["serve", "-c", self.config.to_str().unwrap()])
            .current_dir(self.dir.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let port = self.port;
        assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
            ("127.0.0.1", port)
        )
        .is_ok()));
        Proc(child)
    }

    fn expose(&self, provision: &Path, to: u16) -> Proc {
        self.expose_with(provision, to, &[])
    }

    fn expose_with(&self, provision: &Path, to: u16, more: &[&str]) -> Proc {
        Proc(
            Command::new(taas_bin())
                .args([
                    "expose",
                    provision.to_str().unwrap(),
                    "--to",
                    &format!("127.0.0.1:{to}"),
                    "--pool",
                    "4",
                ])
                .args(more)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// One mobile fetch with curl -L; the body, or None.
    fn fetch(&self, path: &str) -> Option<String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-L",
                "--max-time",
                "10",
                "--cacert",
                self.bundle.to_str().unwrap(),
                "--resolve",
                &format!("web.taas.localhost:{}:127.0.0.1", self.port),
                &format!("https://web.taas.localhost:{}{path}", self.port),
            ])
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The HTTP status curl sees without following.
    fn status(&self) -> String {
        self.unfollowed("%{http_code}", &self.bundle)
    }

    /// The rendezvous address a 307 gives out, once the label has responders:
    /// `web.taas.localhost:Q`, which a client resolves to loopback (as curl and
    /// browsers do for `*.localhost`).
    fn rendezvous(&self) -> Option<String> {
        let url = self.unfollowed("%{redirect_url}", &self.dir.path().join("r.crt"));
        let rest = url.strip_prefix("https://web.taas.localhost:")?;
        Some(format!("127.0.0.1:{}", rest.split('/').next()?))
    }

    /// curl's `-w` output for one mobile request that is not followed.
    fn unfollowed(&self, write_out: &str, cacert: &Path) -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                write_out,
                "--max-time",
                "10",
                "--cacert",
                cacert.to_str().unwrap(),
                "--resolve",
                &format!("web.taas.localhost:{}:127.0.0.1", self.port),
                &format!("https://web.taas.localhost:{}/", self.port),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A local HTTPS service answering every request with its path; stops on drop.
struct Service {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Service {
    fn start(port: u16, bundle: &Path, relay_cert: &Path) -> Service {
        let (cert, key) = taas::cert::generate(vec!["web.taas.localhost".into()]).unwrap();
        let mut pem = std::fs::read_to_string(relay_cert).unwrap();
        pem.push_str(&cert);
        std::fs::write(bundle, pem).unwrap();
        let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        if tls.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let line = String::from_utf8_lossy(&head);
                    let path = line.split(' ').nth(1).unwrap_or("");
                    let body = format!("hello from behind NAT: {path}");
                    let _ = write!(
                        tls,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        Service { port, stop }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A plain TCP service that speaks first, like SMTP: a banner, then it echoes
/// what it gets. Counts the connections it accepted; stops on drop.
struct Banner {
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
}

const BANNER: &[u8] = b"220 banner.test ready\r\n";

impl Banner {
    fn start() -> Banner {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut tcp) = conn else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
                    if tcp.write_all(BANNER).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    // Bounded: at most 5 minutes of quiet polls.
                    for _ in 0..1500 {
                        if s.load(Ordering::SeqCst) {
                            return;
                        }
                        match tcp.read(&mut buf) {
                            Ok(0) => return,
                            Ok(k) => {
                                if tcp.write_all(&buf[..k]).is_err() {
                                    return;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Banner {
            port,
            stop,
            accepted,
        }
    }
}

impl Drop for Banner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A mobile client of the banner service: follows the 307 by hand, reads the
/// banner without sending anything, then checks one echo.
fn banner_exchange(s: &Setup, line: &[u8]) {
    let mut q = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            q = s.rendezvous();
            q.is_some()
        }),
        "no 307 for the label"
    );
    let mut m = TcpStream::connect(q.unwrap()).unwrap();
    m.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; BANNER.len()];
    m.read_exact(&mut got).unwrap();
    assert_eq!(got, BANNER, "the server's first octets reach the mobile");
    m.write_all(line).unwrap();
    let mut echo = vec![0u8; line.len()];
    m.read_exact(&mut echo).unwrap();
    assert_eq!(echo, line);
}

fn agent_threads(agent: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", agent.0.id())).map_or(0, |d| d.count())
}

#[test]
fn eager_agent_serves_a_server_that_speaks_first() {
    let s = setup();
    let _relay = s.serve();
    let svc = Banner::start();
    let _agent = s.expose_with(&s.provision, svc.port, &["--eager"]);
    // Several in a row: the pool refills after each.
    for i in 0..6 {
        banner_exchange(&s, format!("EHLO mobile-{i}\r\n").as_bytes());
    }
}

/// An agent whose pool is larger than the relay's `max_waiting` sees its
/// oldest responders evicted: it must back off rather than re-register in a
/// loop, and an `--eager` agent must not keep a thread and a local connection
/// per evicted responder.
#[test]
fn eager_agent_beyond_max_waiting_backs_off_and_leaks_nothing() {
    let s = setup();
    let mut config = std::fs::read_to_string(&s.config).unwrap();
    config.push_str("max_waiting = 2\n");
    std::fs::write(&s.config, config).unwrap();
    let _relay = s.serve();
    let svc = Banner::start();
    let agent = s.expose_with(&s.provision, svc.port, &["--eager"]);
    banner_exchange(&s, b"first\r\n");
    // Before the fix: thousands of registrations and local connections, and
    // ~500 leaked threads per second. Watched for 5 s, failing at the first sign.
    assert!(
        support::holds_for(Duration::from_secs(5), || svc
            .accepted
            .load(Ordering::SeqCst)
            < 100
            && agent_threads(&agent) < 40),
        "{} local connections, {} agent threads",
        svc.accepted.load(Ordering::SeqCst),
        agent_threads(&agent)
    );
    banner_exchange(&s, b"still served\r\n");
}

fn fetch_eventually(s: &Setup, path: &str, limit: Duration) -> bool {
    let want = format!("hello from behind NAT: {path}");
    wait_until(limit, || s.fetch(path).as_deref() == Some(want.as_str()))
}

#[test]
fn sequential_and_concurrent_fetches_through_the_agent() {
    let s = setup();
    let _relay = s.serve();
    let svc_port = free_port();
    let _svc = Service::start(svc_port, &s.bundle, &s.dir.path().join("r.crt"));
    let _agent = s.expose(&s.provision, svc_port);
    assert!(
        fetch_eventually(&s, "/first", Duration::from_secs(10)),
        "first fetch never worked"
    );
    for i in 0..200 {
        let path = format!("/seq/{i}?q={i}");
        assert_eq!(
            s.fetch(&path).as_deref(),
            Some(format!("hello from behind NAT: {path}").as_str()),
            "fetch {i}"
        );
    }
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let (bundle, port) = (s.bundle.clone(), s.port);
            std::thread::spawn(move || {
                let s2 = Setup {
                    dir: tempfile::tempdir().unwrap(),
                    port,
                    config: PathBuf::new(),
                    provision: PathBuf::new(),
                    bundle,
                };
                let path = format!("/par/{i}");
                s2.fetch(&path) == Some(format!("hello from behind NAT: {path}"))
            })
        })
        .collect();
    let ok = handles
        .into_iter()
        .filter(|_| true)
        .map(|h| h.join().unwrap())
        .filter(|&b| b)
        .count();
    assert_eq!(ok, 50, "concurrent fetches that succeeded");
}

#[test]
fn relay_restart_agent_death_and_service_outage() {
    let s = setup();
    let relay = s.serve();
    let svc_port = free_port();
    let svc = Service::start(svc_port, &s.bundle, &s.dir.path().join("r.crt"));
    let agent = s.expose(&s.provision, svc_port);
    assert!(fetch_eventually(&s, "/before", Duration::from_secs(10)));

    // The relay restarts: the agent re-registers by itself.
    drop(relay);
    let _relay = s.serve();
    assert!(
        fetch_eventually(&s, "/after-restart", Duration::from_secs(10)),
        "not back within 10 s of the restart"
    );

    // The local service goes away: fetches fail, and come back when it does.
    drop(svc);
    assert!(
        wait_until(Duration::from_secs(10), || !support::is_listening(svc_port)),
        "the service did not stop"
    );
    assert!(
        s.fetch("/outage").is_none(),
        "fetch succeeded with the service down"
    );
    let _svc = Service::start(svc_port, &s.bundle, &s.dir.path().join("r.crt"));
    assert!(fetch_eventually(
        &s,
        "/service-back",
        Duration::from_secs(10)
    ));

    // The agent dies: once its responders are found dead, mobiles get 503.
    drop(agent);
    assert!(
        wait_until(Duration::from_secs(10), || s.status() == "503"),
        "no 503 after the agent died"
    );
}

#[test]
fn legacy_js_provisioning_file_works() {
    let s = setup();
    let _relay = s.serve();
    let svc_port = free_port();
    let _svc = Service::start(svc_port, &s.bundle, &s.dir.path().join("r.crt"));
    let js = s.provision.with_extension("js");
    assert!(
        std::fs::read_to_string(&js)
            .unwrap()
            .starts_with("exports.params = {")
    );
    let _agent = s.expose(&js, svc_port);
    assert!(fetch_eventually(&s, "/legacy", Duration::from_secs(10)));
}

// A stand-in registrar (plain HTTP, as an `http://` issuer asks for) that frames
// its 200 in the ways HTTP/1.1 allows, the original Node.js relay's way first.

/// How `FakeRegistrar` frames the body of its 200.
#[derive(Clone, Copy)]
enum Framed {
    /// `Transfer-Encoding: chunked`, the address over two chunks (Node's default
    /// coding); the connection is then kept open, so an agent that waited for the
    /// close would time out.
    Chunked,
    /// No `Content-Length`, no coding: the body, then the close.
    Close,
    /// `Content-Length`, the connection kept open.
    Length,
    /// Chunked with a chunk size that is not hex.
    BadChunk,
}

/// Answers every `PUT /register/web` with a 200 naming its plug listener, which
/// accepts and holds the agent's connections. Counts both; stops its threads on
/// drop.
struct FakeRegistrar {
    port: u16,
    plug_port: u16,
    registrations: Arc<AtomicUsize>,
    plugs: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeRegistrar {
    fn start(framed: Framed) -> FakeRegistrar {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let plug = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plug_port = plug.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let registrations = Arc::new(AtomicUsize::new(0));
        let plugs = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), registrations.clone());
        let registrar = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut tcp) = conn else { continue };
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                tcp.set_nodelay(true).unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if tcp.read(&mut b).unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(b[0]);
                }
                if !head.starts_with(b"PUT /register/web HTTP/1.1\r\n") {
                    continue;
                }
                n.fetch_add(1, Ordering::SeqCst);
                let addr = format!("127.0.0.1:{plug_port}");
                let (first, second) = addr.split_at(4);
                let parts: Vec<String> = match framed {
                    Framed::Chunked => vec![
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                        format!("{:x}\r\n{first}\r\n", first.len()),
                        format!("{:x}\r\n{second}\r\n0\r\n\r\n", second.len()),
                    ],
                    Framed::Close => vec![
                        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
                        addr.clone(),
                    ],
                    Framed::Length => vec![format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{addr}",
                        addr.len()
                    )],
                    Framed::BadChunk => vec![format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{addr}\r\n0\r\n\r\n"
                    )],
                };
                for part in parts {
                    let _ = tcp.write_all(part.as_bytes());
                }
                if matches!(framed, Framed::Chunked | Framed::Length) {
                    held.push(tcp);
                }
            }
        });
        let (s, n) = (stop.clone(), plugs.clone());
        let plugs_thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in plug.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(tcp) = conn {
                    n.fetch_add(1, Ordering::SeqCst);
                    held.push(tcp);
                }
            }
        });
        FakeRegistrar {
            port,
            plug_port,
            registrations,
            plugs,
            stop,
            threads: vec![registrar, plugs_thread],
        }
    }

    /// A provisioning file for it, in `dir`.
    fn provision(&self, dir: &Path) -> PathBuf {
        let p = support::plain_provision("127.0.0.1", self.port);
        p.write(dir).unwrap().0
    }

    fn registrations(&self) -> usize {
        self.registrations.load(Ordering::SeqCst)
    }

    fn plugs(&self) -> usize {
        self.plugs.load(Ordering::SeqCst)
    }
}

impl Drop for FakeRegistrar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = TcpStream::connect(("127.0.0.1", self.plug_port));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `taas expose` against `registrar` with `--pool pool`, its log in `dir/log`.
fn expose_to(registrar: &FakeRegistrar, dir: &Path, pool: usize) -> Proc {
    let provision = registrar.provision(dir);
    let log = std::fs::File::create(dir.join("log")).unwrap();
    Proc(
        Command::new(taas_bin())
            .args([
                "expose",
                provision.to_str().unwrap(),
                "--to",
                &format!("127.0.0.1:{}", free_port()),
                "--pool",
                &pool.to_string(),
            ])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}

/// The agent registers with a registrar framed `framed` and its pool of 3
/// fills at the first try of each slot.
fn pool_fills(framed: Framed) {
    let dir = tempfile::tempdir().unwrap();
    let registrar = FakeRegistrar::start(framed);
    let agent = expose_to(&registrar, dir.path(), 3);
    let filled = wait_until(Duration::from_secs(20), || registrar.plugs() >= 3);
    let log = agent_log(dir.path());
    drop(agent);
    assert!(
        filled,
        "{} plug connections after {} registrations; agent log:\n{log}",
        registrar.plugs(),
        registrar.registrations()
    );
    assert!(!log.contains("retrying"), "a slot failed:\n{log}");
}

#[test]
fn agent_pool_fills_from_a_chunked_answer_like_node() {
    pool_fills(Framed::Chunked);
}

#[test]
fn agent_pool_fills_from_a_close_delimited_answer() {
    pool_fills(Framed::Close);
}

#[test]
fn agent_pool_fills_from_a_content_length_answer_without_waiting_for_the_close() {
    pool_fills(Framed::Length);
}

#[test]
fn agent_backs_off_after_a_malformed_chunked_answer() {
    let dir = tempfile::tempdir().unwrap();
    let registrar = FakeRegistrar::start(Framed::BadChunk);
    let agent = expose_to(&registrar, dir.path(), 1);
    // It retries, and says why.
    let retried = wait_until(Duration::from_secs(20), || {
        registrar.registrations() >= 2 && agent_log(dir.path()).contains("bad chunk size")
    });
    // Then backs off: 250 ms, then 0.5-1 s, 1-2 s, 2-4 s between tries, so a few
    // registrations in the next 3 s, not the hundreds of a loop.
    let looped = wait_until(Duration::from_secs(3), || registrar.registrations() > 8);
    let log = agent_log(dir.path());
    drop(agent);
    assert!(retried, "agent log:\n{log}");
    assert!(
        !looped,
        "{} registrations: no backoff",
        registrar.registrations()
    );
    assert_eq!(registrar.plugs(), 0, "a malformed answer gave a plug");
}
