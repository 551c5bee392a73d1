//! The quick start in a real headless Chromium (`support::browser`): a fresh
//! NSS store trusts the CA (`certutil`, Debian's `libnss3-tools`), no flag turns
//! certificate errors off, and `https://demo.taas.localhost:PORT/` must follow
//! the relay's 307 and show the hidden plain-HTTP app's page, with TLS ended by
//! `taas expose --tls`; the same browser without the CA in its store shows
//! ERR_CERT_AUTHORITY_INVALID instead. A screenshot goes to
//! `target/browser-quickstart.png`.
//!
//! The files are the quick start's, on the embedded defaults (a `taas.toml`
//! sets only a free port): `taas-data/ca.crt`, and `ID.crt`/`ID.key` beside
//! `ID.json` from `taas users add`.
//!
//! Shortcuts admitted: a build whose relay has no CA yet gets a stand-in
//! (`stand_in_ca`). Outside CI, a missing Chromium, chromedriver or certutil
//! makes the test say "skipped" and return; under CI it fails.
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::browser::{Driver, Session};
use support::{APP_TEXT, PlainApp, Proc, TestCa, taas_bin, wait_until};

const CERTUTIL: &str = "/usr/bin/certutil";

/// A long-running `taas ARGS` in `dir`, its stderr in `log`.
fn spawn(dir: &Path, args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(taas_bin())
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// For a build whose relay has no CA yet: a test CA as `taas-data/ca.crt`,
/// signing the registrar's certificate (in place of the self-signed one) and the
/// label's (`ID.crt`, `ID.key`), and carried in `ID.json` as `server.ca`, as the
/// relay's own CA will be. Delete once `taas users add` writes them.
fn stand_in_ca(d: &Path, provision: &Path) {
    let ca = TestCa::new();
    let data = d.join("taas-data");
    std::fs::write(data.join("ca.crt"), &ca.pem).unwrap();
    let names = taas::cert::subject_alt_names(&taas::Config::default());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (crt, key) = (data.join("registrar.crt"), data.join("registrar.key"));
    std::fs::remove_file(&crt).unwrap();
    std::fs::remove_file(&key).unwrap();
    ca.issue_to(&names, &crt, &key);
    let mut p = taas::provision::Provision::load(provision).unwrap();
    p.server.ca = Some(ca.pem.clone());
    p.write(provision.parent().unwrap()).unwrap();
    ca.issue_to(
        &["demo.taas.localhost"],
        &provision.with_extension("crt"),
        &provision.with_extension("key"),
    );
}

/// `certutil ARGS`, which must succeed.
fn certutil(args: &[&str]) {
    let out = Command::new(CERTUTIL).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "certutil {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn quick_start_in_a_real_browser_with_the_ca_trusted() {
    if !support::browser::need_browser() || !support::need_tool(CERTUTIL, "libnss3-tools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let relay_port = support::free_port();
    let app = PlainApp::start();
    std::fs::write(d.join("taas.toml"), format!("port = {relay_port}\n")).unwrap();
    // The quick start's files, on the embedded defaults.
    let (ok, out, err) = support::taas(d, &["users", "add", "demo", "--out", "prov"]);
    assert!(ok, "{err}");
    let provision = d.join(out.lines().next().unwrap());
    let ca_file = d.join("taas-data/ca.crt");
    if !ca_file.exists() {
        stand_in_ca(d, &provision);
    }
    let _relay = spawn(d, &["serve"], &d.join("serve.log"));
    assert!(wait_until(Duration::from_secs(10), || {
        support::is_listening(relay_port)
    }));
    let to = format!("127.0.0.1:{}", app.port);
    let _agent = spawn(
        d,
        &["expose", provision.to_str().unwrap(), "--to", &to, "--tls"],
        &d.join("expose.log"),
    );
    let url = format!("https://demo.taas.localhost:{relay_port}/");
    // Ready once curl, trusting the same CA, gets the page.
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let (ok, out, err) =
                support::curl(&["-sSL", "--cacert", ca_file.to_str().unwrap(), &url]);
            last = err;
            ok && out.contains(APP_TEXT)
        }),
        "curl never got the page: {last}\nagent log:\n{}",
        std::fs::read_to_string(d.join("expose.log")).unwrap_or_default()
    );

    // Without the CA in its store, Chromium refuses the page: verification is on.
    let bare = d.join("bare-home");
    std::fs::create_dir_all(&bare).unwrap();
    {
        let driver = Driver::start_with(d, Some(&bare));
        let profile = d.join("bare-profile");
        std::fs::create_dir_all(&profile).unwrap();
        let s = Session::new(&driver, &profile, &profile);
        s.goto(&url);
        let text = s.wait_for(
            "the certificate error",
            "return document.body && document.body.innerText.includes('ERR_CERT') && document.body.innerText",
        );
        assert!(
            text.as_str()
                .unwrap()
                .contains("ERR_CERT_AUTHORITY_INVALID"),
            "{text}"
        );
        assert!(!text.as_str().unwrap().contains(APP_TEXT));
    }

    // A fresh NSS store in a fresh HOME, trusting the CA for TLS servers.
    let home = d.join("home");
    let nssdb = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    certutil(&["-d", &db, "-N", "--empty-password"]);
    certutil(&[
        "-d",
        &db,
        "-A",
        "-n",
        "taas",
        "-t",
        "C,,",
        "-i",
        ca_file.to_str().unwrap(),
    ]);
    let profile = d.join("profile");
    let downloads = d.join("downloads");
    std::fs::create_dir_all(&profile).unwrap();
    std::fs::create_dir_all(&downloads).unwrap();
    let driver = Driver::start_with(d, Some(&home));
    let s = Session::new(&driver, &profile, &downloads);
    s.goto(&url);
    let shown = s.wait_for(
        "the hidden app's page",
        "const g = document.getElementById('greeting'); return g && g.textContent",
    );
    assert_eq!(shown, APP_TEXT);
    // The 307 was followed: the page came from the rendezvous port.
    let at = s.url();
    let rest = at
        .strip_prefix("https://demo.taas.localhost:")
        .unwrap_or_else(|| panic!("at {at}"));
    let port: u16 = rest.trim_end_matches('/').parse().unwrap();
    assert_ne!(port, relay_port, "at {at}");
    let png = s.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-quickstart.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, &png).unwrap();
}
