//! Several `taas serve` processes sharing one real `redis-server`, each on its
//! own loopback address (127.0.0.2, .3, .4, …) and each reaching Redis through
//! a small TCP proxy of its own, which a test can cut and restore to take one
//! node's link away.
//!
//! Every process and thread started here is stopped by its guard; every wait is
//! bounded.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use taas::provision::Provision;

use super::{RedisServer, Reply, free_port, taas, taas_bin, tls_stream, wait_until};

/// A TCP proxy in front of Redis for one node.
pub struct Proxy {
    /// Where the node connects.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Proxies a free loopback port to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, s, cs) = (cut.clone(), stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = conn else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
                    continue;
                };
                let mut list = cs.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|s: &TcpStream| s.peer_addr().is_ok());
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
                if let (Ok(a), Ok(b)) = (down.try_clone(), up.try_clone()) {
                    list.push(a);
                    list.push(b);
                }
            }
        });
        Proxy {
            addr,
            cut,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// Cuts the link: every connection through it is shut, and new ones are
    /// closed at once, until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let list = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for s in list.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One relay process of the cluster.
pub struct Node {
    /// Its `node` name.
    pub name: String,
    /// Its loopback address (`public_host`).
    pub ip: IpAddr,
    /// Its well-known port.
    pub port: u16,
    /// Its status listener.
    pub status: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its Redis proxy.
    pub proxy: Proxy,
    child: Option<Child>,
}

impl Node {
    /// The well-known address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// `GET path` on the status listener: (status, body).
    pub fn status_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.status, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let r = Reply::parse(&out);
        Some((r.status, r.body))
    }

    /// `/status`'s `node` part (Null when the node does not answer).
    pub fn node_status(&self) -> serde_json::Value {
        self.status_get("/status")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .map_or(serde_json::Value::Null, |v| v["node"].clone())
    }

    /// The names of the peers this node lists.
    pub fn peers(&self) -> Vec<String> {
        self.node_status()["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["node"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A counter of the node's `/status`.
    pub fn counter(&self, name: &str) -> u64 {
        self.node_status()[name].as_u64().unwrap_or(0)
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node again (after `kill` or `terminate`) with the same
    /// config: same name, address and ports, a new boot; waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(serve(&self.config, &[], Stdio::null()));
        let name = self.name.clone();
        assert!(
            wait_until(Duration::from_secs(20), || self.node_status()["name"]
                == name.as_str()),
            "node {name} did not come back"
        );
    }

    /// SIGTERM, and waits (bounded) for it to exit; true when it did.
    pub fn terminate(&mut self, within: Duration) -> bool {
        self.signal("TERM");
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let exited = wait_until(within, || matches!(c.try_wait(), Ok(Some(_))));
        if exited {
            self.child = None;
        }
        exited
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Several nodes, one Redis, one CA and one account (label `demo`).
pub struct Cluster {
    /// The shared directory: certificates, configs, logs, provisioning.
    pub dir: tempfile::TempDir,
    /// The Redis every node shares.
    pub redis: RedisServer,
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    /// What clients trust: the relay's CA.
    pub ca_pem: String,
    /// The account owning `demo`.
    pub prov: Provision,
    /// Next loopback host number for a new node.
    next_host: u8,
    /// Config lines every node gets.
    extra: String,
}

/// The label every cluster's account owns.
pub const LABEL: &str = "demo";

impl Cluster {
    /// `names.len()` nodes on 127.0.0.2, .3, …, `extra` config lines added to
    /// each; waits until each one answers and lists all the others.
    pub fn start(names: &[&str], extra: &str) -> Cluster {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            nodes.push(start_node(
                dir.path(),
                redis.port,
                2 + i as u8,
                name,
                extra,
                &[],
            ));
        }
        let n = nodes.len();
        for node in &nodes {
            assert!(
                wait_until(Duration::from_secs(15), || node.peers().len() == n - 1),
                "node {} lists {:?}, not all {} others",
                node.name,
                node.peers(),
                n - 1
            );
        }
        let first = nodes[0].config.clone();
        let out = dir.path().join("prov");
        let (ok, stdout, err) = taas(
            dir.path(),
            &[
                "users",
                "add",
                LABEL,
                "--out",
                out.to_str().unwrap(),
                "-c",
                first.to_str().unwrap(),
            ],
        );
        assert!(ok, "users add: {err}");
        let prov = Provision::load(Path::new(stdout.lines().next().unwrap())).unwrap();
        let ca_pem = prov.server.ca.clone().expect("server.ca");
        Cluster {
            next_host: 2 + n as u8,
            dir,
            redis,
            nodes,
            ca_pem,
            prov,
            extra: extra.to_string(),
        }
    }

    /// Starts one more node named `name` on the next loopback address; waits
    /// until it answers on its status listener. Returns its index.
    pub fn add(&mut self, name: &str) -> usize {
        self.add_with_env(name, &[])
    }

    /// `add`, the process started with `env` added (e.g. libfaketime's
    /// `LD_PRELOAD` and `FAKETIME`: the process itself, so that killing it
    /// leaves nothing behind, as a wrapper that forks would).
    pub fn add_with_env(&mut self, name: &str, env: &[(&str, &str)]) -> usize {
        let node = start_node(
            self.dir.path(),
            self.redis.port,
            self.next_host,
            name,
            &self.extra,
            env,
        );
        self.next_host += 1;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Removes the node named `name` from the list (killing it).
    pub fn remove(&mut self, name: &str) {
        self.nodes.retain(|n| n.name != name);
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    /// The node named `name`, to kill or stop it.
    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    /// A registrar client of the account that connects to `node`.
    pub fn registrar(&self, node: &str) -> taas::agent::Registrar {
        let mut r = taas::agent::Registrar::from_provision(&self.prov).unwrap();
        r.connect = self.node(node).addr().to_string();
        r
    }

    /// Registers at `node` and connects to the plug: a waiting responder, once
    /// the node's pool holds it.
    pub fn responder(&self, node: &str) -> TcpStream {
        let before = self.waiting(node);
        let plug = self.registrar(node).register(LABEL).unwrap();
        let s = TcpStream::connect(plug).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || self.waiting(node) > before),
            "responder never reached {node}'s pool"
        );
        s
    }

    /// The account's token now, from `oathtool`.
    pub fn token(&self) -> String {
        super::oathtool(&self.prov.base32, self.prov.digits, &self.prov.algorithm)
    }

    /// A request to the registrar at `node` with `token`, from `from`.
    pub fn registrar_request(
        &self,
        node: &str,
        method: &str,
        path: &str,
        token: &str,
        from: Option<IpAddr>,
    ) -> Reply {
        let to = self.node(node).addr();
        let tcp = match from {
            Some(ip) => super::connect_from(ip, to).unwrap(),
            None => TcpStream::connect(to).unwrap(),
        };
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = "registrar.localhost";
        let mut tls = tls_stream(&self.ca_pem, host, tcp);
        write!(
            tls,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n\
             Authorization: TOTP username=\"{}\", response=\"{token}\"\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.prov.id()
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        Reply::parse(&out)
    }

    /// `PUT /register/demo` at `node` with `token`, from `from`.
    pub fn register(&self, node: &str, token: &str, from: Option<IpAddr>) -> Reply {
        self.registrar_request(node, "PUT", &format!("/register/{LABEL}"), token, from)
    }

    /// `GET /pairings/demo` at `node`.
    pub fn pairings(&self, node: &str) -> Vec<serde_json::Value> {
        let r = self.registrar_request(
            node,
            "GET",
            &format!("/pairings/{LABEL}"),
            &self.token(),
            None,
        );
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str(&r.body).unwrap()
    }

    /// A mobile's `GET path` for the label at `node` (TLS, SNI the label's
    /// name), from the local address `from`.
    pub fn get(&self, node: &str, path: &str) -> Reply {
        self.get_from(node, path, None)
    }

    /// `get`, from a chosen local address.
    pub fn get_from(&self, node: &str, path: &str, from: Option<IpAddr>) -> Reply {
        let to = self.node(node).addr();
        let tcp = match from {
            Some(ip) => super::connect_from(ip, to).unwrap(),
            None => TcpStream::connect(to).unwrap(),
        };
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = format!("{LABEL}.taas.localhost");
        let mut tls = tls_stream(&self.ca_pem, &host, tcp);
        write!(tls, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out);
        Reply::parse(&out)
    }

    /// `curl -sS -L` for the label's `path` at `node`, as a mobile: trusting
    /// the relay's CA only, every `demo.taas.localhost` and
    /// `demo.NODE.taas.localhost` sent to that node's address (curl would
    /// take any `*.localhost` for 127.0.0.1), the effective URL on the last
    /// line. (ok, stdout, stderr).
    pub fn curl(&self, node: &str, path: &str) -> (bool, String, String) {
        let ca = self.dir.path().join("ca.crt");
        let mut args: Vec<String> = ["-sS", "-L", "--max-time", "20", "--cacert"]
            .map(String::from)
            .to_vec();
        args.push(ca.to_str().unwrap().to_string());
        args.push("--connect-to".into());
        args.push(format!("{LABEL}.taas.localhost::{}:", self.node(node).ip));
        for n in &self.nodes {
            args.push("--connect-to".into());
            args.push(format!("{LABEL}.{}.taas.localhost::{}:", n.name, n.ip));
        }
        args.push("-w".into());
        args.push("\n%{url_effective}".into());
        args.push(format!(
            "https://{LABEL}.taas.localhost:{}{path}",
            self.node(node).port
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        super::curl(&args)
    }

    /// The waiting responders of the label at `node`, as its `/status` says.
    pub fn waiting(&self, node: &str) -> usize {
        let Some((_, body)) = self.node(node).status_get("/status") else {
            return 0;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["labels"]
            .as_array()
            .and_then(|a| a.iter().find(|l| l["label"] == LABEL))
            .and_then(|l| l["waiting"].as_u64())
            .unwrap_or(0) as usize
    }
}

/// `taas serve -c config` with `env` added, its stderr to `stderr`.
fn serve(config: &Path, env: &[(&str, &str)], stderr: Stdio) -> Child {
    Command::new(taas_bin())
        .args(["serve", "-c", config.to_str().unwrap()])
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Starts node `name` on 127.0.0.`host`, its Redis link through a proxy of
/// its own to the Redis on `redis_port`, its files in `dir` (the CA and the
/// registrar's certificate made there by the first); waits until it answers.
/// A start that fails (a port taken meanwhile by a parallel test) is tried
/// again on other ports, at most three times.
fn start_node(
    dir: &Path,
    redis_port: u16,
    host: u8,
    name: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Node {
    let mut why = String::new();
    for _attempt in 0..3 {
        match try_start_node(dir, redis_port, host, name, extra, env) {
            Ok(node) => return node,
            Err(e) => why = e,
        }
    }
    panic!("node {name} did not come up: {why}");
}

fn try_start_node(
    dir: &Path,
    redis_port: u16,
    host: u8,
    name: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Result<Node, String> {
    let ip: IpAddr = format!("127.0.0.{host}").parse().unwrap();
    let range_start = 20000 + u32::from(host) * 500;
    let d = dir.display();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis_port)));
    let port = free_port();
    let status = SocketAddr::new(ip, free_port());
    let config = dir.join(format!("{name}.toml"));
    let log = dir.join(format!("{name}.log"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    // One second unless the test sets its own.
    let grace = if extra.contains("shutdown_grace") {
        ""
    } else {
        "shutdown_grace = 1\n"
    };
    std::fs::write(
        &config,
        format!(
            "public_host = \"{ip}\"\nport = {port}\nnode = \"{name}\"\n\
             store = \"redis://{}/0\"\n\
             cert = \"{d}/registrar.crt\"\nkey = \"{d}/registrar.key\"\n\
             ca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n\
             status_listen = \"{status}\"\nport_range = \"{range_start}-{}\"\n\
             log_file = \"{}\"\n{grace}{extra}\n",
            proxy.addr,
            range_start + 499,
            log.display(),
        ),
    )
    .unwrap();
    if !dir.join("registrar.crt").exists() {
        let (ok, _, err) = taas(dir, &["cert", "-c", config.to_str().unwrap()]);
        assert!(ok, "taas cert: {err}");
    }
    let child = serve(
        &config,
        env,
        std::fs::File::create(&stderr_path).unwrap().into(),
    );
    let mut node = Node {
        name: name.to_string(),
        ip,
        port,
        status,
        config,
        log,
        proxy,
        child: Some(child),
    };
    let mut exited = false;
    let up = wait_until(Duration::from_secs(20), || {
        if let Some(c) = node.child.as_mut()
            && matches!(c.try_wait(), Ok(Some(_)))
        {
            exited = true;
            return true;
        }
        node.node_status()["name"] == name
    });
    if up && !exited {
        return Ok(node);
    }
    node.kill();
    Err(format!(
        "{}; stderr: {}; log: {}",
        if exited { "it exited" } else { "no answer" },
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        std::fs::read_to_string(&node.log).unwrap_or_default()
    ))
}

/// The host and port of a `Location: https://HOST:PORT/…`.
pub fn location(r: &Reply) -> (String, u16) {
    let loc = r.header("location").expect("a Location");
    let rest = loc.strip_prefix("https://").expect("https");
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

/// Connects to `ip:port` (a rendezvous port), sends `hello`, and checks the
/// responder gets it and its answer comes back.
pub fn bytes_both_ways(ip: IpAddr, port: u16, responder: &mut TcpStream) {
    let mut mobile = TcpStream::connect((ip, port)).unwrap();
    mobile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mobile.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    responder.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    responder.write_all(b"back").unwrap();
    let mut back = [0u8; 4];
    mobile.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"back");
}

/// How long `f` took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let v = f();
    (v, start.elapsed())
}
