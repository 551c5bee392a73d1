//! Test support: a relay on port 0 in a temporary directory with a certificate
//! from `taas cert`, accounts made by `taas users add`, a small TLS client, a
//! `redis-server` guard that stops on drop, and curl/oathtool helpers.
//!
//! Every process started here is stopped by its guard; every wait is bounded.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taas::provision::Provision;
use taas::{Config, Server};

/// The `taas` binary built for these tests.
pub fn taas_bin() -> &'static str {
    env!("CARGO_BIN_EXE_taas")
}

/// How long a one-shot `taas` command may run in a test before it is killed.
pub const TAAS_LIMIT: Duration = Duration::from_secs(60);

/// Runs `taas ARGS` in `dir`, killed after `TAAS_LIMIT`; returns (exit ok,
/// stdout, stderr).
pub fn taas(dir: &Path, args: &[&str]) -> (bool, String, String) {
    taas_within(dir, args, TAAS_LIMIT)
}

/// Under CI (`CI` set) a missing tool fails the test; elsewhere the test says
/// "skipped" on stderr, visibly, and the caller returns. True when the tool is
/// there.
pub fn need_tool(path: &str, install: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{path} is missing under CI: apt-get install {install}"
    );
    eprintln!("skipped: {path} is absent (apt-get install {install})");
    false
}

/// Polls `f` every 20 ms for `window`: false as soon as it is false (a "nothing
/// happened" check that fails at the first sign of something).
pub fn holds_for(window: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + window;
    while Instant::now() < end {
        if !f() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A port that was free a moment ago (for child processes that need a number).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 10 ms until it is true or `limit` passes; returns its last value.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `taas users add LABEL --out OUT -c CONFIG` in `dir`: (exit ok, stdout,
/// stderr); stdout's first line is the provisioning file's path.
pub fn users_add(dir: &Path, config: &Path, label: &str, out: &Path) -> (bool, String, String) {
    let (out, config) = (out.to_str().unwrap(), config.to_str().unwrap());
    taas(dir, &["users", "add", label, "--out", out, "-c", config])
}

/// `taas cert -c CONFIG`, then `users_add` of LABEL into `dir/prov`; returns
/// the provisioning file's path.
pub fn cert_and_account(dir: &Path, config: &Path, label: &str) -> PathBuf {
    let (ok, _, err) = taas(dir, &["cert", "-c", config.to_str().unwrap()]);
    assert!(ok, "taas cert: {err}");
    let (ok, stdout, err) = users_add(dir, config, label, &dir.join("prov"));
    assert!(ok, "users add {label}: {err}");
    PathBuf::from(stdout.lines().next().unwrap())
}

/// A provisioning file for a relay without TLS (`http://` issuer) at
/// `hostname:port`: account `8f6b2c1e-…`, label `web`, a fixed secret.
pub fn plain_provision(hostname: &str, port: u16) -> Provision {
    Provision {
        uuid: vec!["8f6b2c1e-4d3a-4b5c-9e7f-0a1b2c3d4e5f".into()],
        labels: vec!["web".into()],
        base32: "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP".into(),
        step: 30,
        digits: 6,
        algorithm: "sha1".into(),
        protocol: "totp".into(),
        name: "web.taas.localhost".into(),
        issuer: "http://registrar.localhost".into(),
        server: taas::provision::ServerInfo {
            hostname: hostname.into(),
            port,
            ca: None,
        },
    }
}

/// A relay running in this process, in its own temporary directory.
pub struct TestRelay {
    /// The directory: config, certificate, accounts, provisioning files.
    pub dir: tempfile::TempDir,
    /// The config file written there.
    pub config_path: PathBuf,
    /// The running relay.
    pub server: Server,
    /// Its well-known address.
    pub addr: SocketAddr,
    /// What a client trusts for the relay, when TLS is on: its provisioning
    /// files' `server.ca` (the relay's CA, which signed its certificate).
    pub cert_pem: Option<String>,
}

/// Set TAAS_TEST_LOG=1 to see the relay's log while testing.
fn init_log() {
    if std::env::var_os("TAAS_TEST_LOG").is_some() {
        let _ = taas::logging::init(None);
    }
}

impl TestRelay {
    /// A relay with TLS and `extra` config lines (TOML) on top of test defaults.
    pub fn start(extra: &str) -> TestRelay {
        Self::start_with_store(extra, None)
    }

    /// The same, with `store` (e.g. a redis:// URL) instead of the file store.
    pub fn start_with_store(extra: &str, store: Option<&str>) -> TestRelay {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let store = store.map_or_else(|| format!("file:{d}/accounts.json"), str::to_string);
        let text = format!(
            "port = 0\nstore = \"{store}\"\ncert = \"{d}/registrar.crt\"\nkey = \"{d}/registrar.key\"\nca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n{extra}\n"
        );
        let config_path = dir.path().join("taas.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::load(Some(&config_path)).unwrap();
        let cert_pem = if config.tls {
            let (ok, _, err) = taas(dir.path(), &["cert", "-c", config_path.to_str().unwrap()]);
            assert!(ok, "taas cert: {err}");
            taas::cert::server_ca(&config).unwrap()
        } else {
            None
        };
        let server = Server::bind(config).unwrap();
        let addr = server.local_addr();
        TestRelay {
            dir,
            config_path,
            server,
            addr,
            cert_pem,
        }
    }

    /// The relay's validated config.
    pub fn config(&self) -> &Config {
        self.server.config()
    }

    /// `taas users add LABEL` against this relay's config; returns the file.
    pub fn add_account(&self, label: &str) -> Provision {
        let out = self.dir.path().join("prov");
        let (ok, stdout, err) = users_add(self.dir.path(), &self.config_path, label, &out);
        assert!(ok, "users add {label}: {err}");
        Provision::load(Path::new(stdout.lines().next().unwrap())).unwrap()
    }

    /// One request on the well-known port (TLS when on), with SNI = host.
    pub fn request(&self, method: &str, host: &str, path: &str, auth: Option<&str>) -> Reply {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(a) = auth {
            head.push_str(&format!("Authorization: {a}\r\n"));
        }
        head.push_str("\r\n");
        self.raw(host, head.as_bytes())
    }

    /// Sends raw bytes (after the TLS handshake, when on) and reads the answer.
    pub fn raw(&self, sni: &str, bytes: &[u8]) -> Reply {
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = Vec::new();
        match &self.cert_pem {
            Some(pem) => {
                let cfg = taas::tls::client_config(Some(pem)).unwrap();
                let name = sni.split(':').next().unwrap().to_string();
                let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
                let conn = rustls::ClientConnection::new(cfg, server_name).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                tls.write_all(bytes).unwrap();
                let _ = tls.read_to_end(&mut text);
            }
            None => {
                let mut tcp = tcp;
                tcp.write_all(bytes).unwrap();
                let _ = tcp.read_to_end(&mut text);
            }
        }
        Reply::parse(&text)
    }

    /// `Authorization` value for `p` with its current token.
    pub fn auth(p: &Provision) -> String {
        let token = p.totp().unwrap().generate(taas::unix_time());
        format!("TOTP username=\"{}\", response=\"{token}\"", p.id())
    }

    /// `PUT /register/LABEL` with a fresh token.
    pub fn register(&self, p: &Provision, label: &str) -> Reply {
        let host = self.config().registrar_name.clone();
        self.request(
            "PUT",
            &host,
            &format!("/register/{label}"),
            Some(&Self::auth(p)),
        )
    }

    /// Registers and connects to the plug; returns the responder's socket once the
    /// relay has it in the pool.
    pub fn responder(&self, p: &Provision, label: &str) -> TcpStream {
        let before = self.waiting(label);
        let r = self.register(p, label);
        assert_eq!(r.status, 200, "register: {}", r.body);
        let s = TcpStream::connect(r.body.trim()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let max = self.config().max_waiting;
        assert!(
            wait_until(Duration::from_secs(5), || self.waiting(label) > before
                || before == max),
            "responder never reached the pool"
        );
        s
    }

    /// Responders waiting for `label` now.
    pub fn waiting(&self, label: &str) -> usize {
        self.server.snapshot().label(label).map_or(0, |l| l.waiting)
    }

    /// `GET /` on LABEL's host: the 307's rendezvous address, or the reply.
    pub fn rendezvous(&self, label: &str, path: &str) -> Result<SocketAddr, Reply> {
        let host = format!("{label}.{}", self.config().servers_domain);
        let r = self.request("GET", &host, path, None);
        if r.status != 307 {
            return Err(r);
        }
        Ok(location_addr(r.header("location").unwrap()))
    }
}

/// The address a `Location` sends a client to, resolved as curl and browsers do:
/// a `*.localhost` name is loopback (RFC 6761), an IP address is itself.
pub fn location_addr(location: &str) -> SocketAddr {
    let authority = location
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("Location {location:?}"));
    if let Ok(addr) = authority.parse() {
        return addr;
    }
    let (name, port) = authority.rsplit_once(':').unwrap();
    assert!(name.ends_with(".localhost"), "Location {location:?}");
    SocketAddr::from(([127, 0, 0, 1], port.parse().unwrap()))
}

/// A parsed HTTP answer.
#[derive(Debug)]
pub struct Reply {
    /// Status code (0 when nothing came back).
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

impl Reply {
    /// Parses a whole answer.
    pub fn parse(bytes: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(bytes);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A real `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    /// The process.
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its data directory.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RedisServer {
            child: None,
            port: free_port(),
            dir,
        };
        r.restart();
        r
    }

    /// The store URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it again on the same port (after `stop`).
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/run installs it)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || ping(port)),
            "redis-server did not answer on {port}"
        );
    }

    /// Sends `sig` to the process (SIGSTOP stalls it: connections are accepted
    /// by the kernel and never answered; SIGCONT resumes it).
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// Stops it (the data is lost: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `oathtool --totp` for a base32 secret at the current time.
pub fn oathtool(base32: &str, digits: u32, algorithm: &str) -> String {
    let out = Command::new("oathtool")
        .args([
            &format!("--totp={}", algorithm.to_ascii_uppercase()),
            &format!("--digits={digits}"),
            "-b",
            base32,
        ])
        .output()
        .expect("oathtool must be installed (.ci/run installs it)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A connected pair of loopback sockets.
pub fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    (a, l.accept().unwrap().0)
}

/// The rustls client config trusting `pem` (for tests that speak TLS themselves).
pub fn client_tls(pem: &str) -> Arc<rustls::ClientConfig> {
    taas::tls::client_config(Some(pem)).unwrap()
}

// Helpers for the registrar, rendezvous and hostile tests.

/// The kernel's state of the IPv4 TCP socket from `local` to `remote`, as
/// `/proc/net/tcp` gives it (1 = established, 8 = close-wait, …); `None`
/// when there is no such socket. Lets a test wait until a FIN or RST it sent
/// has reached the other end (under load, loopback delivers it later).
pub fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (l, r) = (hex(local)?, hex(remote)?);
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.len() > 3 && cols[1] == l && cols[2] == r)
            .then(|| u8::from_str_radix(cols[3], 16).ok())
            .flatten()
    })
}

/// Is a TCP socket listening on `port` (any local address)? Read from
/// `/proc/net/tcp{,6}`, so asking does not connect: a connection would count as a
/// use of a rendezvous port, or be taken by a plug.
pub fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
        })
    })
}

/// A TCP connection to `to` from the local address `from` (e.g. 127.0.0.2, to
/// play another host on loopback).
pub fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// A TLS client stream to the relay (handshake done on first write or read).
pub fn tls_stream(
    pem: &str,
    sni: &str,
    tcp: TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(client_tls(pem), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Like `TestRelay::raw`, optionally from another local address, and returning
/// I/O errors instead of panicking (for probes of a relay that may refuse).
pub fn try_raw(
    relay: &TestRelay,
    from: Option<std::net::IpAddr>,
    sni: &str,
    bytes: &[u8],
) -> std::io::Result<Reply> {
    let tcp = match from {
        Some(ip) => connect_from(ip, relay.addr)?,
        None => TcpStream::connect(relay.addr)?,
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut text = Vec::new();
    let read = match &relay.cert_pem {
        Some(pem) => {
            let mut tls = tls_stream(pem, sni, tcp);
            tls.write_all(bytes)?;
            tls.flush()?;
            tls.read_to_end(&mut text)
        }
        None => {
            let mut tcp = tcp;
            tcp.write_all(bytes)?;
            tcp.read_to_end(&mut text)
        }
    };
    match read {
        Err(e) if text.is_empty() => Err(e),
        _ => Ok(Reply::parse(&text)),
    }
}

/// Reads until the peer closes (EOF, reset, or a TLS stream cut without
/// close_notify) and returns what came; `Err` when the read timeout set on the
/// socket passed first. At most 64 MiB are read.
pub fn read_until_closed(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    use std::io::ErrorKind;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while got.len() < 64 << 20 {
        match r.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(e);
            }
            Err(_) => return Ok(got),
        }
    }
    Err(std::io::Error::other("peer kept sending"))
}

/// Reads `want.len()` bytes from `s` and checks they are `want`.
pub fn expect(s: &mut TcpStream, want: &[u8]) {
    let mut buf = vec![0u8; want.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, want);
}

/// Writes `msg` on `from` and checks that it arrives, whole, at `to`.
pub fn send(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) {
    from.write_all(msg).unwrap();
    expect(to, msg);
}

/// One counter or gauge of the relay's metrics, e.g.
/// `taas_refusals_total{limit="plug_same_ip"}`; 0 when absent.
pub fn metric(relay: &TestRelay, name: &str) -> u64 {
    relay
        .server
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Runs `curl ARGS`; returns (exit ok, stdout, stderr).
pub fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["--max-time", "20"])
        .args(args)
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Open file descriptors of this process.
pub fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Threads of this process.
pub fn count_threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Runs `cmd` with stdin empty and stdout and stderr captured (in files, so a
/// chatty child never blocks on a full pipe), killing it if it still runs after
/// `limit`; returns (exit ok, stdout, stderr). A killed run is not ok, and its
/// stderr ends with a line saying so.
pub fn run_within(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn");
    let end = Instant::now() + limit;
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status.success());
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
    let (stdout, mut stderr) = (read(&out), read(&err));
    if ok.is_none() {
        stderr.push_str(&format!("(test support: killed after {limit:?})\n"));
    }
    (ok == Some(true), stdout, stderr)
}

/// `taas ARGS` in `dir`, as `taas` does, but killed if it runs past `limit`.
pub fn taas_within(dir: &Path, args: &[&str], limit: Duration) -> (bool, String, String) {
    run_within(
        Command::new(taas_bin())
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG"),
        limit,
    )
}

pub mod browser;
pub mod nodes;

/// A certificate authority made for one test (rcgen), standing in for the
/// relay's CA: it signs label (and registrar) certificates that clients verify
/// against `pem` alone.
pub struct TestCa {
    /// Its certificate, PEM.
    pub pem: String,
    /// Its name and key, to sign with.
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// Validity from the start of last year to the end of next year: certificates a
/// browser accepts today, in whatever year the test runs.
fn validity(params: &mut rcgen::CertificateParams) {
    let year = 1970 + (taas::unix_time() / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
}

impl TestCa {
    /// A new CA key and self-signed CA certificate.
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut tag = [0u8; 4];
        taas::sys::random_bytes(&mut tag).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("taas test CA {}", data_encoding::HEXLOWER.encode(&tag)),
        );
        validity(&mut params);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` signed by this CA, and its new key
    /// (PEM: certificate, key).
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `issue`, written to `cert` and `key` (the key 0600).
    pub fn issue_to(&self, names: &[&str], cert: &Path, key: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let (c, k) = self.issue(names);
        std::fs::write(cert, c).unwrap();
        std::fs::write(key, k).unwrap();
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// What `PlainApp`'s page says, for tests to look for.
pub const APP_TEXT: &str = "hello from the hidden plain-HTTP app";

/// A plain-HTTP app on a free loopback port (what people put behind NAT: a
/// dashboard, a Raspberry Pi web UI). `start`: every request gets an HTML page
/// with `APP_TEXT` and the path; `echo`: reads to the peer's EOF, answers
/// `echo:` and what came, then closes. Counts connections; stops on drop.
pub struct PlainApp {
    /// Its port.
    pub port: u16,
    /// Connections accepted.
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Set to stop.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The accept loop.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PlainApp {
    /// The page-serving app.
    pub fn start() -> PlainApp {
        Self::run(false)
    }

    /// The echo app.
    pub fn echo() -> PlainApp {
        Self::run(true)
    }

    fn run(echo: bool) -> PlainApp {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = conn else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
                    if echo {
                        echo_once(tcp);
                    } else {
                        page_once(tcp);
                    }
                });
            }
        });
        PlainApp {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections it accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads one request head (at most 8 KiB) and answers it with the page.
fn page_once(mut tcp: TcpStream) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if tcp.read(&mut b).unwrap_or(0) == 0 {
            return;
        }
        head.push(b[0]);
    }
    let line = String::from_utf8_lossy(&head);
    let path: String = line
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/?=-_.".contains(*c))
        .collect();
    let body = format!(
        "<!doctype html><title>hidden app</title><h1 id=greeting>{APP_TEXT}</h1><p id=path>{path}</p>\n"
    );
    let _ = write!(
        tcp,
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Reads to EOF (at most 1 MiB), answers `echo:` and what came, closes.
fn echo_once(mut tcp: TcpStream) {
    let mut got = Vec::new();
    if (&mut tcp).take(1 << 20).read_to_end(&mut got).is_err() {
        return;
    }
    let _ = tcp.write_all(b"echo:").and_then(|()| tcp.write_all(&got));
}

impl Drop for PlainApp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its threads now (from /proc/PID/task).
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.0.id())).map_or(0, |d| d.count())
    }

    /// Sends it `sig` (e.g. "HUP").
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig}");
    }

    /// Has it exited?
    pub fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `taas expose PROVISION --to 127.0.0.1:TO MORE…` with its log (stderr) in
/// `log`.
pub fn expose(provision: &Path, to: u16, more: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(taas_bin())
            .arg("expose")
            .arg(provision)
            .args(["--to", &format!("127.0.0.1:{to}")])
            .args(more)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// A TLS client connection to `addr` for `sni`, trusting only `ca_pem`, with
/// the handshake done (10 s limit); returns the stream and the certificate the
/// server showed.
pub fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
) -> std::io::Result<(
    rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    Vec<u8>,
)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = tls_stream(ca_pem, sni, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let shown = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    Ok((tls, shown))
}

/// The DER of the first certificate in `pem`.
pub fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}
