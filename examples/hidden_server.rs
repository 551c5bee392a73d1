//! The smallest correct hidden server: registers with the relay through the
//! library, and answers each mobile connection itself with a TLS "hello" page.
//!
//! Shortcuts, admitted: its certificate is self-signed and made at start (written
//! to CERT_OUT so a mobile client can trust it); it handles one connection at a
//! time and keeps one registration waiting instead of a pool (`taas expose` keeps
//! several); on any error it stops instead of backing off.
//!
//! Usage: cargo run --example hidden_server -- PROVISION.json CERT_OUT

use std::error::Error;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use taas::agent::Registrar;
use taas::provision::Provision;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        return Err("usage: hidden_server PROVISION.json CERT_OUT".into());
    }
    serve(Path::new(&args[1]), Path::new(&args[2]), usize::MAX)
}

/// Serves `count` mobile connections, then returns.
pub fn serve(provision: &Path, cert_out: &Path, count: usize) -> Result<(), Box<dyn Error>> {
    let p = Provision::load(provision)?;
    let label = p.labels.first().ok_or("no label")?.clone();
    let registrar = Registrar::from_provision(&p)?;

    // Our own certificate, for our own name (LABEL.servers_domain): the 307
    // sends mobile clients to that name, and they check it.
    let (cert_pem, key_pem) = taas::cert::generate(vec![p.name.clone()])?;
    std::fs::write(cert_out, &cert_pem)?;
    let certs =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?,
    );

    for _ in 0..count {
        // 1. PUT /register/LABEL with a TOTP token; the answer names the plug.
        let plug = registrar.register(&label).map_err(|e| e.to_string())?;
        // 2. Connect to the plug and wait: the mobile client speaks first.
        let tcp = TcpStream::connect(plug)?;
        // 3. TLS end to end with the mobile client: the relay only copies octets.
        let conn = rustls::ServerConnection::new(tls.clone())?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let body = "hello from a hidden server\n";
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        stream.conn.send_close_notify();
        stream.flush()?;
    }
    Ok(())
}
