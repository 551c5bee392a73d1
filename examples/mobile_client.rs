//! A mobile client: asks the relay for LABEL's host, follows the 307 to the
//! rendezvous port, and talks TLS end to end with the hidden server through it.
//!
//! Shortcuts, admitted: it trusts exactly the two certificates given (the relay's
//! and the hidden server's) instead of the system roots; it reads the answer to
//! EOF and prints it whole; it follows one redirect only; it resolves a
//! `*.localhost` name to loopback itself (as curl and browsers do, RFC 6761),
//! other names with the system resolver.
//!
//! Usage: cargo run --example mobile_client -- RELAY_ADDR HOST RELAY_CA HIDDEN_CA [PATH]
//!   e.g. 127.0.0.1:8443 demo.taas.localhost taas-data/registrar.crt hidden.crt /

use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use rustls::pki_types::ServerName;

fn main() -> Result<(), Box<dyn Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: mobile_client RELAY_ADDR HOST RELAY_CA HIDDEN_CA [PATH]".into());
    }
    let relay_ca = std::fs::read_to_string(&a[3])?;
    let hidden_ca = std::fs::read_to_string(&a[4])?;
    let path = a.get(5).map_or("/", String::as_str);
    print!(
        "{}",
        fetch(a[1].parse()?, &a[2], path, &relay_ca, &hidden_ca)?
    );
    Ok(())
}

/// One HTTPS GET over TLS to `name` at `addr`; the whole answer.
fn get(
    addr: SocketAddr,
    name: &str,
    host: &str,
    path: &str,
    ca: &str,
) -> Result<String, Box<dyn Error>> {
    let config: Arc<rustls::ClientConfig> = taas::tls::client_config(Some(ca))?;
    let conn = rustls::ClientConnection::new(config, ServerName::try_from(name.to_string())?)?;
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr)?);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Asks the relay for `host` and follows its 307 to the hidden server.
pub fn fetch(
    relay: SocketAddr,
    host: &str,
    path: &str,
    relay_ca: &str,
    hidden_ca: &str,
) -> Result<String, Box<dyn Error>> {
    let name = host.split(':').next().unwrap_or(host);
    // 1. The relay answers 307 with the label's rendezvous port.
    let first = get(relay, name, host, path, relay_ca)?;
    let location = first
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .ok_or_else(|| format!("no redirect: {}", first.lines().next().unwrap_or("")))?;
    // 2. https://LABEL.servers_domain:Q/PATH: connect to Q; TLS from here is with
    //    the hidden server, checked against the name the 307 gave.
    let rest = location.split_once("://").map_or(location, |(_, r)| r);
    let (authority, target) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (q_name, q_port) = authority.rsplit_once(':').ok_or("no port in Location")?;
    let q_name = q_name.trim_matches(['[', ']']);
    let q: SocketAddr = if q_name == "localhost" || q_name.ends_with(".localhost") {
        SocketAddr::from(([127, 0, 0, 1], q_port.parse()?))
    } else {
        std::net::ToSocketAddrs::to_socket_addrs(authority)?
            .next()
            .ok_or("the Location's host has no address")?
    };
    let body = get(
        q,
        q_name,
        authority,
        if target.is_empty() { "/" } else { target },
        hidden_ca,
    )?;
    Ok(body
        .split_once("\r\n\r\n")
        .map_or(body.clone(), |(_, b)| b.to_string()))
}
