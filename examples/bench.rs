//! `make bench`: the relay measured against direct loopback, in one run, on this
//! machine. Starts `target/release/taas serve` (once with splice, once with
//! `splice = false`: a read/write loop), registers hidden sides through the
//! library, runs an echo/sink service here, and prints one table (also
//! `target/bench.json`).
//!
//! Shortcuts, admitted: CPU time is read from /proc/PID/stat assuming 100 ticks
//! a second (Linux's USER_HZ); the relay logs at `warn` so logging does not count;
//! the client threads share the two cores with the relay, as they do for the
//! direct baseline; each figure is the median of `ROUNDS` rounds. Memory is
//! read from /proc/PID/status: VmRSS, and RssAnon (heap and stacks, what the
//! relay itself costs; the rest of VmRSS is the binary's and libc's pages,
//! shared and reclaimable). On a machine where the binary was just written and
//! not yet synced, its pages may show as private; `make bench` runs `sync`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taas::agent::Registrar;
use taas::provision::Provision;

// examples/bench/ (no main.rs) is not an example of its own.
#[path = "bench/nodes.rs"]
mod nodes;
#[path = "bench/peers.rs"]
mod peers;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Rounds per figure.
const ROUNDS: usize = 3;
/// Bytes per throughput round and direction, per pair.
const BULK: usize = 256 << 20;
/// Round trips per latency round.
const RTTS: usize = 2000;
/// Pairs held for the per-pair memory figure.
const IDLE_PAIRS: usize = 1000;
/// Most concurrent pairs tried.
const MAX_PAIRS: usize = 10_000;
/// Interleaved rounds of connect -> first echoed byte (direct, hidden side,
/// through `taas expose`).
const SETUP_ROUNDS: usize = 300;
/// Quiet between two of those connections, as between a user's clicks.
const SETUP_GAP: Duration = Duration::from_millis(5);
/// Responders each `taas expose` of the bench keeps waiting (`--pool`).
const AGENT_POOL: u64 = 8;
/// Mobile flows timed with curl.
const CURL_FLOWS: usize = 200;
/// Registrations per block; blocks alternate resumed and full handshakes.
const REGISTRATIONS: usize = 250;
/// Blocks of each kind.
const REGISTRATION_BLOCKS: usize = 4;

fn main() -> Res<()> {
    raise_fd_limit();
    // This example is TARGET/release/examples/bench: the relay is beside it
    // in TARGET/release (wherever CARGO_TARGET_DIR puts TARGET).
    let release = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .ok_or("no release directory above the bench")?
        .to_path_buf();
    let bin = release.join("taas");
    if !bin.exists() {
        return Err("build first: cargo build --release (make bench does)".into());
    }
    // `cargo run --release --example bench -- MODE`: `nodes`, only the rows
    // of several nodes; `setup`, only the connect -> first byte rows (to try a
    // change to the set-up path without the whole run); `peers`, connect ->
    // first byte through taas expose, rathole and bore. Each prints its rows
    // and leaves bench.json as it is.
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("nodes") => {
            for (name, value, unit, note) in nodes::run(&bin)?.unwrap_or_default() {
                println!("{name:<48} {:>18}  {note}", format!("{value:.3} {unit}"));
            }
            return Ok(());
        }
        Some("sustained") => {
            let relay = Relay::start(&bin, true)?;
            println!("sustained {:.1}", relay.sustained_with_agent(&bin)?);
            return Ok(());
        }
        Some("setup") => {
            let relay = Relay::start(&bin, true)?;
            let s = relay.connect_to_byte(&bin)?;
            for (name, (median, p99)) in [
                ("direct", s.direct),
                ("hidden echoes", s.hidden),
                ("via taas expose", s.agent),
            ] {
                println!(
                    "{name:<16} {:>8.3} ms  p99 {:.3} ms  {:.2} of direct",
                    median * 1e3,
                    p99 * 1e3,
                    median / s.direct.0
                );
            }
            return Ok(());
        }
        Some("peers") => {
            let relay = Relay::start(&bin, true)?;
            let rows = peers::run(&bin, &relay)?;
            let direct = rows.first().map_or(f64::NAN, |r| r.1);
            for (name, median, p99) in rows {
                println!(
                    "{name:<16} {:>8.3} ms  p99 {:.3} ms  {:.2} of direct",
                    median * 1e3,
                    p99 * 1e3,
                    median / direct
                );
            }
            return Ok(());
        }
        Some(other) => {
            return Err(
                format!("unknown bench mode {other:?}: nodes, setup, peers or none").into(),
            );
        }
    }
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut json = serde_json::Map::new();
    let mut put = |name: &str,
                   value: f64,
                   unit: &str,
                   ratio: String,
                   rows: &mut Vec<(String, String, String)>| {
        rows.push((name.to_string(), format!("{value:.3} {unit}"), ratio));
        json.insert(
            name.to_string(),
            serde_json::json!({ "value": value, "unit": unit }),
        );
    };

    // Baseline: direct loopback.
    let direct1 = median(
        (0..ROUNDS)
            .map(|_| throughput_direct(1))
            .collect::<Res<Vec<_>>>()?,
    );
    let direct4 = median(
        (0..ROUNDS)
            .map(|_| throughput_direct(4))
            .collect::<Res<Vec<_>>>()?,
    );
    put("direct 1 pair", direct1, "GB/s", "1.00".into(), &mut rows);
    put("direct 4 pairs", direct4, "GB/s", "1.00".into(), &mut rows);

    for splice in [true, false] {
        let name = if splice { "splice" } else { "read/write" };
        let relay = Relay::start(&bin, splice)?;
        if splice {
            let (rss, threads) = relay.rss_threads()?;
            put(
                "relay RSS at start (no traffic yet)",
                rss / 1024.0,
                "MiB",
                format!(
                    "{threads} threads; anonymous {:.2} MiB",
                    relay.status("RssAnon:")? / 1024.0
                ),
                &mut rows,
            );
        }
        let cpu0 = relay.cpu_seconds()?;
        let mut moved = 0u64;
        for (dir, up) in [("mobile->hidden", true), ("hidden->mobile", false)] {
            for k in [1usize, 4] {
                let mut v = Vec::new();
                for _ in 0..ROUNDS {
                    v.push(relay.throughput(k, up)?);
                    moved += (BULK * k) as u64;
                }
                let g = median(v);
                let base = if k == 1 { direct1 } else { direct4 };
                put(
                    &format!("{name}: {dir}, {k} pair(s)"),
                    g,
                    "GB/s",
                    format!("{:.2}", g / base),
                    &mut rows,
                );
            }
        }
        let cpu = relay.cpu_seconds()? - cpu0;
        put(
            &format!("{name}: relay CPU per GB"),
            cpu / (moved as f64 / 1e9),
            "CPU-s/GB",
            String::new(),
            &mut rows,
        );
        let [add50, add99, direct_p50, direct_p99] = relay.added_latency()?;
        put(
            &format!("{name}: added RTT median (64 B)"),
            add50 * 1e6,
            "µs",
            format!("direct {:.1} µs", direct_p50 * 1e6),
            &mut rows,
        );
        put(
            &format!("{name}: added RTT p99 (64 B)"),
            add99 * 1e6,
            "µs",
            format!("direct {:.1} µs", direct_p99 * 1e6),
            &mut rows,
        );
        if !splice {
            continue;
        }
        let (q_first, full) = relay.setup_times()?;
        put(
            "connect to Q -> first echoed byte",
            q_first * 1e3,
            "ms",
            String::new(),
            &mut rows,
        );
        put(
            "HTTPS GET -> 307 -> connect -> first byte",
            full * 1e3,
            "ms",
            String::new(),
            &mut rows,
        );
        let rate = relay.sustained_with_agent(&bin)?;
        put(
            "new mobile connections, agent refilling",
            rate,
            "conn/s",
            String::new(),
            &mut rows,
        );
        let (idle_kib, threads_idle) = relay.rss_threads()?;
        put(
            "relay RSS idle, after the runs above",
            idle_kib / 1024.0,
            "MiB",
            format!("{threads_idle} threads"),
            &mut rows,
        );
        put(
            "relay RSS idle, anonymous (heap and stacks)",
            relay.status("RssAnon:")? / 1024.0,
            "MiB",
            "the rest is the binary and libc, shared".into(),
            &mut rows,
        );
        let (per_pair, threads) = relay.idle_pairs()?;
        put(
            &format!("RSS per idle relayed pair ({IDLE_PAIRS})"),
            per_pair,
            "KiB",
            format!("{threads} threads"),
            &mut rows,
        );
        drop(relay);
        let relay = Relay::start(&bin, true)?;
        let held = relay.max_pairs()?;
        put(
            "concurrent relayed pairs held",
            held as f64,
            "pairs",
            format!("of {MAX_PAIRS} tried"),
            &mut rows,
        );
    }
    // Connection set-up, on a relay of its own (so that the memory rows above
    // are not moved by it): a new connection's first echoed byte, direct and
    // through the relay; the whole mobile flow with curl; registrations.
    let relay = Relay::start(&bin, true)?;
    let setup = relay.connect_to_byte(&bin)?;
    let ms = |s: f64| s * 1e3;
    put(
        "direct connect -> first echoed byte",
        ms(setup.direct.0),
        "ms",
        format!("p99 {:.3} ms; a local echo service", ms(setup.direct.1)),
        &mut rows,
    );
    put(
        "taas connect to Q -> first echoed byte",
        ms(setup.hidden.0),
        "ms",
        format!(
            "{:.2} of direct; p99 {:.3} ms; the hidden side echoes",
            setup.hidden.0 / setup.direct.0,
            ms(setup.hidden.1)
        ),
        &mut rows,
    );
    put(
        "taas connect to Q -> first byte, via taas expose",
        ms(setup.agent.0),
        "ms",
        format!(
            "{:.2} of direct; p99 {:.3} ms; to that echo service",
            setup.agent.0 / setup.direct.0,
            ms(setup.agent.1)
        ),
        &mut rows,
    );
    // rathole and bore, when installed, in rounds of their own beside direct
    // and taas expose again (their ratios are to that direct). A peer that
    // fails is said and its rows left out: the run's other rows are kept.
    let peer_rows = peers::run(&bin, &relay).unwrap_or_else(|e| {
        eprintln!("peers: {e}; their rows are left out");
        Vec::new()
    });
    if let [(_, direct, _), (_, taas, _), others @ ..] = peer_rows.as_slice() {
        for (name, median, p99) in others {
            put(
                &format!("{name} connect -> first byte (a peer)"),
                ms(*median),
                "ms",
                format!(
                    "{:.2} of direct; p99 {:.3} ms; taas expose {:.2} in these rounds",
                    median / direct,
                    ms(*p99),
                    taas / direct
                ),
                &mut rows,
            );
        }
    }
    match relay.curl_flows(&bin)? {
        Some(curl) => {
            put(
                "curl: HTTPS GET straight to the hidden service",
                ms(curl.direct),
                "ms",
                "one TLS handshake: curl's own cost".into(),
                &mut rows,
            );
            put(
                "curl: HTTPS GET -> 307 -> connect -> first byte",
                ms(curl.total.0),
                "ms",
                format!(
                    "p99 {:.3} ms; the 307 part {:.3} ms; {} flows",
                    ms(curl.total.1),
                    ms(curl.redirect),
                    CURL_FLOWS
                ),
                &mut rows,
            );
            put(
                "curl: HTTPS GET -> ... -> first byte, p99",
                ms(curl.total.1),
                "ms",
                String::new(),
                &mut rows,
            );
        }
        None => eprintln!("curl not found: its rows are left out"),
    }
    let regs = relay.registrations()?;
    for (what, note, (rate, cpu, mine)) in [
        ("resumed", "one ClientConfig", regs.resumed),
        ("full TLS", "a new ClientConfig each", regs.full),
    ] {
        put(
            &format!("registrations per second, {what}"),
            rate,
            "reg/s",
            format!("{note}; one after another, each with its plug"),
            &mut rows,
        );
        put(
            &format!("relay CPU per registration, {what}"),
            cpu * 1e6,
            "µs",
            format!("registering side {:.0} µs", mine * 1e6),
            &mut rows,
        );
    }
    drop(relay);

    // Several nodes on one Redis; without redis-server only these rows are
    // left out, and a failure here is reported after the table.
    let nodes_failed = match nodes::run(&bin) {
        Ok(Some(node_rows)) => {
            for (name, value, unit, note) in node_rows {
                put(&name, value, unit, note, &mut rows);
            }
            None
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("the rows of several nodes failed: {e}");
            Some(e)
        }
    };

    // Round trips again with the relay and the clients on one CPU, as on a
    // one-core VPS: on this VM a wake-up that crosses to the other core costs
    // tens of µs, which the direct baseline mostly avoids (its two threads
    // alternate on one core). Last, as pinning leaves the scheduler's placement
    // of later threads changed.
    let relay = Relay::start(&bin, true)?;
    pin(Some(relay.child.id()), Some(0))?;
    let one_cpu = relay.added_latency();
    pin(Some(relay.child.id()), None)?;
    drop(relay);
    let [add50, add99, direct_p50, _] = one_cpu?;
    put(
        "splice: added RTT median, all on one CPU",
        add50 * 1e6,
        "µs",
        format!("direct {:.1} µs", direct_p50 * 1e6),
        &mut rows,
    );
    put(
        "splice: added RTT p99, all on one CPU",
        add99 * 1e6,
        "µs",
        String::new(),
        &mut rows,
    );
    let size = std::fs::metadata(&bin)?.len() as f64 / 1e6;
    put(
        "stripped release binary",
        size,
        "MB",
        String::new(),
        &mut rows,
    );

    println!("\n{:<48} {:>18}  ratio / note", "figure", "value");
    println!("{}", "-".repeat(90));
    for (n, v, r) in &rows {
        println!("{n:<48} {v:>18}  {r}");
    }
    let out = release
        .parent()
        .ok_or("no target directory")?
        .join("bench.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&serde_json::Value::Object(json))?,
    )?;
    println!("\nwritten to {}", out.display());
    match nodes_failed {
        Some(e) => Err(format!("several nodes: {e}").into()),
        None => Ok(()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    // Root may raise the hard limit; otherwise the soft one goes to the hard one.
    if setrlimit(Resource::RLIMIT_NOFILE, 200_000, 200_000).is_err()
        && let Ok((_, hard)) = nix::sys::resource::getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn pair() -> Res<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    Ok((a, l.accept()?.0))
}

/// Writes `BULK` into each writer and reads it from each reader, all at once;
/// aggregate GB/s.
fn pump(pairs: Vec<(TcpStream, TcpStream)>) -> Res<f64> {
    let k = pairs.len();
    let start = Instant::now();
    let mut handles = Vec::new();
    for (mut w, mut r) in pairs {
        handles.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; 64 * 1024];
            let mut left = BULK;
            while left > 0 {
                let n = left.min(buf.len());
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n;
            }
            let _ = w.shutdown(Shutdown::Write);
        }));
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < BULK {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        }));
    }
    for h in handles {
        h.join().map_err(|_| "pump thread panicked")?;
    }
    Ok((BULK * k) as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn throughput_direct(k: usize) -> Res<f64> {
    pump((0..k).map(|_| pair()).collect::<Res<Vec<_>>>()?)
}

/// Echoes everything read back, until EOF.
fn echo(mut s: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// A local echo service, a thread per connection (`echo`), for the rest of
/// the run; its address.
fn echo_service() -> Res<SocketAddr> {
    let svc = TcpListener::bind("127.0.0.1:0")?;
    let addr = svc.local_addr()?;
    std::thread::spawn(move || {
        for s in svc.incoming().flatten() {
            let _ = s.set_nodelay(true);
            echo(s);
        }
    });
    Ok(addr)
}

/// Shuffles `order` in place (Fisher-Yates on a xorshift of `seed`): each
/// round of set-up connections in its own order, what ran just before
/// mattering on this VM, from a fixed seed.
fn shuffle(order: &mut [usize], seed: &mut u32) {
    for i in (1..order.len()).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 17;
        *seed ^= *seed << 5;
        order.swap(i, *seed as usize % (i + 1));
    }
}

/// Median and p99 of 64-byte round trips, seconds.
fn rtt(mut s: TcpStream) -> Res<(f64, f64)> {
    s.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut v = Vec::with_capacity(RTTS);
    for i in 0..RTTS + 200 {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i >= 200 {
            v.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((percentile(&mut v, 0.5), percentile(&mut v, 0.99)))
}

/// Pins this thread (so the threads it starts next) and every thread of
/// process `pid` to CPU `cpu`, or lets them run anywhere again with `None`.
fn pin(pid: Option<u32>, cpu: Option<usize>) -> Res<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    match cpu {
        Some(c) => set.set(c)?,
        None => {
            for c in 0..std::thread::available_parallelism()?.get() {
                set.set(c)?;
            }
        }
    }
    sched_setaffinity(Pid::from_raw(0), &set)?;
    if let Some(pid) = pid {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let tid: i32 = task?.file_name().to_string_lossy().parse()?;
            sched_setaffinity(Pid::from_raw(tid), &set)?;
        }
    }
    Ok(())
}

/// One direct round: median and p99 of 64-byte round trips, seconds.
fn latency_direct() -> Res<(f64, f64)> {
    let (a, b) = pair()?;
    b.set_nodelay(true)?;
    echo(b);
    rtt(a)
}

/// Sends `GET /` for host `name` over `tls`: the answer's status and `Location`.
fn get_root(mut tls: impl Read + Write, name: &str) -> Res<(u16, Option<String>)> {
    write!(tls, "GET / HTTP/1.1\r\nHost: {name}\r\n\r\n")?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no answer for {name}: {:?}", text.lines().next()))?;
    let loc = text
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .map(str::to_string);
    Ok((status, loc))
}

/// Sends `GET /` for host `name` over `tls` and returns the address of the 307's `Location`.
fn follow_307(tls: impl Read + Write, name: &str) -> Res<SocketAddr> {
    let (status, loc) = get_root(tls, name)?;
    let loc = loc.ok_or_else(|| format!("no 307: {status}"))?;
    let hostport = loc
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .ok_or("bad Location")?;
    // LABEL.servers_domain:Q; the bench's names are *.localhost, which clients
    // resolve to loopback themselves (RFC 6761).
    match hostport.parse() {
        Ok(addr) => Ok(addr),
        Err(_) => {
            let port = hostport.rsplit_once(':').ok_or("bad Location")?.1;
            Ok(SocketAddr::from(([127, 0, 0, 1], port.parse()?)))
        }
    }
}

/// A relay process with one account, label "bench".
struct Relay {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    registrar: Registrar,
    relay_ca: String,
    q: SocketAddr,
    provision: PathBuf,
    /// The relay's status listener (`/status`).
    status_at: SocketAddr,
}

impl Relay {
    fn start(bin: &Path, splice: bool) -> Res<Relay> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().display();
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let status_at = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join("taas.toml");
        std::fs::write(
            &config,
            format!(
                "port = {port}\nstore = \"file:{d}/accounts.json\"\ncert = \"{d}/r.crt\"\nkey = \"{d}/r.key\"\n\
                 ca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n\
                 max_waiting = 20000\nmax_pairs = 20000\nmax_pairs_per_ip = 20000\nfirst_octet_timeout = 600\nmax_connections = 4096\nmax_connections_per_ip = 4096\n\
                 pair_wait = 10\nsplice = {splice}\nstatus_listen = \"{status_at}\"\n"
            ),
        )?;
        let c = config.to_str().ok_or("path")?;
        let run = |args: &[&str]| -> Res<String> {
            let out = Command::new(bin)
                .args(args)
                .current_dir(dir.path())
                .output()?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        run(&["cert", "-c", c])?;
        let out = run(&[
            "users",
            "add",
            "bench",
            "--out",
            &format!("{d}/prov"),
            "-c",
            c,
        ])?;
        let provision = PathBuf::from(out.lines().next().ok_or("no provision")?);
        for user in ["agent", "web", "reg"] {
            run(&["users", "add", user, "--out", &format!("{d}/prov"), "-c", c])?;
        }
        let child = Command::new(bin)
            .args(["serve", "-c", c])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let t = Instant::now();
        while TcpStream::connect(addr).is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("relay did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = Provision::load(&provision)?;
        let mut relay = Relay {
            child,
            addr,
            registrar: Registrar::from_provision(&p)?,
            // What clients trust: the relay's CA, which signed r.crt.
            relay_ca: std::fs::read_to_string(dir.path().join("ca.crt"))?,
            q: addr,
            provision,
            status_at,
            dir,
        };
        let h = relay.responder()?;
        // The plug hands the responder to the pool a moment after connecting.
        relay.q = relay.rendezvous_within("bench", Duration::from_secs(5))?;
        let m = TcpStream::connect(relay.q)?;
        drop((h, m));
        Ok(relay)
    }

    fn responder(&self) -> Res<TcpStream> {
        let plug = self
            .registrar
            .register("bench")
            .map_err(|e| e.to_string())?;
        let s = TcpStream::connect(plug)?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// `rendezvous`, polled every 5 ms until LABEL has a responder (a 307),
    /// within `wait`: the last answer's error after that.
    /// Waits (at most 10 s) until `n` responders of `label` wait at the relay,
    /// as its `/status` says: an agent's pool filled.
    fn wait_for_pool(&self, label: &str, n: u64) -> Res<()> {
        let waiting = || -> Option<u64> {
            let mut s = TcpStream::connect_timeout(&self.status_at, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            let body: serde_json::Value =
                serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()?;
            body["labels"]
                .as_array()?
                .iter()
                .find(|l| l["label"] == label)?["waiting"]
                .as_u64()
        };
        let t = Instant::now();
        while waiting().unwrap_or(0) < n {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{label}: {n} responders not waiting within 10 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn rendezvous_within(&self, label: &str, wait: Duration) -> Res<SocketAddr> {
        let t = Instant::now();
        loop {
            match self.rendezvous(label) {
                Ok(q) => return Ok(q),
                Err(e) if t.elapsed() > wait => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// HTTPS GET on LABEL's host: the 307's port.
    fn rendezvous(&self, label: &str) -> Res<SocketAddr> {
        let name = format!("{label}.taas.localhost");
        let cfg = taas::tls::client_config(Some(&self.relay_ca))?;
        let conn = rustls::ClientConnection::new(
            cfg,
            rustls::pki_types::ServerName::try_from(name.clone())?,
        )?;
        let tls = rustls::StreamOwned::new(conn, TcpStream::connect(self.addr)?);
        follow_307(tls, &name)
    }

    /// A relayed pair: (mobile, hidden). The mobile's first octet pairs it (a
    /// connection takes a responder only then), and the hidden side reads it,
    /// so a pair where the hidden side speaks first, and an idle pair, are
    /// relayed pairs and not a mobile still waiting.
    fn pair(&self) -> Res<(TcpStream, TcpStream)> {
        let mut h = self.responder()?;
        let mut m = TcpStream::connect(self.q)?;
        m.set_nodelay(true)?;
        m.write_all(b"!")?;
        h.set_read_timeout(Some(Duration::from_secs(10)))?;
        h.read_exact(&mut [0u8; 1])?;
        h.set_read_timeout(None)?;
        Ok((m, h))
    }

    fn throughput(&self, k: usize, up: bool) -> Res<f64> {
        let pairs = (0..k)
            .map(|_| self.pair().map(|(m, h)| if up { (m, h) } else { (h, m) }))
            .collect::<Res<Vec<_>>>()?;
        pump(pairs)
    }

    /// Added round-trip time, median and p99, seconds: each relayed round is
    /// paired with a direct round measured just before it (this machine's
    /// loopback latency drifts from minute to minute), and the medians of the
    /// differences are taken. Also the direct medians, for the note.
    fn added_latency(&self) -> Res<[f64; 4]> {
        let (mut add50, mut add99, mut d50, mut d99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS * 2 {
            let (x, y) = latency_direct()?;
            let (m, h) = self.pair()?;
            echo(h);
            let (p, q) = rtt(m)?;
            add50.push(p - x);
            add99.push(q - y);
            d50.push(x);
            d99.push(y);
        }
        Ok([median(add50), median(add99), median(d50), median(d99)])
    }

    /// Medians: connect to Q -> first echoed byte; GET -> 307 -> connect -> byte.
    fn setup_times(&self) -> Res<(f64, f64)> {
        let mut q = Vec::new();
        let mut full = Vec::new();
        for _ in 0..50 {
            echo(self.responder()?);
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            let mut m = TcpStream::connect(self.q)?;
            m.write_all(b"x")?;
            m.read_exact(&mut [0u8; 1])?;
            q.push(t.elapsed().as_secs_f64());
            echo(self.responder()?);
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            let addr = self.rendezvous("bench")?;
            let mut m = TcpStream::connect(addr)?;
            m.write_all(b"x")?;
            m.read_exact(&mut [0u8; 1])?;
            full.push(t.elapsed().as_secs_f64());
        }
        Ok((median(q), median(full)))
    }

    /// Full mobile flows per second for 5 s, 4 clients, `taas expose` refilling.
    fn sustained_with_agent(&self, bin: &Path) -> Res<f64> {
        let svc = TcpListener::bind("127.0.0.1:0")?;
        let svc_addr = svc.local_addr()?;
        std::thread::spawn(move || {
            for s in svc.incoming().flatten() {
                echo(s);
            }
        });
        let mut agent = self.expose(bin, "agent", svc_addr)?;
        self.wait_for_pool("agent", AGENT_POOL)?;
        let me = Arc::new(self.rendezvous_client());
        let end = Instant::now() + Duration::from_secs(5);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let me = me.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        if me.flow().is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        let _ = agent.kill();
        let _ = agent.wait();
        Ok(total as f64 / 5.0)
    }

    /// The provisioning file of the user whose only label is `label`.
    fn provision_of(&self, label: &str) -> Res<PathBuf> {
        Ok(std::fs::read_dir(self.provision.parent().ok_or("dir")?)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && Provision::load(p).is_ok_and(|v| v.labels == [label])
            })
            .ok_or("no such provision")?)
    }

    /// `taas expose` for `label` to `to`, 8 waiting.
    fn expose(&self, bin: &Path, label: &str, to: SocketAddr) -> Res<Child> {
        Ok(Command::new(bin)
            .args([
                "expose",
                self.provision_of(label)?.to_str().ok_or("path")?,
                "--to",
                &to.to_string(),
                "--pool",
                &AGENT_POOL.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// A new connection's first echoed byte, median and p99, in rounds of
    /// three, `SETUP_GAP` apart and in shuffled order: directly to a local echo
    /// service; to Q where the hidden side (a responder registered here)
    /// echoes; to Q through `taas expose --to` that echo service.
    fn connect_to_byte(&self, bin: &Path) -> Res<SetupTimes> {
        let svc_addr = echo_service()?;
        let mut agent = self.expose(bin, "agent", svc_addr)?;
        let measured = (|| {
            // A few responders ahead, so that a plug still being accepted
            // never makes a round wait.
            for _ in 0..4 {
                echo(self.responder()?);
            }
            self.wait_for_pool("agent", AGENT_POOL)?;
            let q_agent = self.rendezvous("agent")?;
            let to = [svc_addr, self.q, q_agent];
            let mut took: [Vec<f64>; 3] = Default::default();
            // Each round in its own order (what ran just before matters on
            // this VM), from a fixed seed.
            let mut seed = 0x2545_f491_u32;
            for _ in 0..SETUP_ROUNDS {
                echo(self.responder()?);
                let mut order = [0, 1, 2];
                shuffle(&mut order, &mut seed);
                for k in order {
                    std::thread::sleep(SETUP_GAP);
                    took[k].push(first_echo(to[k])?);
                }
            }
            let [mut direct, mut hidden, mut agent] = took;
            let spread = |v: &mut Vec<f64>| (percentile(v, 0.5), percentile(v, 0.99));
            Ok(SetupTimes {
                direct: spread(&mut direct),
                hidden: spread(&mut hidden),
                agent: spread(&mut agent),
            })
        })();
        let _ = agent.kill();
        let _ = agent.wait();
        measured
    }

    /// The whole mobile flow with curl, `CURL_FLOWS` times, one process each:
    /// HTTPS GET on the label's host, the 307, connect to Q, TLS with the
    /// hidden HTTPS service (behind `taas expose`), its one-octet answer; each
    /// beside a curl GET straight to that service (one TLS handshake, the
    /// client's own cost). `None` without curl.
    fn curl_flows(&self, bin: &Path) -> Res<Option<CurlTimes>> {
        if Command::new("curl").arg("--version").output().is_err() {
            return Ok(None);
        }
        let (svc_addr, bundle) = https_service(self.dir.path(), &self.relay_ca)?;
        let mut agent = self.expose(bin, "web", svc_addr)?;
        // (time_redirect, time_total) of one curl run, followed to the end.
        let curl = |url: &str| -> Res<(f64, f64)> {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-L", "--max-time", "10"])
                .args(["-w", "%{http_code} %{time_redirect} %{time_total}"])
                .arg("--cacert")
                .arg(&bundle)
                // Every host name to loopback, the port kept.
                .args(["--connect-to", "::127.0.0.1:", url])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let f: Vec<&str> = text.split_whitespace().collect();
            if f.len() != 3 || f[0] != "200" {
                return Err(format!("curl {url}: {text:?}").into());
            }
            Ok((f[1].parse()?, f[2].parse()?))
        };
        let measured = (|| {
            self.wait_for_pool("web", AGENT_POOL)?;
            let via_relay = format!("https://web.taas.localhost:{}/", self.addr.port());
            let direct = format!("https://web.taas.localhost:{}/", svc_addr.port());
            let (mut total, mut redirect, mut alone) = (vec![], vec![], vec![]);
            for _ in 0..CURL_FLOWS {
                let (r, t) = curl(&via_relay)?;
                redirect.push(r);
                total.push(t);
                alone.push(curl(&direct)?.1);
            }
            Ok(Some(CurlTimes {
                total: (percentile(&mut total, 0.5), percentile(&mut total, 0.99)),
                redirect: percentile(&mut redirect, 0.5),
                direct: percentile(&mut alone, 0.5),
            }))
        })();
        let _ = agent.kill();
        let _ = agent.wait();
        measured
    }

    /// Registrations one after another (each with its plug connection, then
    /// closed), in blocks that alternate: one registrar (one rustls
    /// ClientConfig, so TLS sessions are resumed) and a new registrar each
    /// time (a new ClientConfig: a full handshake). Per kind: registrations
    /// per second and relay CPU seconds per registration.
    fn registrations(&self) -> Res<Registrations> {
        let p = Provision::load(&self.provision_of("reg")?)?;
        let one = Registrar::from_provision(&p)?;
        let mut spent = [(0.0, 0.0, 0.0); 2];
        for _ in 0..REGISTRATION_BLOCKS {
            for (kind, fresh) in [(0, false), (1, true)] {
                let cpu0 = self.cpu_seconds()?;
                let mine0 = cpu_seconds_of(std::process::id())?;
                let t = Instant::now();
                for _ in 0..REGISTRATIONS {
                    let registrar = if fresh {
                        Registrar::from_provision(&p)?
                    } else {
                        one.clone()
                    };
                    let plug = registrar.register("reg").map_err(|e| e.to_string())?;
                    drop(TcpStream::connect(plug)?);
                }
                spent[kind].0 += t.elapsed().as_secs_f64();
                spent[kind].1 += self.cpu_seconds()? - cpu0;
                spent[kind].2 += cpu_seconds_of(std::process::id())? - mine0;
            }
        }
        let n = (REGISTRATIONS * REGISTRATION_BLOCKS) as f64;
        let per = |(secs, cpu, mine): (f64, f64, f64)| (n / secs, cpu / n, mine / n);
        Ok(Registrations {
            resumed: per(spent[0]),
            full: per(spent[1]),
        })
    }

    fn rendezvous_client(&self) -> Client {
        Client {
            addr: self.addr,
            ca: self.relay_ca.clone(),
        }
    }

    fn status(&self, key: &str) -> Res<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or("no such status line")?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or("bad status line")?
            .parse()?)
    }

    fn rss_threads(&self) -> Res<(f64, u64)> {
        Ok((self.status("VmRSS:")?, self.status("Threads:")? as u64))
    }

    fn cpu_seconds(&self) -> Res<f64> {
        cpu_seconds_of(self.child.id())
    }

    /// KiB of RSS per idle relayed pair, and threads then.
    fn idle_pairs(&self) -> Res<(f64, u64)> {
        let before = self.status("RssAnon:")?;
        let mut held = Vec::with_capacity(IDLE_PAIRS);
        for _ in 0..IDLE_PAIRS {
            held.push(self.pair()?);
        }
        std::thread::sleep(Duration::from_secs(1));
        let after = self.status("RssAnon:")?;
        let threads = self.status("Threads:")? as u64;
        Ok(((after - before) / IDLE_PAIRS as f64, threads))
    }

    /// Pairs held at once, up to `MAX_PAIRS`, stopping where the machine says no.
    fn max_pairs(&self) -> Res<usize> {
        let mut held = Vec::new();
        // A pair counts once a byte has crossed it (`pair` sees to it).
        while held.len() < MAX_PAIRS {
            match self.pair() {
                Ok(p) => held.push(p),
                Err(e) => {
                    eprintln!("stopped at {} pairs: {e}", held.len());
                    break;
                }
            }
        }
        Ok(held.len())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// A mobile client: GET -> 307 -> connect -> one echoed byte.
struct Client {
    addr: SocketAddr,
    ca: String,
}

impl Client {
    fn flow(&self) -> Res<()> {
        let name = "agent.taas.localhost";
        let cfg = taas::tls::client_config(Some(&self.ca))?;
        let conn =
            rustls::ClientConnection::new(cfg, rustls::pki_types::ServerName::try_from(name)?)?;
        let tls = rustls::StreamOwned::new(conn, TcpStream::connect(self.addr)?);
        let q = follow_307(tls, name)?;
        let mut m = TcpStream::connect(q)?;
        m.set_read_timeout(Some(Duration::from_secs(10)))?;
        m.write_all(b"x")?;
        m.read_exact(&mut [0u8; 1])?;
        Ok(())
    }
}

/// Connect -> first echoed byte: (median, p99) seconds.
struct SetupTimes {
    direct: (f64, f64),
    hidden: (f64, f64),
    agent: (f64, f64),
}

/// curl's whole flow: (median, p99) seconds; the median of its redirect part;
/// the median of curl's GET straight to the hidden service.
struct CurlTimes {
    total: (f64, f64),
    redirect: f64,
    direct: f64,
}

/// (registrations per second, relay CPU seconds per registration, this
/// process's CPU seconds per registration: the registering side's).
struct Registrations {
    resumed: (f64, f64, f64),
    full: (f64, f64, f64),
}

/// Seconds from connecting to `to` to its echo of one octet.
fn first_echo(to: SocketAddr) -> Res<f64> {
    let t = Instant::now();
    let mut m = TcpStream::connect(to)?;
    m.set_nodelay(true)?;
    m.set_read_timeout(Some(Duration::from_secs(10)))?;
    m.write_all(b"x")?;
    m.read_exact(&mut [0u8; 1])?;
    Ok(t.elapsed().as_secs_f64())
}

/// A local HTTPS service for `web.taas.localhost`, thread per connection,
/// answering every request with one octet; its address, and a CA bundle (the
/// relay's certificate and its) for curl.
fn https_service(dir: &Path, relay_ca: &str) -> Res<(SocketAddr, PathBuf)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = taas::cert::generate(vec!["web.taas.localhost".into()])?;
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{relay_ca}{cert}"))?;
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?,
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_nodelay(true);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    Ok((addr, bundle))
}

/// CPU seconds (user and system) process `pid` has used so far.
fn cpu_seconds_of(pid: u32) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}
