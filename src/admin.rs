//! The accounts web page (`taas admin`): one page served by the binary itself
//! (HTML, CSS and a little JavaScript from `src/admin/`, no CDN, no external
//! script or font) over the relay's own store, so an account made here registers
//! at once on a running `taas serve` (the file store is re-read at each lookup).
//!
//! # Endpoints
//!
//! Plain HTTP on a loopback address (default `127.0.0.1:8893`). Every `/api/`
//! request carries the header `X-Taas-Token: TOKEN`, the per-process random token
//! the page embeds (`<meta name="taas-token">`). Request bodies are JSON
//! (`Content-Type: application/json`, at most `MAX_BODY` bytes); every answer to
//! an `/api/` request is JSON, an error being `{ "error": "what went wrong, in
//! words" }` with a 4xx or 5xx status. An account is shown as
//! `{ "id", "labels": [..], "algorithm", "digits", "step" }`, never with its
//! secret.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /`, `/app.js`, `/app.css` | the page (no token needed: it carries one) |
//! | `GET /api/accounts` | `{ "accounts": [ACCOUNT, ..] }`, ordered by ID |
//! | `POST /api/accounts` `{ "label": L, "id"?: UUID }` | `{ "account": ACCOUNT, "certificate": CERT }`; 409 when the ID exists or another account owns L |
//! | `DELETE /api/accounts/ID` | `{ "deleted": ID }`; 404 when there is none |
//! | `POST /api/accounts/ID/labels` `{ "label": L }` | `{ "account": ACCOUNT }`; 409 when another account owns L |
//! | `DELETE /api/accounts/ID/labels/L` | `{ "account": ACCOUNT }`; 409 for the last label |
//! | `GET /api/accounts/ID/secret` | `{ "id": ID, "base32": SECRET }` |
//! | `GET /api/accounts/ID/provision.json` | the provisioning file `ID.json` (attachment) |
//! | `GET /api/accounts/ID/provision.js` | the legacy `ID.js` (attachment, `text/plain`) |
//! | `GET /api/accounts/ID/qr.svg` | the `otpauth://` URI as a QR code, SVG drawn here |
//! | `POST /api/accounts/ID/certificate` | `{ "certificate": CERT }`: a new label certificate and key |
//!
//! CERT is `{ "names": [LABEL.servers_domain, ..], "cert": PEM, "key": PEM }`,
//! the label certificate the relay's CA issues for every label of the account
//! and its new key (the page offers them as `ID.crt` and `ID.key`); it is
//! `null` when the relay runs without TLS and has no CA. The key is made for
//! this answer and kept nowhere else: a POST, since each one makes a new key.
//!
//! # Safety (docs/PROTOCOL.md section 5: "admin requests need a same-origin token")
//!
//! - The `Host` of every request, the page included, must be the listen address
//!   or `localhost` with its port: a DNS-rebinding page (`evil.example` resolving
//!   to 127.0.0.1) gets 403 and never sees the token. Names other than
//!   `localhost` are refused, so a public admin is reached by its IP address.
//! - Every `/api/` request needs the token, compared in constant time: another
//!   site can make a browser send a request, but cannot read the page to learn
//!   the token, nor set the header on a form or a `<script src>`.
//! - An `Origin` other than the admin's own (`http://HOST`), or a
//!   `Sec-Fetch-Site` other than `same-origin` or `none`, is refused with 403
//!   even with the token; a body that is not JSON is refused with 400.
//! - Answers carry `Content-Security-Policy` (no inline script: the code is
//!   `/app.js`), `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff`,
//!   `Cache-Control: no-store`, `Referrer-Policy: no-referrer` and
//!   `Cross-Origin-Resource-Policy: same-origin`.
//! - `taas admin` refuses a non-loopback address unless `--public` is given.
//!
//! Invariants: one thread per connection with an explicit stack, at most
//! `MAX_ADMIN_CONNS` at once (more are closed unanswered); head and body are read
//! under one deadline (`ADMIN_TIMEOUT`) and size caps (`MAX_ADMIN_HEAD`,
//! `MAX_BODY`); every answer closes the connection; a secret never goes in a log
//! line. Label edits read the record and write it back: when two operators edit
//! the same account at the same instant the last write wins.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::http::{self, DeadlineStream, Head, Response, Serving, WRITE_TIMEOUT};
use crate::label;
use crate::logging::{escape, loggable_target};
use crate::provision::Provision;
use crate::store::{Account, Store};
use crate::sys::{CONN_STACK, random_bytes};

/// `taas admin`'s address when `--listen` is not given (docs/INTERFACE.md).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8893);
/// Connections served at once; more are closed. A browser opens about six per
/// host; one operator never needs more.
pub const MAX_ADMIN_CONNS: usize = 16;
/// One deadline for a request's head and body.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head, in bytes (the relay's `max_head` default).
pub const MAX_ADMIN_HEAD: usize = 8 * 1024;
/// Largest request body, in bytes: `{"label": …, "id": …}` needs under 200.
pub const MAX_BODY: usize = 16 * 1024;
/// Labels one account may hold through this page.
pub const MAX_LABELS: usize = 32;
/// Random bytes in the page's token (256 bits, shown as 64 hex digits).
const TOKEN_BYTES: usize = 32;
/// Bytes of an unread request discarded before closing, so the answer is not
/// lost to a TCP reset.
const LINGER_BYTES: usize = 64 * 1024;
/// How long a closing connection waits for the peer to finish sending.
const LINGER_TIME: Duration = Duration::from_secs(1);
/// Side of the QR code image, in pixels (a phone reads it from a screen).
const QR_SIZE: u32 = 240;

/// The header that carries the token.
pub const TOKEN_HEADER: &str = "X-Taas-Token";
/// The page's Content-Security-Policy: its own files only; images may be `data:`
/// (the QR code is shown from one).
pub const CSP: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'";

const INDEX_HTML: &str = include_str!("admin/index.html");
const APP_JS: &str = include_str!("admin/app.js");
const APP_CSS: &str = include_str!("admin/app.css");

/// State shared by the admin's threads.
struct State {
    /// The relay's configuration (store, certificate, names in provisioning files).
    config: Config,
    /// The accounts: the relay's store.
    store: Store,
    /// The per-process token, hex.
    token: String,
    /// The bound address (the `Host` and `Origin` requests must name).
    addr: SocketAddr,
}

/// A running admin page; dropping it stops accepting.
pub struct Admin {
    /// State shared with the threads.
    state: Arc<State>,
    /// The listener.
    serving: Serving,
}

impl Admin {
    /// Opens the relay's store and serves the page on `addr` (port 0 picks one).
    /// Does not check that `addr` is loopback: `run` does.
    pub fn bind(config: Config, addr: SocketAddr) -> Result<Admin> {
        let store = Store::open(&config.store)?;
        let (listener, addr) = http::bind("the admin page", addr)?;
        let mut bytes = [0u8; TOKEN_BYTES];
        random_bytes(&mut bytes)?;
        let token = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let state = Arc::new(State {
            config,
            store,
            token,
            addr,
        });
        let s = state.clone();
        let serve = move |stream, peer| serve(&s, stream, peer);
        let conn = ("admin-conn", CONN_STACK);
        let serving = Serving::start(listener, addr, MAX_ADMIN_CONNS, conn, serve)?;
        Ok(Admin { state, serving })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.state.addr)
    }

    /// Stops accepting and returns once the accept loop has ended; requests being
    /// served finish within their deadlines.
    pub fn shutdown(&self) {
        self.serving.stop();
    }
}

/// Refuses a non-loopback `addr` unless `public`; warns when it is allowed.
pub fn check_listen(addr: SocketAddr, public: bool) -> Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !public {
        return Err(Error::Usage(format!(
            "refusing to serve the admin page on {addr}, which is not a loopback address: \
             whoever reaches it can read secrets and change accounts; pass --public to do it anyway"
        )));
    }
    log::warn!(
        "--public: the admin page on {addr} is reachable from other hosts, over plain HTTP; \
         anyone who can load it can read secrets and change accounts"
    );
    Ok(())
}

/// `taas admin`: the page until SIGTERM or SIGINT.
pub fn run(config: Config, addr: SocketAddr, public: bool) -> Result<()> {
    check_listen(addr, public)?;
    let admin = Admin::bind(config, addr)?;
    log::info!(
        "taas {} admin page on {} (store {})",
        crate::version(),
        admin.url(),
        admin.state.config.store.describe()
    );
    crate::sys::wait_for_signal(crate::logging::reopen)
        .map_err(|e| Error::io("signal set-up", e))?;
    drop(admin);
    log::info!("stopped");
    Ok(())
}

/// A request: its head, and its body (`Content-Length` bytes, at most
/// `MAX_BODY`).
#[derive(Debug, Default)]
struct Request {
    /// The head; `ONE_EACH` fields appear at most once.
    head: Head,
    /// The body.
    body: Vec<u8>,
}

/// Header fields the page reads, refused when sent twice.
const ONE_EACH: [&str; 5] = [
    "origin",
    "sec-fetch-site",
    "x-taas-token",
    "content-type",
    "content-length",
];

/// An answer that is an error: status and words for the page.
#[derive(Debug)]
struct Failure {
    /// HTTP status.
    status: u16,
    /// What went wrong, for a person.
    message: String,
}

impl Failure {
    fn new(status: u16, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(403, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(e.status(), e.to_string())
    }
}

/// One connection: head and body, the answer, a lingering close.
fn serve(state: &State, tcp: TcpStream, peer: SocketAddr) {
    let io = DeadlineStream {
        inner: tcp,
        deadline: Instant::now() + ADMIN_TIMEOUT,
    };
    let mut io = io;
    let response = match read_request(&mut io) {
        Ok(req) => {
            let response = answer(state, &req).unwrap_or_else(|f| error_response(&f));
            let line = format!(
                "admin {} {} from {peer}: {} {}",
                escape(&req.head.method),
                loggable_target(req.head.path()),
                response.status,
                escape(&response.note)
            );
            if response.status < 400 {
                log::info!("{line}");
            } else {
                log::warn!("{line}");
            }
            response
        }
        // The accept loop's wake-up, or a client that gave up: nothing to answer.
        Err(Error::ClosedEarly) => return,
        Err(e) => {
            let failure = Failure::from(e);
            log::info!("admin from {peer}: {} {}", failure.status, failure.message);
            error_response(&failure)
        }
    };
    io.deadline = Instant::now() + WRITE_TIMEOUT;
    if response.write_to(&mut io).is_ok() {
        linger(io);
    }
}

/// Closes after the answer: ends our side, then discards what the peer still
/// sends (a body we refused unread), so the kernel does not reset the connection
/// before the peer has read the answer.
fn linger(mut io: DeadlineStream) {
    let _ = io.inner.shutdown(Shutdown::Write);
    io.deadline = Instant::now() + LINGER_TIME;
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match io.read(&mut sink) {
            Ok(n) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Reads the head (capped at `MAX_ADMIN_HEAD`) and the body (`Content-Length`,
/// capped at `MAX_BODY`) under the connection's deadline.
fn read_request(r: &mut impl Read) -> Result<Request> {
    let head = http::read_head(r, MAX_ADMIN_HEAD)?;
    let sent = |name: &str| head.fields.iter().filter(|(n, _)| n == name).count();
    if let Some(name) = ONE_EACH.iter().find(|n| sent(n) > 1) {
        return Err(Error::BadRequest(format!("more than one {name} header")));
    }
    if sent("transfer-encoding") > 0 {
        return Err(Error::BadRequest(
            "Transfer-Encoding is not accepted; send Content-Length".into(),
        ));
    }
    let length: usize = match head.field("content-length") {
        Some(n) => n
            .parse()
            .map_err(|_| Error::BadRequest("Content-Length is not a number".into()))?,
        None => 0,
    };
    if length > MAX_BODY {
        return Err(Error::BadRequest(format!(
            "a body of {length} bytes is over the limit of {MAX_BODY}"
        )));
    }
    // What came with the head, then the rest of `Content-Length`.
    let mut body = head.rest.clone();
    body.truncate(length);
    let have = body.len();
    body.resize(length, 0);
    r.read_exact(&mut body[have..])
        .map_err(|e| Error::io("body", e))?;
    Ok(Request { head, body })
}

/// The headers of every answer (see the module doc).
fn secure(mut r: Response) -> Response {
    r.headers.extend([
        ("Content-Security-Policy", CSP.to_string()),
        ("X-Frame-Options", "DENY".to_string()),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("Cache-Control", "no-store".to_string()),
        ("Referrer-Policy", "no-referrer".to_string()),
        ("Cross-Origin-Resource-Policy", "same-origin".to_string()),
    ]);
    r
}

fn body_response(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
    secure(Response::with_body(status, content_type, body))
}

fn json_response(value: &Value) -> Response {
    body_response(200, "application/json", value.to_string().into_bytes())
}

fn error_response(f: &Failure) -> Response {
    let mut r = body_response(
        f.status,
        "application/json",
        json!({ "error": f.message }).to_string().into_bytes(),
    );
    r.note = f.message.clone();
    r
}

/// Checks the request and routes it.
fn answer(state: &State, req: &Request) -> Result<Response, Failure> {
    let host = req.head.host.as_deref().unwrap_or("");
    if !state.host_allowed(host) {
        return Err(Failure::forbidden(format!(
            "Host {:?} is not this admin page's address (http://{}/ or http://localhost:{}/)",
            host.chars().take(100).collect::<String>(),
            state.addr,
            state.addr.port()
        )));
    }
    let Some(api) = req.head.path().strip_prefix("/api/") else {
        return page(state, req);
    };
    if let Some(origin) = req.head.field("origin")
        && !origin.eq_ignore_ascii_case(&format!("http://{host}"))
    {
        return Err(Failure::forbidden(format!(
            "request from another site ({}) refused: only this page may change accounts",
            origin.chars().take(100).collect::<String>()
        )));
    }
    if let Some(site) = req.head.field("sec-fetch-site")
        && site != "same-origin"
        && site != "none"
    {
        return Err(Failure::forbidden(format!(
            "request from another site (Sec-Fetch-Site: {}) refused",
            site.chars().take(40).collect::<String>()
        )));
    }
    let token_ok = req
        .head
        .field("x-taas-token")
        .is_some_and(|t| bool::from(t.as_bytes().ct_eq(state.token.as_bytes())));
    if !token_ok {
        return Err(Failure::forbidden(format!(
            "missing or wrong {TOKEN_HEADER}: reload the admin page (the token changes when taas admin restarts)"
        )));
    }
    let segments: Vec<&str> = api.split('/').collect();
    match (req.head.method.as_str(), segments.as_slice()) {
        ("GET", ["accounts"]) => list(state),
        ("POST", ["accounts"]) => create(state, req),
        (_, ["accounts"]) => Err(not_allowed("GET, POST")),
        ("DELETE", ["accounts", id]) => delete(state, id),
        (_, ["accounts", _]) => Err(not_allowed("DELETE")),
        ("POST", ["accounts", id, "labels"]) => add_label(state, id, req),
        (_, ["accounts", _, "labels"]) => Err(not_allowed("POST")),
        ("DELETE", ["accounts", id, "labels", l]) => remove_label(state, id, l),
        (_, ["accounts", _, "labels", _]) => Err(not_allowed("DELETE")),
        ("GET", ["accounts", id, "secret"]) => secret(state, id),
        ("GET", ["accounts", id, "provision.json"]) => provision(state, id, false),
        ("GET", ["accounts", id, "provision.js"]) => provision(state, id, true),
        ("GET", ["accounts", id, "qr.svg"]) => qr(state, id),
        ("POST", ["accounts", id, "certificate"]) => certificate(state, id),
        (_, ["accounts", _, "certificate"]) => Err(not_allowed("POST")),
        (
            _,
            [
                "accounts",
                _,
                "secret" | "provision.json" | "provision.js" | "qr.svg",
            ],
        ) => Err(not_allowed("GET")),
        _ => Err(Failure::new(
            404,
            format!("no such endpoint: {}", req.head.path()),
        )),
    }
}

fn not_allowed(allow: &'static str) -> Failure {
    Failure::new(405, format!("method not allowed here; use {allow}"))
}

impl State {
    /// Is `host` (a `Host` header) this listener: `localhost` or the bound IP
    /// (any IP literal when bound to all addresses), with the bound port?
    fn host_allowed(&self, host: &str) -> bool {
        let (name, port) = if let Some(rest) = host.strip_prefix('[') {
            match rest.split_once(']') {
                Some((name, tail)) => (name, tail.strip_prefix(':')),
                None => return false,
            }
        } else {
            match host.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (host, None),
            }
        };
        let port_ok = match port {
            Some(p) => p.parse::<u16>().ok() == Some(self.addr.port()),
            None => self.addr.port() == 80,
        };
        let bound = self.addr.ip();
        let name_ok = if name.eq_ignore_ascii_case("localhost") {
            bound.is_loopback() || bound.is_unspecified()
        } else {
            name.parse::<IpAddr>()
                .is_ok_and(|ip| ip == bound || bound.is_unspecified())
        };
        port_ok && name_ok
    }

    /// The account `id` (checked to be a plain path segment), or 404.
    fn account(&self, id: &str) -> Result<Account, Failure> {
        let plain = !id.is_empty()
            && id.len() <= 100
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !plain {
            return Err(Error::BadId(id.chars().take(80).collect()).into());
        }
        self.store
            .get(id)?
            .ok_or_else(|| Error::NoSuchAccount(id.to_string()).into())
    }
}

/// The static files; the page gets the token and the relay's names.
fn page(state: &State, req: &Request) -> Result<Response, Failure> {
    let (content_type, body) = match req.head.path() {
        "/" | "/index.html" => {
            let c = &state.config;
            let html = INDEX_HTML
                .replace("{{TOKEN}}", &state.token)
                .replace("{{STORE}}", &escape_html(&c.store.describe()))
                .replace(
                    "{{RELAY}}",
                    &escape_html(&format!("{}://{}", c.scheme(), c.public_addr(c.port))),
                )
                .replace("{{REGISTRAR}}", &escape_html(&c.registrar_name))
                .replace("{{VERSION}}", &escape_html(crate::version()));
            ("text/html; charset=utf-8", html)
        }
        "/app.js" => ("text/javascript; charset=utf-8", APP_JS.to_string()),
        "/app.css" => ("text/css; charset=utf-8", APP_CSS.to_string()),
        _ => {
            return Err(Failure::new(
                404,
                format!("no such page: {}", req.head.path()),
            ));
        }
    };
    if req.head.method != "GET" {
        return Err(not_allowed("GET"));
    }
    Ok(body_response(200, content_type, body.into_bytes()))
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// An account as the page shows it: everything but the secret.
fn summary(a: &Account) -> Value {
    let p = &a.auth_params;
    json!({
        "id": a.uuid,
        "labels": a.labels,
        "algorithm": p.algorithm.as_deref().unwrap_or("sha1"),
        "digits": p.digits.unwrap_or(6),
        "step": p.step.unwrap_or(30),
    })
}

/// The JSON body of a POST.
fn json_body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Failure> {
    let json = req
        .head
        .field("content-type")
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(Failure::new(
            400,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Failure::new(400, format!("the body is not the JSON expected: {e}")))
}

fn list(state: &State) -> Result<Response, Failure> {
    let accounts: Vec<Value> = state.store.list()?.iter().map(summary).collect();
    let mut r = json_response(&json!({ "accounts": accounts }));
    r.note = format!("{} accounts", accounts.len());
    Ok(r)
}

/// `POST /api/accounts`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    /// The first label.
    label: String,
    /// A UUID to use instead of a new one; empty means none.
    #[serde(default)]
    id: Option<String>,
}

/// `POST /api/accounts/ID/labels`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLabel {
    /// The label to add.
    label: String,
}

/// Creates an account as `taas users add` does: the CA and the registrar's
/// certificate first (the provisioning file carries them), the label
/// certificate, then the record.
fn create(state: &State, req: &Request) -> Result<Response, Failure> {
    let body: NewAccount = json_body(req)?;
    let id = body.id.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let account = Account::new(id, &[body.label.trim().to_string()])?;
    state.config.check_account(&account)?;
    let made = crate::cert::ensure_default(&state.config)?;
    if made.any() {
        log::info!("made {}", made.describe(&state.config));
    }
    // Built before the insert, so a failure leaves no account without its files.
    Provision::new(&account, &state.config)?;
    let issued = if crate::cert::issues_label_certs(&state.config) {
        Some(crate::cert::issue_label_cert(&state.config, &account)?)
    } else {
        None
    };
    state.store.insert(&account)?;
    let mut r = json_response(&json!({
        "account": summary(&account),
        "certificate": issued.as_ref().map(certificate_json),
    }));
    r.note = format!(
        "created account {} owning {}",
        account.uuid, account.labels[0]
    );
    Ok(r)
}

fn delete(state: &State, id: &str) -> Result<Response, Failure> {
    let account = state.account(id)?;
    state.store.remove(&account.uuid)?;
    let mut r = json_response(&json!({ "deleted": account.uuid }));
    r.note = format!("deleted account {}", account.uuid);
    Ok(r)
}

fn add_label(state: &State, id: &str, req: &Request) -> Result<Response, Failure> {
    let body: NewLabel = json_body(req)?;
    let entry = label::Entry::parse(body.label.trim())?;
    state.config.check_entry(&entry)?;
    let l = entry.stored();
    let mut account = state.account(id)?;
    if account.owns(&entry.name) {
        return Err(Failure::new(
            409,
            format!("account {} already has label {l:?}", account.uuid),
        ));
    }
    if account.labels.len() >= MAX_LABELS {
        return Err(Failure::new(
            400,
            format!("an account may hold at most {MAX_LABELS} labels here"),
        ));
    }
    account.labels.push(l.clone());
    state.store.update(&account)?;
    let mut r = json_response(&json!({ "account": summary(&account) }));
    r.note = format!("account {} now owns {l}", account.uuid);
    Ok(r)
}

fn remove_label(state: &State, id: &str, l: &str) -> Result<Response, Failure> {
    let l = label::validate(l)?;
    let mut account = state.account(id)?;
    if !account.owns(&l) {
        return Err(Failure::new(
            404,
            format!("account {} has no label {l:?}", account.uuid),
        ));
    }
    if account.labels.len() == 1 {
        return Err(Failure::new(
            409,
            format!(
                "{l:?} is the last label of account {}: delete the account instead",
                account.uuid
            ),
        ));
    }
    // As `owns` reads an entry: the label part, even of a malformed `cam:abc`.
    account.labels.retain(|x| {
        !x.split_once(':')
            .map_or(x.as_str(), |(name, _)| name)
            .eq_ignore_ascii_case(&l)
    });
    state.store.update(&account)?;
    let mut r = json_response(&json!({ "account": summary(&account) }));
    r.note = format!("account {} no longer owns {l}", account.uuid);
    Ok(r)
}

fn secret(state: &State, id: &str) -> Result<Response, Failure> {
    let account = state.account(id)?;
    let mut r = json_response(&json!({
        "id": account.uuid,
        "base32": account.auth_params.base32,
    }));
    r.note = "secret revealed".into();
    Ok(r)
}

/// `ID.json`, or the legacy `ID.js`, as `Provision::write` makes them.
fn provision(state: &State, id: &str, legacy: bool) -> Result<Response, Failure> {
    let account = state.account(id)?;
    let p = Provision::new(&account, &state.config)?;
    let json = serde_json::to_string_pretty(&p).map_err(|e| Failure::new(500, e.to_string()))?;
    let (content_type, name, body) = if legacy {
        (
            // Not a script type: with nosniff no page can run it as one.
            "text/plain; charset=utf-8",
            format!("{}.js", p.id()),
            format!("exports.params = {json};\n"),
        )
    } else {
        ("application/json", format!("{}.json", p.id()), json + "\n")
    };
    let mut r = body_response(200, content_type, body.into_bytes());
    r.headers.push((
        "Content-Disposition",
        format!("attachment; filename=\"{name}\""),
    ));
    r.note = format!("provisioning file {name}");
    Ok(r)
}

/// CERT of the module doc (the key included: the answer is `no-store`).
fn certificate_json(issued: &crate::cert::Issued) -> Value {
    json!({
        "names": issued.names,
        "cert": issued.cert_pem,
        "key": issued.key_pem,
    })
}

/// `POST /api/accounts/ID/certificate`: a new label certificate and key from the
/// relay's CA.
fn certificate(state: &State, id: &str) -> Result<Response, Failure> {
    let account = state.account(id)?;
    let issued = crate::cert::issue_label_cert(&state.config, &account)?;
    let mut r = json_response(&json!({ "certificate": certificate_json(&issued) }));
    r.note = format!(
        "label certificate for {} issued to account {}",
        issued.names.join(","),
        account.uuid
    );
    Ok(r)
}

/// The `otpauth://` URI as an SVG QR code, drawn here (the original sent the
/// secret to a third-party chart service).
fn qr(state: &State, id: &str) -> Result<Response, Failure> {
    let account = state.account(id)?;
    let p = Provision::new(&account, &state.config)?;
    let svg = qr_svg(&p.otpauth_uri()).map_err(|e| Failure::new(500, e))?;
    let mut r = body_response(200, "image/svg+xml", svg.into_bytes());
    r.note = "QR code".into();
    Ok(r)
}

/// `text` as a QR code (error correction M), SVG of at least `QR_SIZE` pixels.
pub fn qr_svg(text: &str) -> std::result::Result<String, String> {
    let code = qrcode::QrCode::new(text.as_bytes()).map_err(|e| format!("QR code: {e}"))?;
    Ok(code
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(QR_SIZE, QR_SIZE)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn state(addr: &str) -> State {
        State {
            config: Config::default(),
            store: Store::File(crate::store::FileStore::new(std::path::Path::new(
                "/nonexistent/accounts.json",
            ))),
            token: "t".into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn host_must_be_this_listener() {
        let s = state("127.0.0.1:8893");
        for ok in ["127.0.0.1:8893", "localhost:8893", "LOCALHOST:8893"] {
            assert!(s.host_allowed(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:8894",
            "127.0.0.2:8893",
            "evil.example:8893",
            "localhost.evil.example:8893",
            "[::1]:8893",
            "127.0.0.1:8893:8893",
        ] {
            assert!(!s.host_allowed(bad), "{bad}");
        }
        let s = state("[::1]:8893");
        assert!(s.host_allowed("[::1]:8893"));
        assert!(s.host_allowed("localhost:8893"));
        assert!(!s.host_allowed("[::1]"));
        // Bound to every address: any IP literal, never a name but localhost.
        let s = state("0.0.0.0:80");
        assert!(s.host_allowed("192.0.2.7"));
        assert!(s.host_allowed("192.0.2.7:80"));
        assert!(!s.host_allowed("admin.example"));
    }

    #[test]
    fn non_loopback_needs_public() {
        assert!(check_listen(DEFAULT_LISTEN, false).is_ok());
        assert!(check_listen("[::1]:1".parse().unwrap(), false).is_ok());
        let e = check_listen("0.0.0.0:8893".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--public"));
        assert!(check_listen("0.0.0.0:8893".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn request_reader_keeps_the_body_and_refuses_excess() {
        let raw = b"POST /api/accounts HTTP/1.1\r\nHost: h\r\nOrigin: http://h\r\nX-Taas-Token: t\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"label\":\"demo\"}";
        let mut r = BufReader::new(&raw[..]);
        let req = read_request(&mut r).unwrap();
        assert_eq!(req.body, b"{\"label\":\"demo\"}");
        assert_eq!(req.head.field("origin"), Some("http://h"));
        assert_eq!(req.head.field("x-taas-token"), Some("t"));
        let big = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(
            read_request(&mut BufReader::new(big.as_bytes())),
            Err(Error::BadRequest(_))
        ));
        let dup = b"GET / HTTP/1.1\r\nHost: h\r\nX-Taas-Token: a\r\nX-Taas-Token: b\r\n\r\n";
        assert!(read_request(&mut BufReader::new(&dup[..])).is_err());
        let chunked = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(read_request(&mut BufReader::new(&chunked[..])).is_err());
        let short = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc";
        assert!(read_request(&mut BufReader::new(&short[..])).is_err());
    }

    #[test]
    fn qr_code_is_svg() {
        let svg = qr_svg("otpauth://totp/x:y?secret=JBSWY3DPEHPK3PXP").unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("<svg") && svg.contains("<path"));
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
    }
}
