//! `make bench`'s rows of several relays on one Redis: three `taas serve`
//! processes named a, b, c on 127.0.0.2, .3 and .4 share one `redis-server` (as
//! tests/support/nodes.rs starts them, without its proxies), and mobiles ask b
//! for labels whose responders wait at a, at b, or at a and c.
//!
//! Measured: how soon b's 307s follow a's pool (a registration, a drained
//! pool); a cross-node 307 against a local one, alone and as the whole flow;
//! and how b gets over a node SIGKILLed and started again. b is polled with
//! HTTPS GETs, TLS resumed, one started every `POLL` or as soon as the one
//! before it ends, so a time polled for is late by at most one GET (the
//! median GET is in the notes).
//!
//! Every process and thread started here is stopped by its guard, on every
//! path; every wait is bounded by `WAIT`.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use taas::agent::Registrar;
use taas::directory::HEARTBEAT;
use taas::provision::Provision;

use super::{Res, echo, get_root, percentile};

/// The labels, one account each: registered at a for the propagation rounds;
/// at a, and at b, for the cost of a cross-node 307; at a and c for the kills.
const LABELS: [&str; 4] = ["prop", "far", "near", "ha"];
/// Registration -> 307 and drain -> 503 rounds.
const PROP_ROUNDS: usize = 20;
/// Rounds of the 307 and the whole flow, cross-node and local, interleaved.
const COST_ROUNDS: usize = 200;
/// SIGKILLs, a and c in turn.
const KILLS: usize = 20;
/// Responders kept waiting for `ha` at a and at c each.
const KEEP: usize = 6;
/// At most one GET to b started per this.
const POLL: Duration = Duration::from_millis(1);
/// During the kills, a whole mobile flow (GET, connect, echo) at most this
/// often while they succeed, so that the pool at the node still up is never
/// drained by the polling; at once after a failure.
const FLOW_EVERY: Duration = Duration::from_millis(20);
/// After a kill, b has forgotten the node once this many 307s in a row name
/// another (were it still named one time in seven, 50 in a row would come
/// one time in 2000).
const CLEAN: usize = 50;
/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(15);

/// One row: figure, value, unit, note.
pub type Row = (String, f64, &'static str, String);

/// The rows, or `None` (said on stderr) when there is no `redis-server`.
pub fn run(bin: &Path) -> Res<Option<Vec<Row>>> {
    let Some(redis) = Redis::start()? else {
        eprintln!("redis-server not found: the rows of several nodes are left out");
        return Ok(None);
    };
    let started = Instant::now();
    let mut c = Cluster::start(bin, redis)?;
    let ms = |d: f64| d * 1e3;
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |name: &str, secs: f64, note: String| {
        rows.push((format!("nodes: {name}"), ms(secs), "ms", note));
    };

    let p = propagation(&c)?;
    let (mut up, mut down) = (p.up, p.down);
    row(
        "a registers -> b's 307 names a, median",
        percentile(&mut up, 0.5),
        format!(
            "from the plug connected; {PROP_ROUNDS} rounds; b polled, a GET every {:.2} ms",
            ms(p.get)
        ),
    );
    row(
        "a registers -> b's 307 names a, p95",
        percentile(&mut up, 0.95),
        String::new(),
    );
    row(
        "a drained -> b answers 503, median",
        percentile(&mut down, 0.5),
        "withdrawal: a's one responder paired at a's port".into(),
    );
    row(
        "a drained -> b answers 503, p95",
        percentile(&mut down, 0.95),
        String::new(),
    );

    let Cost { redirect, flow } = cost(&c)?;
    for ([mut local, mut cross], what, how) in [
        (
            redirect,
            "GET -> 307 at b",
            "new TCP and full TLS each, as curl",
        ),
        (
            flow,
            "GET at b -> 307 -> byte",
            "GET, 307, connect to Q, one octet echoed",
        ),
    ] {
        for (p, at) in [(0.5, "median"), (0.99, "p99")] {
            let (l, x) = (percentile(&mut local, p), percentile(&mut cross, p));
            let note = match at {
                "median" => format!("{how}; {COST_ROUNDS} rounds"),
                _ => String::new(),
            };
            row(&format!("{what}, local, {at}"), l, note);
            row(
                &format!("{what}, to a, {at}"),
                x,
                format!("{:.2} of local", x / l),
            );
        }
    }

    let mut r = kills(&mut c)?;
    row(
        "kill -> b stops naming it, p50",
        percentile(&mut r.forgotten, 0.5),
        format!("{KILLS} SIGKILLs, a and c in turn, each at a pseudo-random point of the beats"),
    );
    row(
        "kill -> b stops naming it, p95",
        percentile(&mut r.forgotten, 0.95),
        format!(
            "{CLEAN} 307s in a row name the other; {} of {} answers before named it",
            r.to_dead, r.answers
        ),
    );
    let outages = r.recovered.len();
    if outages > 0 {
        row(
            "kill -> flows via b succeed again, p50",
            percentile(&mut r.recovered, 0.5),
            format!(
                "first success after the last failure; {outages} of {KILLS} kills had failures"
            ),
        );
        row(
            "kill -> flows via b succeed again, p95",
            percentile(&mut r.recovered, 0.95),
            format!("{} failed to the node up", r.other_failures),
        );
    }
    row(
        "restart -> b names it (rejoin), p50",
        percentile(&mut r.rejoin, 0.5),
        format!(
            "same name, new boot; restart -> first plug {:.1} ms (p50)",
            ms(percentile(&mut r.plugged, 0.5))
        ),
    );
    row(
        "restart -> b names it (rejoin), p95",
        percentile(&mut r.rejoin, 0.95),
        String::new(),
    );
    drop(c);
    eprintln!(
        "nodes: the section took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Some(rows))
}

/// A `redis-server` on a free loopback port, no persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// `None` when there is no `redis-server` to start.
    fn start() -> Res<Option<Redis>> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let redis = Redis {
            child,
            port,
            _dir: dir,
        };
        bounded("redis-server to answer PING", || Ok(redis.ping()))?;
        Ok(Some(redis))
    }

    fn ping(&self) -> bool {
        let ask = || -> std::io::Result<bool> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"PING\r\n")?;
            let mut got = [0u8; 5];
            s.read_exact(&mut got)?;
            Ok(&got == b"+PONG")
        };
        ask().unwrap_or(false)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 2 ms until it says true; an error after `WAIT`.
fn bounded(what: &str, mut f: impl FnMut() -> Res<bool>) -> Res<()> {
    let end = Instant::now() + WAIT;
    while !f()? {
        if Instant::now() > end {
            return Err(format!("waited {WAIT:?} for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// One `taas serve` process of the cluster; killed on drop.
struct Node {
    name: &'static str,
    ip: IpAddr,
    addr: SocketAddr,
    status: SocketAddr,
    config: PathBuf,
    stderr: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Writes node `name`'s config: 127.0.0.`host`, its ports free now.
    fn configure(bin: &Path, dir: &Path, name: &'static str, host: u8, redis: u16) -> Res<Node> {
        let ip: IpAddr = format!("127.0.0.{host}").parse()?;
        let free = || -> Res<u16> { Ok(TcpListener::bind((ip, 0))?.local_addr()?.port()) };
        let (port, status) = (free()?, SocketAddr::new(ip, free()?));
        // Below the ephemeral ports, apart from tests/nodes.rs's.
        let range = 26000 + u32::from(host) * 400;
        let d = dir.display();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "public_host = \"{ip}\"\nport = {port}\nnode = \"{name}\"\n\
                 store = \"redis://127.0.0.1:{redis}/0\"\n\
                 cert = \"{d}/registrar.crt\"\nkey = \"{d}/registrar.key\"\n\
                 ca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n\
                 status_listen = \"{status}\"\nport_range = \"{range}-{}\"\n\
                 max_pairs_per_ip = 20000\nmax_connections_per_ip = 4096\nshutdown_grace = 1\n",
                range + 399
            ),
        )?;
        Ok(Node {
            name,
            ip,
            addr: SocketAddr::new(ip, port),
            status,
            stderr: dir.join(format!("{name}.stderr")),
            config,
            bin: bin.to_path_buf(),
            child: None,
        })
    }

    /// Starts the process; does not wait for it.
    fn spawn(&mut self) -> Res<()> {
        self.kill();
        self.child = Some(
            Command::new(&self.bin)
                .args(["serve", "-c"])
                .arg(&self.config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&self.stderr)?)
                .spawn()?,
        );
        Ok(())
    }

    /// Waits until its status listener gives its name; an error (with its
    /// stderr) when it exited or did not answer within `WAIT`.
    fn wait_up(&mut self) -> Res<()> {
        let name = self.name;
        let mut gone = false;
        let up = bounded(&format!("node {name} to start"), || {
            gone = match self.child.as_mut() {
                Some(c) => c.try_wait()?.is_some(),
                None => true,
            };
            Ok(gone || self.node_status()["name"] == name)
        });
        if up.is_ok() && !gone {
            return Ok(());
        }
        self.kill();
        Err(format!(
            "node {name} did not start ({}); stderr: {}",
            up.err().map_or("it exited".to_string(), |e| e.to_string()),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
        .into())
    }

    /// SIGKILL, and reaps it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `/status`'s `node` part (Null when it does not answer).
    fn node_status(&self) -> serde_json::Value {
        let ask = || -> Res<serde_json::Value> {
            let mut s = TcpStream::connect_timeout(&self.status, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            let text = String::from_utf8_lossy(&out);
            let body = text.split_once("\r\n\r\n").ok_or("no body")?.1;
            Ok(serde_json::from_str::<serde_json::Value>(body)?["node"].take())
        };
        ask().unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The three nodes, their Redis, one CA, one account per label.
struct Cluster {
    // Fields drop in this order: the nodes before their Redis and files.
    nodes: Vec<Node>,
    _redis: Redis,
    accounts: Vec<(&'static str, Provision)>,
    ca: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(bin: &Path, redis: Redis) -> Res<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        for (name, host) in [("a", 2), ("b", 3), ("c", 4)] {
            nodes.push(Node::configure(bin, dir.path(), name, host, redis.port)?);
        }
        let run = |args: &[&str]| -> Res<String> {
            let out = Command::new(bin)
                .args(args)
                .args(["-c", nodes[0].config.to_str().ok_or("path")?])
                .current_dir(dir.path())
                .output()?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        // The CA and the registrar's certificate, for every node.
        run(&["cert"])?;
        let out = dir.path().join("prov");
        let mut accounts = Vec::new();
        for label in LABELS {
            let made = run(&["users", "add", label, "--out", out.to_str().ok_or("path")?])?;
            let path = made.lines().next().ok_or("no provision")?;
            accounts.push((label, Provision::load(Path::new(path))?));
        }
        let ca = accounts[0].1.server.ca.clone().ok_or("no server.ca")?;
        let mut c = Cluster {
            nodes,
            _redis: redis,
            accounts,
            ca,
            _dir: dir,
        };
        for n in &mut c.nodes {
            n.spawn()?;
            n.wait_up()?;
        }
        for n in &c.nodes {
            bounded(&format!("node {} to list the two others", n.name), || {
                Ok(n.node_status()["peers"].as_array().map_or(0, Vec::len) == 2)
            })?;
        }
        Ok(c)
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("a node")
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node")
    }

    /// The address of node `name`, or of `here` for b's own 307s (`None`).
    fn ip(&self, name: Option<&str>, here: &str) -> IpAddr {
        self.node(name.unwrap_or(here)).ip
    }

    /// A registrar client of `label`'s account that connects to node `at`.
    fn registrar(&self, label: &str, at: &str) -> Res<Registrar> {
        let p = &self
            .accounts
            .iter()
            .find(|a| a.0 == label)
            .ok_or("label")?
            .1;
        let mut r = Registrar::from_provision(p)?;
        r.connect = self.node(at).addr.to_string();
        Ok(r)
    }
}

/// A responder for `label` through `reg`: registered, its plug connected.
fn responder(reg: &Registrar, label: &str) -> Res<TcpStream> {
    let plug = reg.register(label).map_err(|e| e.to_string())?;
    let s = TcpStream::connect(plug)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// What a node answered a mobile's GET: its status, and for a 307 the node
/// its `Location` names (`None`: the node asked) and the port.
struct Answer {
    status: u16,
    to: Option<(Option<String>, u16)>,
}

impl Answer {
    fn names(&self, node: &str) -> bool {
        matches!(&self.to, Some((Some(n), _)) if n == node)
    }
}

/// A mobile's HTTPS GET for `label` at `at`, on a new TCP connection with
/// `cfg` (a new config: a full handshake; a kept one: resumed).
fn get(cfg: &Arc<ClientConfig>, at: SocketAddr, label: &str) -> Res<Answer> {
    let name = format!("{label}.taas.localhost");
    let tcp = TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let conn = rustls::ClientConnection::new(
        cfg.clone(),
        rustls::pki_types::ServerName::try_from(name.clone())?,
    )?;
    let (status, location) = get_root(rustls::StreamOwned::new(conn, tcp), &name)?;
    // https://LABEL[.NODE].taas.localhost:Q/
    let to = match location {
        None => None,
        Some(loc) => {
            let hostport = loc
                .strip_prefix("https://")
                .and_then(|r| r.split('/').next())
                .ok_or_else(|| format!("bad Location {loc:?}"))?;
            let (host, port) = hostport.rsplit_once(':').ok_or("no port")?;
            let node = host
                .strip_suffix(".taas.localhost")
                .and_then(|h| h.strip_prefix(label))
                .and_then(|h| {
                    if h.is_empty() {
                        Some(None)
                    } else {
                        h.strip_prefix('.').map(Some)
                    }
                })
                .ok_or_else(|| format!("bad Location {loc:?}"))?;
            Some((node.map(str::to_string), port.parse()?))
        }
    };
    Ok(Answer { status, to })
}

/// A mobile's flow from the 307 on: connect to `ip:port`, one octet, its echo.
fn flow_to(ip: IpAddr, port: u16) -> Res<()> {
    let mut m = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2))?;
    m.set_nodelay(true)?;
    m.set_read_timeout(Some(Duration::from_secs(5)))?;
    m.write_all(b"x")?;
    m.read_exact(&mut [0u8; 1])?;
    Ok(())
}

/// GETs at b with one TLS config (resumed), at most one per `POLL`.
struct Poller {
    cfg: Arc<ClientConfig>,
    at: SocketAddr,
    /// How long each GET took, seconds.
    took: Vec<f64>,
    next: Instant,
}

impl Poller {
    fn new(c: &Cluster) -> Res<Poller> {
        Ok(Poller {
            cfg: taas::tls::client_config(Some(&c.ca))?,
            at: c.node("b").addr,
            took: Vec::new(),
            next: Instant::now(),
        })
    }

    /// One GET, when its turn comes; and when its answer came.
    fn get(&mut self, label: &str) -> (Res<Answer>, Instant) {
        std::thread::sleep(self.next.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        self.next = t + POLL;
        let answer = get(&self.cfg, self.at, label);
        let done = Instant::now();
        self.took.push((done - t).as_secs_f64());
        (answer, done)
    }

    /// GETs until one answer passes `f`: that answer, and when it came.
    fn until(&mut self, label: &str, f: impl Fn(&Answer) -> bool) -> Res<(Answer, Instant)> {
        let end = Instant::now() + WAIT;
        loop {
            match self.get(label) {
                (Ok(a), at) if f(&a) => return Ok((a, at)),
                (_, at) if at > end => {
                    return Err(format!("b's answer for {label} did not change in {WAIT:?}").into());
                }
                _ => {}
            }
        }
    }

    /// The median GET, seconds.
    fn median(&mut self) -> f64 {
        percentile(&mut self.took, 0.5)
    }
}

/// Seconds: registration at a -> b's 307 names a, and a drained -> b's 503;
/// the median GET of the polling.
struct Propagation {
    up: Vec<f64>,
    down: Vec<f64>,
    get: f64,
}

/// `PROP_ROUNDS` times: one responder registered at a for `prop` (none
/// anywhere else), b polled until its 307 names a; then that responder paired
/// by a connection straight to a's rendezvous port, b polled until it
/// answers 503.
fn propagation(c: &Cluster) -> Res<Propagation> {
    let reg = c.registrar("prop", "a")?;
    let a = c.node("a").ip;
    let mut poll = Poller::new(c)?;
    poll.until("prop", |x| x.status == 503)?;
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..PROP_ROUNDS {
        let mut h = responder(&reg, "prop")?;
        let plugged = Instant::now();
        let (answer, named) = poll.until("prop", |x| x.names("a"))?;
        up.push((named - plugged).as_secs_f64());
        let (_, q) = answer.to.ok_or("no 307")?;
        let mut m = TcpStream::connect((a, q))?;
        m.write_all(b"x")?;
        h.set_read_timeout(Some(Duration::from_secs(5)))?;
        h.read_exact(&mut [0u8; 1])?;
        let paired = Instant::now();
        let (_, refused) = poll.until("prop", |x| x.status == 503)?;
        down.push((refused - paired).as_secs_f64());
    }
    Ok(Propagation {
        up,
        down,
        get: poll.median(),
    })
}

/// Seconds, [local, cross-node]: the GET -> 307 alone; the whole flow.
struct Cost {
    redirect: [Vec<f64>; 2],
    flow: [Vec<f64>; 2],
}

/// `near` has responders at b, `far` at a: `COST_ROUNDS` rounds, each kind in
/// turn first, of a mobile's GET at b (new TCP and a new TLS config: a full
/// handshake, as curl's) -> 307, then of GET -> 307 -> connect to Q -> first
/// echoed byte, a responder registered just before it (four more wait).
fn cost(c: &Cluster) -> Res<Cost> {
    let kinds = [
        ("near", c.registrar("near", "b")?, None),
        ("far", c.registrar("far", "a")?, Some("a")),
    ];
    for (label, reg, _) in &kinds {
        for _ in 0..4 {
            echo(responder(reg, label)?);
        }
    }
    let b = c.node("b").addr;
    let mut poll = Poller::new(c)?;
    poll.until("far", |x| x.names("a"))?;
    let mut out = Cost {
        redirect: Default::default(),
        flow: Default::default(),
    };
    for i in 0..COST_ROUNDS {
        for k in [i % 2, 1 - i % 2] {
            let (label, reg, node) = &kinds[k];
            let expected = |x: &Answer| matches!(&x.to, Some((n, _)) if n.as_deref() == *node);
            let cfg = taas::tls::client_config(Some(&c.ca))?;
            let t = Instant::now();
            let answer = get(&cfg, b, label)?;
            out.redirect[k].push(t.elapsed().as_secs_f64());
            if !expected(&answer) {
                return Err(format!("{label} at b: {} not to {node:?}", answer.status).into());
            }
            echo(responder(reg, label)?);
            std::thread::sleep(Duration::from_millis(2));
            let cfg = taas::tls::client_config(Some(&c.ca))?;
            let t = Instant::now();
            let answer = get(&cfg, b, label)?;
            let (to, q) = answer
                .to
                .ok_or_else(|| format!("{label} at b: {}", answer.status))?;
            flow_to(c.ip(to.as_deref(), "b"), q)?;
            out.flow[k].push(t.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

/// `KEEP` responders for `label` kept waiting at one node: each thread
/// registers, echoes one mobile on its plug, and registers again; while the
/// node is down it tries again every 5 ms. Stopped and joined on drop.
struct Keeper {
    stop: Arc<AtomicBool>,
    /// When a plug was first connected since `reset`.
    first_plug: Arc<Mutex<Option<Instant>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Keeper {
    fn start(reg: Registrar, label: &'static str) -> Keeper {
        let stop = Arc::new(AtomicBool::new(false));
        let first_plug = Arc::new(Mutex::new(None));
        let threads = (0..KEEP)
            .map(|_| {
                let (reg, stop, first) = (reg.clone(), stop.clone(), first_plug.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let plug = match reg.register(label) {
                            Ok(p) => p,
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        };
                        if let Ok(s) = TcpStream::connect(plug) {
                            let now = Instant::now();
                            first
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .get_or_insert(now);
                            serve_one(s, &stop);
                        }
                    }
                })
            })
            .collect();
        Keeper {
            stop,
            first_plug,
            threads,
        }
    }

    /// Forgets the first plug's time.
    fn reset(&self) {
        *self.first_plug.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn first_plug(&self) -> Option<Instant> {
        *self.first_plug.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Echoes on `s` until EOF, an error, or `stop`.
fn serve_one(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) if s.write_all(&buf[..n]).is_err() => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Seconds per kill: until b's 307s stop naming the killed node; until a
/// whole flow succeeds after the last one that failed (kills with a failed
/// flow only); restart -> b's 307 names it again; restart -> its first plug.
struct Kills {
    forgotten: Vec<f64>,
    recovered: Vec<f64>,
    rejoin: Vec<f64>,
    plugged: Vec<f64>,
    /// b's answers from the kill to its last 307 naming the killed node.
    answers: usize,
    /// Of them, those naming the killed node (each tried: refused).
    to_dead: usize,
    /// 503s, GETs and flows to the node up that failed.
    other_failures: usize,
}

/// `ha` kept at a and c, mobiles at b; `KILLS` times, a and c in turn: the
/// node SIGKILLed, b polled (each 307 naming the killed node a failed flow,
/// tried; one naming the other a whole flow every `FLOW_EVERY`) until `CLEAN`
/// 307s in a row name the other and a flow has succeeded since the last
/// failure; then the node started again (same name, new boot), its keeper
/// registering there, and b polled until a 307 names it.
fn kills(c: &mut Cluster) -> Res<Kills> {
    let keepers = [
        ("a", Keeper::start(c.registrar("ha", "a")?, "ha")),
        ("c", Keeper::start(c.registrar("ha", "c")?, "ha")),
    ];
    let mut poll = Poller::new(c)?;
    poll.until("ha", |x| x.names("a"))?;
    poll.until("ha", |x| x.names("c"))?;
    let mut out = Kills {
        forgotten: vec![],
        recovered: vec![],
        rejoin: vec![],
        plugged: vec![],
        answers: 0,
        to_dead: 0,
        other_failures: 0,
    };
    let mut seed = 0x2545_f491_u32;
    for i in 0..KILLS {
        let (x, keeper) = (&keepers[i % 2].0, &keepers[i % 2].1);
        c.node_mut(x).kill();
        let killed = Instant::now();
        // The first 307 after the last one naming x; the first whole flow
        // that succeeded after the last failure.
        let (mut clean, mut first_clean, mut last_flow) = (0, killed, None::<Instant>);
        let (mut failed, mut ok_since) = (false, None::<Instant>);
        let (mut seen, mut seen_by_last) = (0, 0);
        while clean < CLEAN || ok_since.is_none() {
            let (answer, at) = poll.get("ha");
            if at > killed + WAIT {
                return Err(format!(
                    "b still names {x}, or no flow gets through, {WAIT:?} after its kill"
                )
                .into());
            }
            let to = match answer {
                Ok(Answer { to: Some(to), .. }) => Some(to),
                _ => None,
            };
            let names_x = to.as_ref().is_some_and(|t| t.0.as_deref() == Some(x));
            if names_x {
                clean = 0;
            } else if to.is_some() {
                clean += 1;
                if clean == 1 {
                    first_clean = at;
                }
            }
            seen += 1;
            if names_x {
                out.to_dead += 1;
                seen_by_last = seen;
            }
            let due = ok_since.is_none() || last_flow.is_none_or(|t| at - t >= FLOW_EVERY);
            let ok = match to {
                // A 503 or a failed GET: that mobile got nowhere.
                None => false,
                Some(_) if !names_x && !due => continue,
                Some((node, q)) => {
                    last_flow = Some(at);
                    flow_to(c.ip(node.as_deref(), "b"), q).is_ok()
                }
            };
            if ok {
                ok_since.get_or_insert_with(Instant::now);
            } else {
                out.other_failures += usize::from(!names_x);
                failed = true;
                ok_since = None;
            }
        }
        out.forgotten.push((first_clean - killed).as_secs_f64());
        out.answers += seen_by_last;
        if failed {
            let ok = ok_since.ok_or("no flow succeeded")?;
            out.recovered.push((ok - killed).as_secs_f64());
        }
        // Started again at a pseudo-random point of b's heartbeat: else
        // every node would beat just after b (each is started again just
        // after b's beat that forgot it), and every kill would fall at the
        // same point of the killed node's beat.
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::thread::sleep(HEARTBEAT.mul_f64(f64::from(seed) / f64::from(u32::MAX)));
        keeper.reset();
        let restarted = Instant::now();
        c.node_mut(x).spawn()?;
        let named = match poll.until("ha", |a| a.names(x)) {
            Ok((_, at)) => at,
            // Its stderr, when it did not come up.
            Err(e) => return Err(c.node_mut(x).wait_up().err().unwrap_or(e)),
        };
        out.rejoin.push((named - restarted).as_secs_f64());
        let plug = keeper.first_plug().ok_or("named before any plug")?;
        out.plugged.push((plug - restarted).as_secs_f64());
        c.node_mut(x).wait_up()?;
    }
    Ok(out)
}
