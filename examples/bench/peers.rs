//! `cargo run --release --example bench -- peers`: a new connection's first
//! echoed byte through taas expose beside rathole and bore, the peers the
//! README compares taas with, in one run: each forwards a port on loopback to
//! the same local echo service (a thread per connection), and rounds of one
//! connection each (direct, taas, rathole, bore) run in shuffled order,
//! `SETUP_GAP` apart, so that what this VM's neighbours do falls on all alike.
//!
//! The peers are not built here: `rathole` and `bore` are looked for in
//! `TAAS_BENCH_PEERS` (a directory), then on `PATH`; one that is missing is
//! said so and left out of the table (`cargo install rathole
//! --no-default-features --features server,client` and `cargo install
//! bore-cli` put them in ~/.cargo/bin). Every process started here is stopped
//! by its guard, on every path; every wait is bounded by `WAIT`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Relay, Res, SETUP_GAP, SETUP_ROUNDS, echo_service, first_echo, percentile, shuffle};

/// Longest wait for a peer's tunnel to answer.
const WAIT: Duration = Duration::from_secs(10);

/// Kills its process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One row: name, median and p99 seconds.
pub type Row = (String, f64, f64);

/// The rows, direct first; each peer's tunnel is up before the rounds start.
pub fn run(bin: &Path, relay: &Relay) -> Res<Vec<Row>> {
    let svc_addr = echo_service()?;
    let dir = tempfile::tempdir()?;
    let mut guards = vec![Guard(relay.expose(bin, "agent", svc_addr)?)];
    // The agent's first registrations take a moment.
    let q = relay.rendezvous_within("agent", WAIT)?;
    let mut to: Vec<(String, SocketAddr)> =
        vec![("direct".into(), svc_addr), ("taas expose".into(), q)];
    match find("rathole") {
        Some(exe) => {
            let (g, at) = rathole(&exe, dir.path(), svc_addr)?;
            guards.extend(g);
            to.push(("rathole".into(), at));
        }
        None => eprintln!("rathole not found (TAAS_BENCH_PEERS or PATH): left out"),
    }
    match find("bore") {
        Some(exe) => {
            let (g, at) = bore(&exe, svc_addr)?;
            guards.extend(g);
            to.push(("bore".into(), at));
        }
        None => eprintln!("bore not found (TAAS_BENCH_PEERS or PATH): left out"),
    }
    for (name, at) in &to {
        ready(name, *at)?;
    }
    let mut took: Vec<Vec<f64>> = vec![Vec::with_capacity(SETUP_ROUNDS); to.len()];
    let mut order: Vec<usize> = (0..to.len()).collect();
    let mut seed = 0x2545_f491_u32;
    for _ in 0..SETUP_ROUNDS {
        shuffle(&mut order, &mut seed);
        for &k in &order {
            std::thread::sleep(SETUP_GAP);
            took[k].push(first_echo(to[k].1)?);
        }
    }
    drop(guards);
    Ok(to
        .into_iter()
        .zip(took)
        .map(|((name, _), mut v)| {
            let (median, p99) = (percentile(&mut v, 0.5), percentile(&mut v, 0.99));
            (name, median, p99)
        })
        .collect())
}

/// `name` in `TAAS_BENCH_PEERS`, else on `PATH`.
fn find(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("TAAS_BENCH_PEERS")
        .into_iter()
        .chain(std::env::var_os("PATH"))
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    dirs.map(|d| d.join(name)).find(|p| p.is_file())
}

/// A free port on 127.0.0.1 (free when asked: the peer binds it next).
fn free_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `at` echoes three connections in a row, within `WAIT`.
fn ready(name: &str, at: SocketAddr) -> Res<()> {
    let t = Instant::now();
    let mut ok = 0;
    while ok < 3 {
        if t.elapsed() > WAIT {
            return Err(format!("{name} at {at} did not echo within {WAIT:?}").into());
        }
        if first_echo(at).is_ok() {
            ok += 1;
        } else {
            ok = 0;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn quiet(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// rathole's server and client on loopback, TCP without encryption (as taas's
/// relayed connections, which carry the mobile's own TLS); the service port.
fn rathole(exe: &Path, dir: &Path, svc: SocketAddr) -> Res<(Vec<Guard>, SocketAddr)> {
    let (control, service) = (free_port()?, free_port()?);
    let server = dir.join("rathole-server.toml");
    let client = dir.join("rathole-client.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\
             [server.services.echo]\nbind_addr = \"127.0.0.1:{service}\"\n"
        ),
    )?;
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\
             [client.services.echo]\nlocal_addr = \"{svc}\"\n"
        ),
    )?;
    let s = Guard(quiet(exe).arg("--server").arg(&server).spawn()?);
    let c = Guard(quiet(exe).arg("--client").arg(&client).spawn()?);
    Ok((vec![s, c], format!("127.0.0.1:{service}").parse()?))
}

/// bore's server (its control port is fixed: 7835) and `bore local` on
/// loopback; the tunnel's port.
fn bore(exe: &Path, svc: SocketAddr) -> Res<(Vec<Guard>, SocketAddr)> {
    let tunnel = free_port()?;
    let mut s = Guard(
        quiet(exe)
            .args(["server", "--bind-addr", "127.0.0.1"])
            .spawn()?,
    );
    // The client gives up when the server is not listening yet: it starts
    // once the port answers, and only while this server runs (one that
    // exited, e.g. port 7835 taken, would leave another program answering).
    let t = Instant::now();
    let c = loop {
        if let Some(status) = s.0.try_wait()? {
            return Err(format!("bore server exited ({status}): is 127.0.0.1:7835 taken?").into());
        }
        if std::net::TcpStream::connect("127.0.0.1:7835").is_ok() {
            break Guard(
                quiet(exe)
                    .args(["local", &svc.port().to_string()])
                    .args(["--local-host", "127.0.0.1", "--to", "127.0.0.1"])
                    .args(["--port", &tunnel.to_string()])
                    .spawn()?,
            );
        }
        if t.elapsed() > WAIT {
            return Err("bore server did not listen on 127.0.0.1:7835".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((vec![s, c], format!("127.0.0.1:{tunnel}").parse()?))
}
