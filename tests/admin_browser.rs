//! The admin page in a real headless Chromium (Debian's `chromium`, driven by its
//! `chromedriver` over the W3C WebDriver HTTP API with std's `TcpStream` and
//! serde_json: no browser-automation crate). It creates an account through the
//! form, sees it listed, reveals its secret, reads its provisioning file through
//! the page, sees the page's error words, deletes it through the confirm dialog,
//! and writes a screenshot to `target/admin-page.png`. Then a page on another
//! origin auto-submits a form to the admin, and the store is unchanged.
//!
//! Shortcut admitted: when `/usr/bin/chromium` is absent the test says so and
//! returns (`.ci/run` installs `chromium` and `chromium-driver`).

mod support;

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taas::Config;
use taas::admin::Admin;
use taas::store::Store;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key of an element reference in WebDriver answers (W3C WebDriver 12.1).
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for the page to show something.
const WAIT: Duration = Duration::from_secs(15);

/// A `chromedriver` on a free loopback port, killed on drop.
struct Driver {
    /// The process.
    child: Child,
    /// Its address.
    addr: SocketAddr,
    /// Its log, for the panic message.
    log: PathBuf,
}

impl Driver {
    fn start(dir: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) must be installed");
        let driver = Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let end = Instant::now() + WAIT;
        loop {
            if let Ok((200, v)) = http(driver.addr, "GET", "/status", None)
                && v["value"]["ready"] == true
            {
                return driver;
            }
            assert!(Instant::now() < end, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Ok(text) = std::fs::read_to_string(&self.log)
        {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("chromedriver log, last lines:");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
}

/// One HTTP/1.1 exchange; returns status and JSON body. The answer is read by
/// its `Content-Length` or chunks: chromedriver keeps connections open.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let body = body.map_or_else(String::new, Value::to_string);
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .map_err(|e| e.to_string())?;
    let mut r = std::io::BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed in the head".into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let mut payload = Vec::new();
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| e.to_string())?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|e| e.to_string())?;
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            if size == 0 {
                break;
            }
            payload.extend_from_slice(&chunk[..size]);
        }
    } else {
        let n: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        payload.resize(n, 0);
        r.read_exact(&mut payload).map_err(|e| e.to_string())?;
    }
    let value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    Ok((status, value))
}

/// A browser session; deleting it (on drop) quits the browser.
struct Session<'a> {
    /// Its driver.
    driver: &'a Driver,
    /// The session ID.
    id: String,
}

impl<'a> Session<'a> {
    fn new(driver: &'a Driver, profile: &Path, downloads: &Path) -> Session<'a> {
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,1300".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let (status, v) = http(driver.addr, "POST", "/session", Some(&caps)).unwrap();
        assert_eq!(status, 200, "new session: {v}");
        Session {
            driver,
            id: v["value"]["sessionId"].as_str().unwrap().to_string(),
        }
    }

    /// A WebDriver command; panics with the driver's message on error.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.id);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, v) = http(self.driver.addr, method, &path, body.as_ref())?;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{status} {}", v["value"]))
        }
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), None);
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), None);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Runs `script` in the page (a returned promise is awaited).
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Polls `script` until it returns something truthy; returns that.
    fn wait_for(&self, what: &str, script: &str) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let v = self.js(script);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Submits `label` through the create form, then waits for `script` as in `wait_for`.
    fn create_through_form(&self, label: &str, what: &str, script: &str) -> Value {
        self.type_into("#new-label", label);
        self.click("#create");
        self.wait_for(what, script)
    }

    fn screenshot(&self) -> Vec<u8> {
        let b64 = self.cmd("GET", "/screenshot", None);
        data_encoding::BASE64
            .decode(b64.as_str().unwrap().as_bytes())
            .unwrap()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.id);
        let _ = http(self.driver.addr, "DELETE", &path, None);
    }
}

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
    if !support::need_tool(CHROMIUM, "chromium chromium-driver") {
        return;
    }
    assert!(
        Path::new(CHROMEDRIVER).exists(),
        "{CHROMIUM} is there but {CHROMEDRIVER} is not: apt-get install chromium-driver"
    );
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
