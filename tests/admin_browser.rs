//! The admin page in a real headless Chromium (`support::browser`: Debian's
//! `chromium`, driven by its `chromedriver` over the W3C WebDriver HTTP API). It
//! creates an account through the form, sees it listed, reveals its secret, reads its provisioning file through
//! the page, sees the page's error words, deletes it through the confirm dialog,
//! and writes a screenshot to `target/admin-page.png`. Then a page on another
//! origin auto-submits a form to the admin, and the store is unchanged.
//!
//! Shortcut admitted: outside CI, when Chromium or chromedriver is absent the
//! test says "skipped" and returns (`.ci/run` installs `chromium` and
//! `chromium-driver`; under CI their absence fails it).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::browser::{Driver, Session, WAIT};
use taas::Config;
use taas::admin::Admin;
use taas::store::Store;

/// A page on another origin whose form posts itself to the admin at once.
struct EvilSite {
    /// Where it listens.
    addr: SocketAddr,
    /// Set to stop it.
    stop: Arc<AtomicBool>,
}

impl EvilSite {
    fn start(admin: SocketAddr) -> EvilSite {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let html = format!(
            "<!doctype html><title>another site</title>\
             <form id=f method=post action=\"http://{admin}/api/accounts\">\
             <input name=label value=evil></form>\
             <script>document.getElementById('f').submit()</script>"
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let root = head.starts_with(b"GET / ");
                let (status, body) = if root {
                    ("200 OK", html.as_str())
                } else {
                    ("404 Not Found", "")
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        EvilSite { addr, stop }
    }
}

impl Drop for EvilSite {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

#[test]
fn the_page_in_a_real_browser() {
    if !support::browser::need_browser() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let config = Config::from_toml(
        &format!(
            "store = \"file:{d}/accounts.json\"\ncert = \"{d}/registrar.crt\"\nkey = \"{d}/registrar.key\"\nca_cert = \"{d}/ca.crt\"\nca_key = \"{d}/ca.key\"\n"
        ),
        "test",
    )
    .unwrap();
    taas::cert::write_new(&config).unwrap();
    let config_ca = config.ca_cert.clone();
    let store = Store::open(&config.store).unwrap();
    let admin = Admin::bind(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let profile = dir.path().join("profile");
    std::fs::create_dir(&profile).unwrap();
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).unwrap();
    let driver = Driver::start(dir.path());
    let s = Session::new(&driver, &profile, &downloads);

    // The page loads, runs its script (CSP allows /app.js) and lists nothing.
    s.goto(&admin.url());
    s.wait_for(
        "the empty list",
        "return !document.getElementById('empty').hidden",
    );
    assert_eq!(s.js("return document.title"), "taas accounts");

    // Create an account through the form.
    s.create_through_form(
        "browser-demo",
        "the new row",
        "return document.querySelectorAll('#accounts tbody tr').length === 1",
    );
    let accounts = store.list().unwrap();
    assert_eq!(accounts.len(), 1);
    let account = &accounts[0];
    assert_eq!(account.labels, ["browser-demo"]);
    let id = account.uuid.as_str();
    let row = s.js("return document.querySelector('#accounts tbody tr').innerText");
    let row = row.as_str().unwrap();
    assert!(row.contains(id) && row.contains("browser-demo") && row.contains("sha1"));
    assert!(!row.contains(&account.auth_params.base32), "secret hidden");

    // The provisioning panel opens with the QR code and the file.
    s.wait_for(
        "the provisioning panel",
        &format!(
            "return !document.getElementById('provision').hidden && \
             document.getElementById('prov-id').textContent === '{id}' && \
             document.getElementById('prov-qr').complete && \
             document.getElementById('prov-qr').naturalWidth >= 200"
        ),
    );
    let qr = s.js("return document.getElementById('prov-qr').src");
    assert!(qr.as_str().unwrap().starts_with("data:image/svg+xml"));
    s.click("#show-file");
    let shown = s.js("return document.getElementById('prov-file').innerText");
    let file: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!(file["uuid"], json!([id]));
    assert_eq!(file["labels"], json!(["browser-demo"]));
    assert_eq!(file["base32"], account.auth_params.base32.as_str());
    assert!(
        file["server"]["ca"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    // The download links save the same file (the browser writes to `downloads`).
    for (link, name) in [
        ("#dl-json", format!("{id}.json")),
        ("#dl-js", format!("{id}.js")),
    ] {
        s.click(link);
        let saved = downloads.join(&name);
        let end = Instant::now() + WAIT;
        while !saved.exists() {
            assert!(Instant::now() < end, "{name} was not downloaded");
            std::thread::sleep(Duration::from_millis(50));
        }
        let p = taas::provision::Provision::load(&saved).unwrap();
        assert_eq!(p.id(), id);
        assert_eq!(p.base32, account.auth_params.base32);
    }
    // The label certificate and key the creation answer carried, as ID.crt and
    // ID.key: the relay's CA signed the certificate for the label's name.
    let names = s.js("return document.getElementById('cert-names').textContent");
    assert_eq!(names, "browser-demo.taas.localhost");
    for (link, name, begins) in [
        (
            "#dl-crt",
            format!("{id}.crt"),
            "-----BEGIN CERTIFICATE-----",
        ),
        (
            "#dl-key",
            format!("{id}.key"),
            "-----BEGIN PRIVATE KEY-----",
        ),
    ] {
        s.click(link);
        let saved = downloads.join(&name);
        let end = Instant::now() + WAIT;
        while !saved.exists() || std::fs::metadata(&saved).unwrap().len() == 0 {
            assert!(Instant::now() < end, "{name} was not downloaded");
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&saved).unwrap();
        assert!(text.starts_with(begins), "{name}: {text}");
    }
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&config_ca)
        .arg(downloads.join(format!("{id}.crt")))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // And the page's own fetch, with the token it embeds, gets it too.
    let fetched = s.js(&format!(
        "const t = document.querySelector('meta[name=\"taas-token\"]').content; \
         return fetch('/api/accounts/{id}/provision.json', {{ headers: {{ 'X-Taas-Token': t }} }}) \
           .then(r => r.json())"
    ));
    assert_eq!(fetched, file);
    let without = s.js(&format!(
        "return fetch('/api/accounts/{id}/provision.json').then(r => r.status)"
    ));
    assert_eq!(without, 403);

    // Reveal the secret on click.
    s.click("#accounts tbody tr button.reveal");
    let secret = s.wait_for(
        "the secret",
        "const c = document.querySelector('#accounts code.secret'); return !c.hidden && c.textContent",
    );
    assert_eq!(secret, account.auth_params.base32.as_str());

    // Add a label in the row; a taken label is refused in words next to the form.
    s.type_into("#accounts tbody tr form.add-label input", "second");
    s.click("#accounts tbody tr form.add-label button");
    s.wait_for(
        "the second label",
        "return document.querySelectorAll('#accounts .chip').length === 2",
    );
    assert_eq!(
        store.get(id).unwrap().unwrap().labels,
        ["browser-demo", "second"]
    );
    let error = s.create_through_form(
        "second",
        "the create error",
        "const e = document.getElementById('create-error'); return !e.hidden && e.textContent",
    );
    let error = error.as_str().unwrap();
    assert!(error.contains("already owned by account"), "{error}");
    s.create_through_form(
        "Bad_Label",
        "the bad label error",
        "return document.getElementById('create-error').textContent.includes('a-z 0-9')",
    );
    assert_eq!(store.list().unwrap().len(), 1);

    // The picture: form with its error, provisioning panel, the list.
    s.click("#show-file");
    s.js("window.scrollTo(0, 0)");
    let png = s.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, &png).unwrap();

    // Delete through the confirm dialog.
    s.click("#accounts tbody tr button.delete");
    let end = Instant::now() + WAIT;
    let text = loop {
        match s.try_cmd("GET", "/alert/text", None) {
            Ok(t) => break t,
            Err(e) => assert!(Instant::now() < end, "no confirm dialog: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(text.as_str().unwrap().contains(id), "{text}");
    s.cmd("POST", "/alert/accept", None);
    s.wait_for(
        "the empty list again",
        "return !document.getElementById('empty').hidden && document.getElementById('provision').hidden",
    );
    assert!(store.list().unwrap().is_empty());

    // Another origin's page auto-submits a form to the admin: refused.
    let evil = EvilSite::start(admin.local_addr());
    s.goto(&format!("http://{}/", evil.addr));
    let target = format!("{}api/accounts", admin.url());
    let end = Instant::now() + WAIT;
    while s.url() != target {
        assert!(
            Instant::now() < end,
            "the form never posted: at {}",
            s.url()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = s.wait_for(
        "the refusal",
        "return document.body && document.body.innerText",
    );
    assert!(body.as_str().unwrap().contains("another site"), "{body}");
    assert!(store.list().unwrap().is_empty(), "no account from the form");
}
