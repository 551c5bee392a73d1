//! The whole path once: register, plug, 307, rendezvous, relay, pairings.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use support::TestRelay;

#[test]
fn register_pair_relay_and_list_pairings() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let mut hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/hello?x=1").unwrap();
    let mut mobile = TcpStream::connect(q).unwrap();
    mobile.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    hidden.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    hidden.write_all(b"pong").unwrap();
    mobile.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    let r = relay.request(
        "GET",
        "registrar.localhost",
        "/pairings/demo",
        Some(&TestRelay::auth(&p)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["pathname"], "/hello?x=1");
    let local = mobile.local_addr().unwrap();
    assert_eq!(
        v[0]["initiator"],
        format!("{} {}", local.ip(), local.port())
    );
}
