//! Headless Chromium for tests: Debian's `chromium`, driven by its
//! `chromedriver` over the W3C WebDriver HTTP API with std's `TcpStream` and
//! serde_json (no browser-automation crate). `need_browser` says whether both
//! are there (under CI their absence fails the test); a `Driver` and its
//! `Session` are stopped on drop.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Its WebDriver (Debian package chromium-driver).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// True when Chromium and chromedriver are both there; under CI (`CI` set) a
/// missing one fails the test, elsewhere the test says "skipped" and returns.
pub fn need_browser() -> bool {
    if !super::need_tool(CHROMIUM, "chromium chromium-driver") {
        return false;
    }
    super::need_tool(CHROMEDRIVER, "chromium-driver")
}
/// The key of an element reference in WebDriver answers (W3C WebDriver 12.1).
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Longest wait for the page to show something.
pub const WAIT: Duration = Duration::from_secs(15);

/// A `chromedriver` on a free loopback port, killed on drop.
pub struct Driver {
    /// The process.
    child: Child,
    /// Its address.
    addr: SocketAddr,
    /// Its log, for the panic message.
    log: PathBuf,
}

impl Driver {
    /// Starts one, its log in `dir`, and waits until it is ready.
    pub fn start(dir: &Path) -> Driver {
        Self::start_with(dir, None)
    }

    /// `start`, with `HOME` set to `home` for it and the browsers it starts
    /// (Chromium reads its NSS certificate store from `$HOME/.pki/nssdb`).
    pub fn start_with(dir: &Path, home: Option<&Path>) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("chromedriver.log");
        let mut cmd = Command::new(CHROMEDRIVER);
        if let Some(home) = home {
            cmd.env("HOME", home);
        }
        let child = cmd
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
pub fn http(
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
pub struct Session<'a> {
    /// Its driver.
    driver: &'a Driver,
    /// The session ID.
    id: String,
}

impl<'a> Session<'a> {
    /// A new headless Chromium with its profile in `profile`, downloading to
    /// `downloads`; no flag that turns certificate errors off.
    pub fn new(driver: &'a Driver, profile: &Path, downloads: &Path) -> Session<'a> {
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
    pub fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A WebDriver command; the driver's message on error.
    pub fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.id);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, v) = http(self.driver.addr, method, &path, body.as_ref())?;
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{status} {}", v["value"]))
        }
    }

    /// Navigates to `url` (redirects followed, as a browser does).
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    /// The first element `css` selects (its WebDriver reference).
    pub fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), None);
    }

    /// Clears the field `css` selects and types `text` into it.
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), None);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Runs `script` in the page (a returned promise is awaited).
    pub fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Polls `script` until it returns something truthy; returns that.
    pub fn wait_for(&self, what: &str, script: &str) -> Value {
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
    pub fn create_through_form(&self, label: &str, what: &str, script: &str) -> Value {
        self.type_into("#new-label", label);
        self.click("#create");
        self.wait_for(what, script)
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
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
