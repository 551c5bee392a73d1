//! The admin page's endpoints over real loopback HTTP: accounts made, listed,
//! relabelled and deleted; secrets only with the token; the 403s of the
//! cross-site rules (no token, foreign `Origin`, foreign `Host`, a form post from
//! another site); the size and connection limits; and an account made here
//! registering at once on a relay that shares the store.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Reply, TestRelay, free_port, taas_bin};
use taas::Config;
use taas::admin::{Admin, CSP, MAX_ADMIN_CONNS, MAX_BODY, MAX_LABELS};
use taas::provision::Provision;
use taas::store::Store;

/// An admin page on port 0 over a file store in a temporary directory.
struct Page {
    /// Config, certificate and accounts live here.
    dir: tempfile::TempDir,
    /// The config both the page and the tests' store use.
    config: Config,
    /// The running page.
    admin: Admin,
    /// The token the page embeds.
    token: String,
}

impl Page {
    fn start() -> Page {
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
        Page::on(dir, config)
    }

    fn on(dir: tempfile::TempDir, config: Config) -> Page {
        let admin = Admin::bind(config.clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = admin.local_addr();
        let page = send(addr, b"GET / HTTP/1.1\r\nHost: HOST\r\n\r\n", addr);
        assert_eq!(page.status, 200, "{}", page.body);
        let token = token_of(&page.body);
        Page {
            dir,
            config,
            admin,
            token,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    fn store(&self) -> Store {
        Store::open(&self.config.store).unwrap()
    }

    /// A request with the page's own Host; `headers` are extra lines.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &str) -> Reply {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: HOST\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.push_str(body);
        send(self.addr(), head.as_bytes(), self.addr())
    }

    /// What the page's JavaScript sends: the token, the own Origin, JSON.
    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = format!("X-Taas-Token: {}", self.token);
        let origin = format!("Origin: http://{}", self.addr());
        let mut headers = vec![token.as_str(), origin.as_str()];
        let body = body.map_or_else(String::new, |b| b.to_string());
        if !body.is_empty() {
            headers.push("Content-Type: application/json");
        }
        let r = self.request(method, path, &headers, &body);
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}: {r:?}"
        );
        (r.status, serde_json::from_str(&r.body).unwrap())
    }

    /// A GET carrying the page's token and nothing else.
    fn get_with_token(&self, path: &str) -> Reply {
        let token = format!("X-Taas-Token: {}", self.token);
        self.request("GET", path, &[&token], "")
    }

    fn create(&self, label: &str) -> String {
        let (status, v) = self.api("POST", "/api/accounts", Some(json!({ "label": label })));
        assert_eq!(status, 200, "{v}");
        v["account"]["id"].as_str().unwrap().to_string()
    }

    fn count(&self) -> usize {
        self.store().list().unwrap().len()
    }
}

/// Sends raw bytes (with `HOST` replaced by `host`) and reads the whole answer.
fn send(addr: SocketAddr, bytes: &[u8], host: SocketAddr) -> Reply {
    let text = String::from_utf8_lossy(bytes).replacen("HOST", &host.to_string(), 1);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Reply::parse(&out)
}

/// The token in the page's `<meta name="taas-token">`.
fn token_of(html: &str) -> String {
    let at = html.find("name=\"taas-token\" content=\"").unwrap();
    let rest = &html[at + "name=\"taas-token\" content=\"".len()..];
    let token = rest.split('"').next().unwrap().to_string();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    token
}

#[test]
fn the_page_carries_a_token_and_safety_headers() {
    let p = Page::start();
    let r = p.request("GET", "/", &[], "");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(r.header("content-security-policy"), Some(CSP));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.body.contains("<script src=\"/app.js\""));
    assert_eq!(r.body.matches("<script").count(), 1, "no inline script");
    // No external resource: every src and href is one of the page's own paths.
    for attr in ["src=\"", "href=\""] {
        for (at, _) in r.body.match_indices(attr) {
            assert!(r.body[at + attr.len()..].starts_with('/'), "{attr} at {at}");
        }
    }
    // A second admin has another token.
    let q = Page::start();
    assert_ne!(p.token, q.token);
    for (path, kind) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let r = p.request("GET", path, &[], "");
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(kind));
        assert_eq!(r.header("content-security-policy"), Some(CSP));
    }
    assert_eq!(p.request("GET", "/nope", &[], "").status, 404);
    assert_eq!(p.request("POST", "/", &[], "").status, 405);
}

#[test]
fn create_list_relabel_and_delete() {
    let p = Page::start();
    let (status, v) = p.api("GET", "/api/accounts", None);
    assert_eq!((status, v), (200, json!({ "accounts": [] })));

    let id = p.create("Demo");
    let stored = p.store().get(&id).unwrap().unwrap();
    assert_eq!(stored.labels, ["demo"]);
    let (status, v) = p.api("GET", "/api/accounts", None);
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({ "accounts": [{ "id": id, "labels": ["demo"], "algorithm": "sha1", "digits": 6, "step": 30 }] })
    );
    assert!(!v.to_string().contains(&stored.auth_params.base32));

    let labels = format!("/api/accounts/{id}/labels");
    let (status, v) = p.api("POST", &labels, Some(json!({ "label": "extra" })));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["account"]["labels"], json!(["demo", "extra"]));
    let (status, v) = p.api("POST", &labels, Some(json!({ "label": "EXTRA" })));
    assert_eq!(status, 409);
    assert!(v["error"].as_str().unwrap().contains("already has label"));
    let (status, v) = p.api("POST", &labels, Some(json!({ "label": "-bad" })));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("a-z 0-9"), "{v}");

    let (status, v) = p.api("DELETE", &format!("{labels}/extra"), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["account"]["labels"], json!(["demo"]));
    assert_eq!(p.store().get(&id).unwrap().unwrap().labels, ["demo"]);
    let (status, v) = p.api("DELETE", &format!("{labels}/extra"), None);
    assert_eq!(status, 404, "{v}");
    let (status, v) = p.api("DELETE", &format!("{labels}/demo"), None);
    assert_eq!(status, 409);
    assert!(v["error"].as_str().unwrap().contains("delete the account"));

    let (status, v) = p.api("DELETE", &format!("/api/accounts/{id}"), None);
    assert_eq!((status, v), (200, json!({ "deleted": id })));
    assert_eq!(p.count(), 0);
    let (status, v) = p.api("DELETE", &format!("/api/accounts/{id}"), None);
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("no account"));
    let (status, _) = p.api("PUT", "/api/accounts", None);
    assert_eq!(status, 405);
}

#[test]
fn given_ids_and_labels_are_checked() {
    let p = Page::start();
    let uuid = "3b4cdb26-6a2c-4b8b-93e4-d8c3c0a1c7a1";
    let (status, v) = p.api(
        "POST",
        "/api/accounts",
        Some(json!({ "label": "one", "id": uuid.to_uppercase() })),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["account"]["id"], uuid);
    let (status, v) = p.api(
        "POST",
        "/api/accounts",
        Some(json!({ "label": "two", "id": uuid })),
    );
    assert_eq!(status, 409);
    assert!(v["error"].as_str().unwrap().contains("exists already"));
    let (status, v) = p.api(
        "POST",
        "/api/accounts",
        Some(json!({ "label": "two", "id": "nope" })),
    );
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("UUID"));
    let (status, v) = p.api("POST", "/api/accounts", Some(json!({ "label": "" })));
    assert_eq!(status, 400, "{v}");
    let (status, v) = p.api("POST", "/api/accounts", Some(json!({ "nolabel": 1 })));
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("JSON"));
    let (status, _) = p.api("GET", "/api/accounts/not%20an%20id/secret", None);
    assert_eq!(status, 400);
    assert_eq!(p.count(), 1);
}

#[test]
fn a_label_owned_by_another_account_is_refused() {
    let p = Page::start();
    let a = p.create("demo");
    let (status, v) = p.api("POST", "/api/accounts", Some(json!({ "label": "demo" })));
    assert_eq!(status, 409);
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("already owned") && msg.contains(&a), "{msg}");
    let b = p.create("other");
    let (status, v) = p.api(
        "POST",
        &format!("/api/accounts/{b}/labels"),
        Some(json!({ "label": "Demo" })),
    );
    assert_eq!(status, 409);
    assert!(v["error"].as_str().unwrap().contains("already owned"));
    assert_eq!(p.store().get(&b).unwrap().unwrap().labels, ["other"]);
    assert_eq!(p.count(), 2);
}

#[test]
fn secret_and_provisioning_need_the_token() {
    let p = Page::start();
    let id = p.create("demo");
    let base32 = p.store().get(&id).unwrap().unwrap().auth_params.base32;
    for what in ["secret", "provision.json", "provision.js", "qr.svg"] {
        let path = format!("/api/accounts/{id}/{what}");
        let r = p.request("GET", &path, &[], "");
        assert_eq!(r.status, 403, "{what} without token");
        assert!(r.body.contains("X-Taas-Token"), "{}", r.body);
        assert!(!r.body.contains(&base32));
        let wrong = format!("X-Taas-Token: {}", "0".repeat(64));
        let r = p.request("GET", &path, &[&wrong], "");
        assert_eq!(r.status, 403, "{what} with a wrong token");
        let short = format!("X-Taas-Token: {}", &p.token[..63]);
        assert_eq!(p.request("GET", &path, &[&short], "").status, 403);
    }
    let (status, v) = p.api("GET", &format!("/api/accounts/{id}/secret"), None);
    assert_eq!(status, 200);
    assert_eq!(v["base32"], base32);

    let r = p.get_with_token(&format!("/api/accounts/{id}/provision.json"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition").unwrap(),
        format!("attachment; filename=\"{id}.json\"")
    );
    let file = p.dir.path().join(format!("{id}.json"));
    std::fs::write(&file, &r.body).unwrap();
    let prov = Provision::load(&file).unwrap();
    assert_eq!(prov.id(), id);
    assert_eq!(prov.base32, base32);
    assert_eq!(prov.labels, ["demo"]);
    // server.ca: the relay's CA, which signed the registrar's certificate.
    assert_eq!(
        prov.server.ca.as_deref(),
        Some(std::fs::read_to_string(&p.config.ca_cert).unwrap().as_str())
    );

    let r = p.get_with_token(&format!("/api/accounts/{id}/provision.js"));
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("exports.params = {"));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let file = p.dir.path().join(format!("{id}.js"));
    std::fs::write(&file, &r.body).unwrap();
    assert_eq!(Provision::load(&file).unwrap().base32, base32);

    // The QR code is the otpauth:// URI, drawn here.
    let r = p.get_with_token(&format!("/api/accounts/{id}/qr.svg"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/svg+xml"));
    assert_eq!(r.body, taas::admin::qr_svg(&prov.otpauth_uri()).unwrap());
}

/// The label certificate and key the page hands out: on creation, and again at
/// `POST /api/accounts/ID/certificate` for every label of the account, each time
/// with a new key, from the relay's CA; never without the token or from another
/// site; never in the log.
#[test]
fn label_certificates_come_with_a_new_account_and_on_request() {
    let p = Page::start();
    let (status, v) = p.api("POST", "/api/accounts", Some(json!({ "label": "demo" })));
    assert_eq!(status, 200, "{v}");
    let id = v["account"]["id"].as_str().unwrap().to_string();
    let cert = &v["certificate"];
    assert_eq!(cert["names"], json!(["demo.taas.localhost"]));
    let ca_pem = std::fs::read_to_string(&p.config.ca_cert).unwrap();
    let check = |cert: &Value, name: &str| {
        let pem = cert["cert"].as_str().unwrap();
        let key = cert["key"].as_str().unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        // A hidden server serves them, and a mobile trusting the CA accepts it.
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, pem).unwrap();
        std::fs::write(&k, key).unwrap();
        let server = taas::tls::server_config(&c, &k).unwrap();
        let client = taas::tls::client_config(Some(&ca_pem)).unwrap();
        let mut sc = rustls::ServerConnection::new(server).unwrap();
        let sni = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut cc = rustls::ClientConnection::new(client, sni).unwrap();
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            cc.write_tls(&mut buf).unwrap();
            sc.read_tls(&mut &buf[..]).unwrap();
            sc.process_new_packets().unwrap();
            buf.clear();
            sc.write_tls(&mut buf).unwrap();
            cc.read_tls(&mut &buf[..]).unwrap();
            cc.process_new_packets().unwrap();
        }
        assert!(!cc.is_handshaking(), "handshake did not finish");
        key.to_string()
    };
    let first_key = check(cert, "demo.taas.localhost");

    // Again, for every label the account has now.
    let (status, _) = p.api(
        "POST",
        &format!("/api/accounts/{id}/labels"),
        Some(json!({ "label": "cam:8888" })),
    );
    assert_eq!(status, 200);
    let (status, v) = p.api("POST", &format!("/api/accounts/{id}/certificate"), None);
    assert_eq!(status, 200, "{v}");
    let cert = &v["certificate"];
    assert_eq!(
        cert["names"],
        json!(["demo.taas.localhost", "cam.taas.localhost"])
    );
    assert_ne!(check(cert, "cam.taas.localhost"), first_key, "a new key");
    let r = p.get_with_token(&format!("/api/accounts/{id}/certificate"));
    assert_eq!(r.status, 405);

    // Without the token, or from another site: refused.
    let origin = format!("Origin: http://{}", p.addr());
    let r = p.request(
        "POST",
        &format!("/api/accounts/{id}/certificate"),
        &[&origin],
        "",
    );
    assert_eq!(r.status, 403);
    assert!(!r.body.contains("PRIVATE KEY"));
    let token = format!("X-Taas-Token: {}", p.token);
    let r = p.request(
        "POST",
        &format!("/api/accounts/{id}/certificate"),
        &[&token, "Origin: http://evil.example"],
        "",
    );
    assert_eq!(r.status, 403);
    assert!(!r.body.contains("PRIVATE KEY"));

    // A CA that is gone: the error names the file and says what to do.
    std::fs::rename(&p.config.ca_cert, p.dir.path().join("ca.away")).unwrap();
    let (status, v) = p.api("POST", &format!("/api/accounts/{id}/certificate"), None);
    assert_eq!(status, 500);
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("ca.crt") && e.contains("taas cert"), "{e}");
    // And no account is made without its certificate.
    let before = p.count();
    let (status, _) = p.api("POST", "/api/accounts", Some(json!({ "label": "more" })));
    assert_eq!(status, 500);
    assert_eq!(p.count(), before);
}

#[test]
fn changes_without_the_token_are_refused() {
    let p = Page::start();
    let id = p.create("demo");
    let origin = format!("Origin: http://{}", p.addr());
    let json = "Content-Type: application/json";
    let wrong = format!("X-Taas-Token: {}", "f".repeat(64));
    for extra in [None, Some(wrong.as_str())] {
        let mut h = vec![origin.as_str(), json];
        h.extend(extra);
        let r = p.request("POST", "/api/accounts", &h, r#"{"label":"evil"}"#);
        assert_eq!(r.status, 403, "{}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("reload the admin page")
        );
        let r = p.request(
            "POST",
            &format!("/api/accounts/{id}/labels"),
            &h,
            r#"{"label":"evil"}"#,
        );
        assert_eq!(r.status, 403);
        let r = p.request("DELETE", &format!("/api/accounts/{id}/labels/demo"), &h, "");
        assert_eq!(r.status, 403);
        let r = p.request("DELETE", &format!("/api/accounts/{id}"), &h, "");
        assert_eq!(r.status, 403);
        assert_eq!(p.request("GET", "/api/accounts", &h, "").status, 403);
    }
    assert_eq!(p.count(), 1);
    assert_eq!(p.store().get(&id).unwrap().unwrap().labels, ["demo"]);
}

#[test]
fn a_foreign_origin_is_refused_even_with_the_token() {
    let p = Page::start();
    let token = format!("X-Taas-Token: {}", p.token);
    let json = "Content-Type: application/json";
    for bad in [
        "Origin: http://evil.example",
        "Origin: null",
        "Origin: https://127.0.0.1",
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Site: same-site",
    ] {
        let r = p.request(
            "POST",
            "/api/accounts",
            &[&token, json, bad],
            r#"{"label":"evil"}"#,
        );
        assert_eq!(r.status, 403, "{bad}: {}", r.body);
        assert!(r.body.contains("another site"), "{}", r.body);
    }
    let other_port = format!("Origin: http://127.0.0.1:{}", free_port());
    let r = p.request(
        "POST",
        "/api/accounts",
        &[&token, json, &other_port],
        r#"{"label":"evil"}"#,
    );
    assert_eq!(r.status, 403);
    assert_eq!(p.count(), 0);
    // The page's own origin, as a browser sends it, passes.
    let own = format!("Origin: http://{}", p.addr());
    let r = p.request(
        "POST",
        "/api/accounts",
        &[&token, json, &own, "Sec-Fetch-Site: same-origin"],
        r#"{"label":"good"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(p.count(), 1);
}

#[test]
fn a_foreign_host_is_refused_page_included() {
    let p = Page::start();
    let addr = p.addr();
    let token = format!("X-Taas-Token: {}", p.token);
    // DNS rebinding: evil.example resolves to 127.0.0.1; the browser sends its
    // name. The page (which carries the token) is refused too.
    for host in [
        format!("evil.example:{}", addr.port()),
        format!("127.0.0.1:{}", addr.port() ^ 1),
        "127.0.0.1".to_string(),
        format!("localhost.evil.example:{}", addr.port()),
    ] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let r = send(addr, req.as_bytes(), addr);
        assert_eq!(r.status, 403, "{host}");
        assert!(!r.body.contains(&p.token));
        let req = format!(
            "POST /api/accounts HTTP/1.1\r\nHost: {host}\r\n{token}\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{{\"label\":\"evil\"}}"
        );
        assert_eq!(send(addr, req.as_bytes(), addr).status, 403, "{host}");
    }
    let r = send(addr, b"GET / HTTP/1.1\r\n\r\n", addr);
    assert_eq!(r.status, 403, "no Host");
    let local = format!("GET / HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", addr.port());
    assert_eq!(send(addr, local.as_bytes(), addr).status, 200);
    assert_eq!(p.count(), 0);
}

#[test]
fn a_cross_site_form_post_is_refused() {
    let p = Page::start();
    // What <form method=post action=http://127.0.0.1:8893/api/accounts> on
    // another site makes a browser send: no token, a foreign Origin, a form body.
    let r = p.request(
        "POST",
        "/api/accounts",
        &[
            "Origin: http://evil.example",
            "Sec-Fetch-Site: cross-site",
            "Content-Type: application/x-www-form-urlencoded",
        ],
        "label=evil",
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // Even with a stolen token, a form body is not an API request.
    let token = format!("X-Taas-Token: {}", p.token);
    let r = p.request(
        "POST",
        "/api/accounts",
        &[&token, "Content-Type: application/x-www-form-urlencoded"],
        "label=evil",
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("must be JSON"));
    let r = p.request(
        "POST",
        "/api/accounts",
        &[&token, "Content-Type: text/plain"],
        r#"{"label":"evil"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(p.count(), 0);
}

#[test]
fn limits_body_head_labels_and_connections() {
    let p = Page::start();
    let token = format!("X-Taas-Token: {}", p.token);
    let big = format!(r#"{{"label":"{}"}}"#, "a".repeat(MAX_BODY));
    let r = p.request(
        "POST",
        "/api/accounts",
        &[&token, "Content-Type: application/json"],
        &big,
    );
    assert_eq!(
        r.status, 400,
        "the answer arrives though the body was not read"
    );
    assert!(r.body.contains("over the limit"));
    let huge_head = format!(
        "GET / HTTP/1.1\r\nHost: HOST\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(send(p.addr(), huge_head.as_bytes(), p.addr()).status, 431);

    let id = p.create("l0");
    for i in 1..MAX_LABELS {
        let (status, v) = p.api(
            "POST",
            &format!("/api/accounts/{id}/labels"),
            Some(json!({ "label": format!("l{i}") })),
        );
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = p.api(
        "POST",
        &format!("/api/accounts/{id}/labels"),
        Some(json!({ "label": "one-too-many" })),
    );
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("at most"));

    // MAX_ADMIN_CONNS idle connections hold every slot; the next is closed
    // unanswered; once they go, the page answers again.
    let idle: Vec<TcpStream> = (0..MAX_ADMIN_CONNS)
        .map(|_| TcpStream::connect(p.addr()).unwrap())
        .collect();
    // (The accept thread takes them in its own time: a probe answered before it
    // has does not hold a slot afterwards, so probe until one is refused.)
    let refused = support::wait_until(Duration::from_secs(10), || {
        let mut extra = TcpStream::connect(p.addr()).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = extra.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", p.addr()).as_bytes());
        let mut buf = Vec::new();
        let _ = extra.read_to_end(&mut buf);
        buf.is_empty()
    });
    assert!(refused, "over the limit: closed unanswered");
    drop(idle);
    assert!(support::wait_until(Duration::from_secs(5), || {
        p.request("GET", "/", &[], "").status == 200
    }));
}

#[test]
fn a_slow_client_meets_the_deadline() {
    let p = Page::start();
    let mut s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /api/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = Reply::parse(&out);
    assert_eq!(r.status, 408, "{r:?}");
    let waited = start.elapsed();
    assert!(
        waited >= taas::admin::ADMIN_TIMEOUT - Duration::from_secs(1)
            && waited < taas::admin::ADMIN_TIMEOUT + Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn an_account_made_here_registers_at_once_on_a_relay() {
    let data = tempfile::tempdir().unwrap();
    let store = format!("file:{}/accounts.json", data.path().display());
    let relay = TestRelay::start_with_store("", Some(&store));
    // The relay's own config: same store, same certificate.
    let p = Page::on(tempfile::tempdir().unwrap(), relay.config().clone());
    let id = p.create("live");
    let r = p.get_with_token(&format!("/api/accounts/{id}/provision.json"));
    assert_eq!(r.status, 200);
    let file = data.path().join("live.json");
    std::fs::write(&file, &r.body).unwrap();
    let prov = Provision::load(&file).unwrap();
    assert_eq!(prov.server.ca, relay.cert_pem);
    let reply = relay.register(&prov, "live");
    assert_eq!(reply.status, 200, "{}", reply.body);
    // And a deletion here is seen by the relay at once.
    let (status, _) = p.api("DELETE", &format!("/api/accounts/{id}"), None);
    assert_eq!(status, 200);
    assert_eq!(relay.register(&prov, "live").status, 401);
}

#[test]
fn dropping_the_admin_stops_it() {
    let p = Page::start();
    let addr = p.addr();
    let start = Instant::now();
    drop(p.admin);
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
}

#[test]
fn the_command_refuses_a_public_address_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taas.toml");
    std::fs::write(
        &config,
        format!(
            "store = \"file:{}/accounts.json\"\ntls = false\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let (ok, _, err) = support::taas(dir.path(), &["admin", "-c", c, "--listen", "0.0.0.0:0"]);
    assert!(!ok);
    assert!(
        err.contains("not a loopback address") && err.contains("--public"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // With --public it serves, after a warning. A free port can be taken by
    // another test's outgoing connection before the child binds it: then a
    // new one is tried (at most three times).
    let mut attempts = 0;
    let (up, err) = loop {
        attempts += 1;
        let port = free_port();
        let mut child = Command::new(taas_bin())
            .args(["admin", "-c", c, "--public", "--listen"])
            .arg(format!("0.0.0.0:{port}"))
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let up = support::wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || child.try_wait().unwrap().is_some()
        }) && child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        if up || attempts == 3 || !err.contains("Address already in use") {
            break (up, err);
        }
    };
    assert!(up, "taas admin --public did not listen: {err}");
    assert!(err.contains("WARN") && err.contains("--public"), "{err}");
}
