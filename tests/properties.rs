//! Property tests (proptest) of the parsers of peer input: the request head, the
//! `Authorization` grammar, `Host` routing, the label rules, the 307's `Location`
//! and the accounts page's JSON API. Over arbitrary bytes: no panic, and the
//! properties that matter hold (a routed label is a valid DNS label; a
//! `Location` names the relay's own label host and nothing a peer chose; every
//! answer is well-formed HTTP).
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use proptest::prelude::*;
use support::{Reply, TestRelay};
use taas::Config;
use taas::label::{self, Entry};
use taas::route::{Route, route};

/// Arbitrary text biased toward the characters the grammars care about.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9 =\",:.\\[\\]\t\r\n-]{0,80}",
        "(totp|TOTP|Basic) [a-z]{0,9}=\"?[a-z0-9-]{0,40}\"?(, ?[a-z]{0,9}=\"?[0-9]{0,9}\"?){0,3}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_heads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(Some(head)) = taas::http::parse_head(&bytes) {
            prop_assert!(!head.method.is_empty());
            prop_assert!(!head.target.contains(['\r', '\n']));
        }
    }

    #[test]
    fn authorization_parses_or_refuses_without_panic(value in texty()) {
        if let Ok(c) = taas::auth::parse_authorization(&value) {
            prop_assert!(!c.username.is_empty() && c.username.len() <= taas::auth::MAX_ID);
            prop_assert!(!c.response.is_empty());
        }
    }

    #[test]
    fn a_routed_label_is_always_a_valid_dns_label(host in texty()) {
        let config = Config::default();
        if let Ok(Route::Label(l)) = route(Some(&host), &config) {
            prop_assert_eq!(label::validate(&l).ok(), Some(l.clone()));
            prop_assert!(l.len() <= label::MAX_LABEL);
            prop_assert!(l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }

    #[test]
    fn label_entries_round_trip(text in texty()) {
        if let Ok(e) = Entry::parse(&text) {
            prop_assert_eq!(Entry::parse(&e.stored()).ok(), Some(e.clone()));
            prop_assert!(label::validate(&e.name).is_ok());
            prop_assert!(e.port != Some(0));
        }
    }

    #[test]
    fn a_location_names_the_label_host_of_this_relay(
        l in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
        port in 1u16..,
        target in "/[ -~]{0,60}",
    ) {
        let config = Config::default();
        let url = config.rendezvous_url(&l, port, &target);
        let prefix = format!("https://{l}.taas.localhost:{port}/");
        prop_assert!(url.starts_with(&prefix), "{}", url);
        prop_assert!(!url.contains(['\r', '\n']));
    }
}

/// Sends `head` to the relay's label host and returns the parsed answer.
fn ask(relay: &TestRelay, head: &[u8]) -> Reply {
    support::try_raw(relay, None, "demo.taas.localhost", head).unwrap_or_else(|e| panic!("{e}"))
}

/// Against a real relay: a request for the label's host with any path and query
/// is answered, and when it is a 307 its `Location` names the label's host, the
/// label's rendezvous port, and the request's own path, never a host a peer
/// chose; the relay keeps serving.
#[test]
fn every_307_names_the_relay_itself() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let _hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/").unwrap().port();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let paths = prop_oneof![
        "/[!-~]{0,40}",
        "//evil.example/[a-z]{0,5}",
        "[a-z]{0,10}://evil.example/",
        "\\*",
    ];
    let hosts = prop_oneof![
        Just("demo.taas.localhost".to_string()),
        Just("DEMO.taas.localhost:1".to_string()),
        "demo\\.taas\\.localhost@evil\\.example",
    ];
    runner
        .run(&(paths, hosts), |(path, host)| {
            let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let r = ask(&relay, head.as_bytes());
            prop_assert!(r.status >= 200, "no answer for {:?}", head);
            if r.status == 307 {
                let loc = r.header("location").unwrap();
                let own = format!("https://demo.taas.localhost:{q}/");
                prop_assert!(loc.starts_with(&own), "{} for {:?}", loc, head);
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(
        relay.waiting("demo"),
        1,
        "the relay still holds its responder"
    );
}

/// The accounts page's JSON API with arbitrary bodies: always a JSON answer
/// with a status, never a panic or a dropped connection, and the page serves on.
#[test]
fn the_accounts_api_answers_any_body() {
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
    let admin = taas::admin::Admin::bind(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = admin.local_addr();
    let send = |bytes: &[u8]| -> Reply {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Reply::parse(&out)
    };
    let page = send(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes());
    let marker = "name=\"taas-token\" content=\"";
    let token = page.body[page.body.find(marker).unwrap() + marker.len()..]
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(96));
    let bodies = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "\\{\"label\": ?\"[ -~]{0,70}\"(, ?\"id\": ?\"[ -~]{0,40}\")?\\}"
            .prop_map(String::into_bytes),
        "\\{\"[a-z]{0,8}\": ?(1|null|\\[\\]|\\{\\}|\"x\")\\}".prop_map(String::into_bytes),
    ];
    let paths = prop_oneof![
        Just("/api/accounts".to_string()),
        "/api/accounts/[ -~&&[^ ]]{0,40}/labels",
    ];
    runner
        .run(&(bodies, paths), |(body, path)| {
            let mut req = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nX-Taas-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            let r = send(&req);
            prop_assert!((200..600).contains(&r.status), "{:?}", r);
            if r.status != 404 {
                prop_assert!(
                    serde_json::from_str::<serde_json::Value>(&r.body).is_ok(),
                    "not JSON: {:?}",
                    r
                );
            }
            Ok(())
        })
        .unwrap();
    let again = send(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes());
    assert_eq!(again.status, 200, "the page still serves");
}
