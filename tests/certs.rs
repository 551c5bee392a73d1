//! The relay's CA and its certificates, with real tools: `openssl verify`
//! accepts what the CA issues for a label and rejects, for its name constraints,
//! what the same key signs for another site; file modes; an existing registrar
//! certificate kept by `taas cert` and `taas users add` and carried in
//! `server.ca` with the CA; `taas users cert`; and a `taas serve` process that
//! takes a new certificate on SIGHUP while a pair made before keeps flowing.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use support::{free_port, taas, taas_bin, wait_until};
use taas::Config;
use taas::provision::Provision;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Writes `taas.toml` in `dir` with every file in `dir` (and `extra`); returns
/// its path.
fn config_file(dir: &Path, extra: &str) -> PathBuf {
    let d = dir.display();
    let path = dir.join("taas.toml");
    std::fs::write(
        &path,
        format!(
            "store = \"file:{d}/accounts.json\"\ncert = \"{d}/registrar.crt\"\nkey = \"{d}/registrar.key\"\n\
             ca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n{extra}\n"
        ),
    )
    .unwrap();
    path
}

/// `taas ARGS -c CONFIG` in `dir`, which must succeed; returns stdout.
fn ok(dir: &Path, config: &Path, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["-c", config.to_str().unwrap()]);
    let (ok, out, err) = taas(dir, &all);
    assert!(ok, "taas {args:?}: {err}");
    out
}

/// `openssl verify -CAfile CA CERT`: (exit ok, stdout and stderr).
fn openssl_verify(ca: &Path, cert: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca)
        .arg(cert)
        .output()
        .expect("openssl must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A certificate for `name` signed with the CA's key by rcgen directly, as
/// someone holding `ca.key` could make one, not through taas' checks.
fn sign_with_ca_key(config: &Config, name: &str) -> String {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&config.ca_key).unwrap()).unwrap();
    let mut issuer = rcgen::CertificateParams::default();
    issuer.distinguished_name = taas::cert::ca_name(&key);
    issuer.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = rcgen::Issuer::new(issuer, key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.use_authority_key_identifier_extension = true;
    params.signed_by(&leaf_key, &issuer).unwrap().pem()
}

fn first_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn openssl_accepts_label_certificates_and_rejects_names_outside_servers_domain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config_path = config_file(d, "");
    let config = Config::load(Some(&config_path)).unwrap();
    ok(d, &config_path, &["cert"]);
    assert_eq!(mode(&config.ca_key), 0o400);
    assert_eq!(mode(&config.ca_cert), 0o444);
    assert_eq!(mode(&config.key), 0o400);
    assert_eq!(mode(&config.cert), 0o444);
    let json = ok(d, &config_path, &["users", "add", "demo", "--out", "prov"]);
    let json = d.join(json.trim());
    let (crt, key) = (json.with_extension("crt"), json.with_extension("key"));
    assert_eq!(mode(&crt), 0o600);
    assert_eq!(mode(&key), 0o600);

    // What taas issued: the label's name, from the CA.
    let (verified, text) = openssl_verify(&config.ca_cert, &crt);
    assert!(verified, "{text}");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&crt)
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&out.stdout);
    assert!(sans.contains("DNS:demo.taas.localhost"), "{sans}");
    // The registrar's certificate too (IP 127.0.0.1, *.taas.localhost).
    let (verified, text) = openssl_verify(&config.ca_cert, &config.cert);
    assert!(verified, "{text}");

    // The CA's key used by hand: a name under servers_domain passes, so the
    // rejection below is the name's, not the signature's.
    let inside = d.join("inside.crt");
    std::fs::write(&inside, sign_with_ca_key(&config, "other.taas.localhost")).unwrap();
    let (verified, text) = openssl_verify(&config.ca_cert, &inside);
    assert!(verified, "{text}");
    for name in [
        "evil.example.com",
        "taas.localhost.evil.example",
        "10.0.0.1",
    ] {
        let outside = d.join("outside.crt");
        std::fs::write(&outside, sign_with_ca_key(&config, name)).unwrap();
        let (verified, text) = openssl_verify(&config.ca_cert, &outside);
        assert!(!verified, "{name}: openssl accepted it: {text}");
        assert!(
            text.contains("permitted subtree violation"),
            "{name}: {text}"
        );
    }
}

#[test]
fn an_existing_self_signed_registrar_certificate_is_kept_and_carried_with_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config_path = config_file(d, "port = 0");
    let config = Config::load(Some(&config_path)).unwrap();
    // A relay set up before the CA: a self-signed certificate, as `taas cert`
    // made them.
    let (old_cert, old_key) = taas::cert::generate(taas::cert::subject_alt_names(&config)).unwrap();
    std::fs::write(&config.cert, &old_cert).unwrap();
    std::fs::write(&config.key, &old_key).unwrap();
    std::fs::set_permissions(&config.key, std::fs::Permissions::from_mode(0o400)).unwrap();

    // Without a CA, an account cannot get its label certificate: one line
    // naming the file and what to do, and no account.
    let (good, _, err) = taas(
        d,
        &["users", "add", "demo", "-c", config_path.to_str().unwrap()],
    );
    assert!(!good);
    assert!(
        err.contains(config.ca_cert.to_str().unwrap()) && err.contains("taas cert"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // `taas cert` makes the CA only.
    let (good, _, err) = taas(d, &["cert", "-c", config_path.to_str().unwrap()]);
    assert!(good, "{err}");
    assert!(err.contains("kept the registrar's certificate"), "{err}");
    assert_eq!(std::fs::read_to_string(&config.cert).unwrap(), old_cert);
    assert_eq!(std::fs::read_to_string(&config.key).unwrap(), old_key);
    assert_eq!(mode(&config.ca_key), 0o400);
    assert_eq!(mode(&config.ca_cert), 0o444);

    let json = ok(d, &config_path, &["users", "add", "demo", "--out", "prov"]);
    assert_eq!(std::fs::read_to_string(&config.cert).unwrap(), old_cert);
    let p = Provision::load(&d.join(json.trim())).unwrap();
    let ca_pem = std::fs::read_to_string(&config.ca_cert).unwrap();
    let carried = p.server.ca.clone().unwrap();
    assert_eq!(carried, format!("{old_cert}{ca_pem}"));

    // The legacy file carries the same.
    let js = Provision::load(&d.join(json.trim()).with_extension("js")).unwrap();
    assert_eq!(js.server.ca, p.server.ca);

    // A hidden server in the field verifies that registrar with it.
    let server = taas::Server::bind(config.clone()).unwrap();
    let mut p = p;
    p.server.port = server.local_addr().port();
    let registrar = taas::agent::Registrar::from_provision(&p).unwrap();
    let plug = registrar.register("demo").unwrap();
    assert!(TcpStream::connect(plug).is_ok());

    // `taas users cert ID` issues a new certificate and key for the account.
    let id = p.id().to_string();
    let crt = d.join("prov").join(format!("{id}.crt"));
    let key = d.join("prov").join(format!("{id}.key"));
    let (first_crt, first_key) = (
        std::fs::read_to_string(&crt).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    );
    let out = ok(d, &config_path, &["users", "cert", &id, "--out", "again"]);
    let again = d.join("again").join(format!("{id}.crt"));
    assert_eq!(d.join(out.trim()), again);
    assert_eq!(mode(&again), 0o600);
    assert_eq!(mode(&again.with_extension("key")), 0o600);
    let new_key = std::fs::read_to_string(again.with_extension("key")).unwrap();
    assert_ne!(new_key, first_key);
    assert_ne!(std::fs::read_to_string(&again).unwrap(), first_crt);
    assert!(openssl_verify(&config.ca_cert, &again).0);
    // Over the files already there, too.
    ok(d, &config_path, &["users", "cert", &id, "--out", "prov"]);
    assert_ne!(std::fs::read_to_string(&key).unwrap(), first_key);

    // Unknown account, and a CA gone missing: one line each.
    let (good, _, err) = taas(
        d,
        &[
            "users",
            "cert",
            "00000000-0000-4000-8000-000000000000",
            "-c",
            config_path.to_str().unwrap(),
        ],
    );
    assert!(!good && err.contains("no account"), "{err}");
    std::fs::rename(&config.ca_key, d.join("ca.key.away")).unwrap();
    let (good, _, err) = taas(
        d,
        &["users", "cert", &id, "-c", config_path.to_str().unwrap()],
    );
    assert!(!good);
    assert!(
        err.contains(config.ca_key.to_str().unwrap()) && err.contains("taas cert"),
        "{err}"
    );
}

/// A fixed-port label's certificate names the label, not the port.
#[test]
fn a_fixed_port_label_gets_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config_path = config_file(d, "");
    ok(d, &config_path, &["cert"]);
    let json = ok(
        d,
        &config_path,
        &["users", "add", "cam:8888", "--out", "prov"],
    );
    let crt = d.join(json.trim()).with_extension("crt");
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&crt)
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&out.stdout);
    assert!(sans.contains("DNS:cam.taas.localhost"), "{sans}");
    assert!(!sans.contains("8888"), "{sans}");
}

/// A child process killed on drop.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The certificate the relay on `port` serves to a new connection (verified
/// against `ca_pem`, for `registrar.localhost`).
fn served_certificate(port: u16, ca_pem: &str) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = support::tls_stream(ca_pem, "registrar.localhost", tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: registrar.localhost\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    assert!(
        out.starts_with(b"HTTP/1.1 404"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Points the symlink `link` at `target` (a new link renamed over the old, as
/// certbot does).
fn repoint(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// SIGHUP and waits for `needle` to appear `count` times in the log.
fn hup_and_wait(pid: &str, log: &Path, needle: &str, count: usize) -> String {
    assert!(
        Command::new("kill")
            .args(["-HUP", pid])
            .status()
            .unwrap()
            .success()
    );
    let mut text = String::new();
    let seen = wait_until(Duration::from_secs(10), || {
        text = std::fs::read_to_string(log).unwrap_or_default();
        text.matches(needle).count() >= count
    });
    assert!(seen, "no {needle:?} x{count} in the log:\n{text}");
    text
}

#[test]
fn sighup_serves_a_new_certificate_to_the_next_connection_and_keeps_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let live = d.join("live");
    let archive = d.join("archive");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    let dd = d.display();
    let config_path = d.join("taas.toml");
    std::fs::write(
        &config_path,
        format!(
            "port = {port}\nstore = \"file:{dd}/accounts.json\"\ncert = \"{dd}/live/registrar.crt\"\n\
             key = \"{dd}/live/registrar.key\"\nca_cert = \"{dd}/ca.crt\"\nca_key = \"{dd}/ca.key\"\n\
             log_file = \"{dd}/taas.log\"\nshutdown_grace = 1\n"
        ),
    )
    .unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    ok(d, &config_path, &["cert"]);
    // Laid out as certbot's: live/ holds symlinks into archive/.
    for (name, n) in [
        ("registrar.crt", "cert1.pem"),
        ("registrar.key", "key1.pem"),
    ] {
        std::fs::rename(live.join(name), archive.join(n)).unwrap();
        std::os::unix::fs::symlink(archive.join(n), live.join(name)).unwrap();
    }
    let json = ok(d, &config_path, &["users", "add", "demo", "--out", "prov"]);
    let p = Provision::load(&d.join(json.trim())).unwrap();
    let ca_pem = std::fs::read_to_string(&config.ca_cert).unwrap();
    let first = first_der(&std::fs::read_to_string(archive.join("cert1.pem")).unwrap());

    let child = Reap(
        Command::new(taas_bin())
            .args(["serve", "-c", config_path.to_str().unwrap()])
            .current_dir(d)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let log = d.join("taas.log");
    assert!(wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    assert_eq!(served_certificate(port, &ca_pem), first);

    // A pair, and a responder waiting, before the reload.
    let registrar = taas::agent::Registrar::from_provision(&p).unwrap();
    let mut hidden = TcpStream::connect(registrar.register("demo").unwrap()).unwrap();
    hidden
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let q = wait_for_307(&ca_pem, port);
    let mut mobile = TcpStream::connect(("127.0.0.1", q)).unwrap();
    mobile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    mobile.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    hidden.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before");
    let mut waiting = TcpStream::connect(registrar.register("demo").unwrap()).unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // A renewal: new files in archive/, live/ pointed at them, SIGHUP.
    let issued = taas::cert::Ca::load(&config)
        .unwrap()
        .issue(&taas::cert::subject_alt_names(&config), "taas relay")
        .unwrap();
    std::fs::write(archive.join("cert2.pem"), &issued.cert_pem).unwrap();
    std::fs::write(archive.join("key2.pem"), &issued.key_pem).unwrap();
    std::fs::set_permissions(
        archive.join("key2.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    repoint(&live.join("registrar.crt"), &archive.join("cert2.pem"));
    repoint(&live.join("registrar.key"), &archive.join("key2.pem"));
    hup_and_wait(&pid, &log, "re-read; new connections get them", 1);
    let second = first_der(&issued.cert_pem);
    assert_ne!(second, first);
    assert_eq!(served_certificate(port, &ca_pem), second);

    // The pair made before flows both ways.
    mobile.write_all(b"after reload").unwrap();
    let mut buf = [0u8; 12];
    hidden.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after reload");
    hidden.write_all(b"and back").unwrap();
    let mut buf = [0u8; 8];
    mobile.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"and back");
    // The responder that waited through the reload is paired with a new mobile.
    let q = wait_for_307(&ca_pem, port);
    let mut late = TcpStream::connect(("127.0.0.1", q)).unwrap();
    late.write_all(b"late").unwrap();
    let mut buf = [0u8; 4];
    waiting.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"late");

    // A broken file: the log says why, and the certificate loaded before stays.
    std::fs::write(archive.join("cert3.pem"), "not a certificate\n").unwrap();
    repoint(&live.join("registrar.crt"), &archive.join("cert3.pem"));
    let text = hup_and_wait(&pid, &log, "keeping the certificate loaded before", 1);
    let line = text
        .lines()
        .find(|l| l.contains("keeping the certificate"))
        .unwrap();
    assert!(
        line.contains("live/registrar.crt") && line.contains("no certificate in file"),
        "{line}"
    );
    assert_eq!(served_certificate(port, &ca_pem), second);
    // A certificate whose key is not the one configured: refused the same way.
    repoint(&live.join("registrar.crt"), &archive.join("cert1.pem"));
    hup_and_wait(&pid, &log, "keeping the certificate loaded before", 2);
    assert_eq!(served_certificate(port, &ca_pem), second);
    assert!(!text.contains("PRIVATE KEY"), "key material in the log");

    mobile.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    hidden.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
    drop(child);
}

/// The rendezvous port of the first 307 for `demo`, once the relay has put the
/// responder just connected in the pool.
fn wait_for_307(ca_pem: &str, port: u16) -> u16 {
    let mut q = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            q = rendezvous_port(ca_pem, port);
            q.is_some()
        }),
        "no 307 for demo"
    );
    q.unwrap()
}

/// The rendezvous port from a 307 for `demo` of the relay on `port`, if any.
fn rendezvous_port(ca_pem: &str, port: u16) -> Option<u16> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut tls = support::tls_stream(ca_pem, "demo.taas.localhost", tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: demo.taas.localhost\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let r = support::Reply::parse(&out);
    let loc = r.header("location")?;
    loc.rsplit(':').next()?.split('/').next()?.parse().ok()
}
