//! The splice relay's descriptors: an idle pair holds its two sockets and no pipe;
//! a direction makes its pipe when its first octet arrives and gives it back
//! after `relay::PIPE_IDLE` of quiet. (Alone in its own test
//! binary, so no other test's pipes are counted.)
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{TestRelay, wait_until};

/// Pipes this process holds open.
fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[test]
fn an_idle_pair_holds_no_pipe_until_octets_flow() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let base = pipes();
    let mut hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/").unwrap();
    let mut mobile = TcpStream::connect(q).unwrap();
    mobile
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Accepted (it holds a pair slot) but silent: no responder, no pipe yet.
    assert!(wait_until(Duration::from_secs(10), || relay
        .server
        .snapshot()
        .pair_slots
        == 1));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pipes(), base, "a silent connection holds no pipe");
    assert_eq!(relay.waiting("demo"), 1, "nor a responder");

    mobile.write_all(b"up").unwrap();
    let mut buf = [0u8; 2];
    hidden.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"up");
    assert_eq!(
        pipes(),
        base + 2,
        "one pipe (two ends) for the moving direction"
    );

    hidden.write_all(b"dn").unwrap();
    mobile.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"dn");
    assert_eq!(pipes(), base + 4, "one pipe per direction");

    // Quiet for longer than PIPE_IDLE: the pipes go back, the pair stays.
    assert!(wait_until(Duration::from_secs(10), || pipes() == base));
    mobile.write_all(b"again").unwrap();
    let mut again = [0u8; 5];
    hidden.read_exact(&mut again).unwrap();
    assert_eq!(&again, b"again");
    hidden.write_all(b"still").unwrap();
    mobile.read_exact(&mut again).unwrap();
    assert_eq!(&again, b"still");

    drop(mobile);
    drop(hidden);
    assert!(wait_until(Duration::from_secs(10), || pipes() == base));
}
