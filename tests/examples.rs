//! The examples run for real: the hidden server registers with a relay on
//! loopback and the mobile client follows the 307 to it, TLS end to end.
mod support;

#[allow(dead_code)]
#[path = "../examples/hidden_server.rs"]
mod hidden_server;
#[allow(dead_code)]
#[path = "../examples/mobile_client.rs"]
mod mobile_client;

use std::time::Duration;
use support::{TestRelay, wait_until};

#[test]
fn hidden_server_and_mobile_client_examples() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    // The relay listens on port 0's pick: point the provisioning file at it.
    let prov = relay
        .dir
        .path()
        .join("prov")
        .join(format!("{}.json", p.id()));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prov).unwrap()).unwrap();
    v["server"]["port"] = relay.addr.port().into();
    std::fs::write(&prov, v.to_string()).unwrap();
    let cert = relay.dir.path().join("hidden.crt");
    let (prov2, cert2) = (prov.clone(), cert.clone());
    let hidden = std::thread::spawn(move || {
        hidden_server::serve(&prov2, &cert2, 2).map_err(|e| e.to_string())
    });
    assert!(wait_until(Duration::from_secs(10), || relay
        .waiting("demo")
        > 0));
    let relay_ca = relay.cert_pem.clone().unwrap();
    let hidden_ca = std::fs::read_to_string(&cert).unwrap();
    for path in ["/", "/again"] {
        assert!(wait_until(Duration::from_secs(10), || relay
            .waiting("demo")
            > 0));
        let body = mobile_client::fetch(
            relay.addr,
            "demo.taas.localhost",
            path,
            &relay_ca,
            &hidden_ca,
        )
        .unwrap();
        assert_eq!(body, "hello from a hidden server\n");
    }
    hidden.join().unwrap().unwrap();
    assert_eq!(relay.server.snapshot().label("demo").unwrap().pairings, 2);
}
