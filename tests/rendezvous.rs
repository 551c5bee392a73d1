//! Rendezvous, plugs, pools and the relay over loopback (docs/PROTOCOL.md sections 1
//! to 3): the 307 and its refusals, the plug's one connection and same-IP rule,
//! `plug_timeout`, eviction, dead responders, FIFO order, the rendezvous port's
//! reuse and idle close, `pair_wait`, a byte-exact relay of 16 MiB each way at
//! once, and half-closes.
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::{TestRelay, expect, send, wait_until};
use taas::provision::Provision;

const LIMIT: Duration = Duration::from_secs(10);
/// How late a timeout may close a connection on a loaded machine.
const MARGIN: Duration = Duration::from_secs(2);

/// Another loopback address, to play a second host.
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn host(label: &str) -> String {
    format!("{label}.taas.localhost")
}

/// `s` with a 20 s read timeout.
fn timed(s: TcpStream) -> TcpStream {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn connect(addr: SocketAddr) -> TcpStream {
    timed(TcpStream::connect(addr).unwrap())
}

/// Connects a mobile to `q` and checks that `msg` from it reaches `hidden`.
fn paired_mobile(q: SocketAddr, hidden: &mut TcpStream, msg: &[u8]) -> TcpStream {
    let mut mobile = connect(q);
    send(&mut mobile, hidden, msg);
    mobile
}

/// Reads `s` to EOF.
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got
}

/// Writes `msg` on `from`, half-closes it, and returns what `to` reads to EOF.
fn send_last(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    from.write_all(msg).unwrap();
    from.shutdown(Shutdown::Write).unwrap();
    read_all(to)
}

/// The peer closed `s` (EOF or reset) before its read timeout, sending nothing.
fn assert_closed(s: &mut TcpStream) {
    let got = support::read_until_closed(s).expect("expected the relay to close the connection");
    assert!(got.is_empty(), "unexpected bytes {got:?}");
}

/// Registers label `demo` for `p`; the plug's address from the 200.
fn register_plug(relay: &TestRelay, p: &Provision) -> SocketAddr {
    let r = relay.register(p, "demo");
    assert_eq!(r.status, 200, "{r:?}");
    r.body.trim().parse().unwrap()
}

/// The relay's count of refusals by `limit`.
fn refusals(relay: &TestRelay, limit: &str) -> u64 {
    support::metric(relay, &format!("taas_refusals_total{{limit=\"{limit}\"}}"))
}

/// Pairs the relay holds now.
fn pairs(relay: &TestRelay) -> usize {
    relay.server.snapshot().pair_slots
}

/// A relay started with `config`, account `demo` with one responder waiting,
/// and the rendezvous address of a 307 for `path`.
fn relay_with_responder(config: &str, path: &str) -> (TestRelay, Provision, TcpStream, SocketAddr) {
    let relay = TestRelay::start(config);
    let p = relay.add_account("demo");
    let hidden = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", path).unwrap();
    (relay, p, hidden, q)
}

#[test]
fn redirect_location_is_built_from_config_with_path_and_query() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let _hidden = relay.responder(&p, "demo");
    let head = "GET /some/path?a=1&b=two HTTP/1.1\r\nHost: Demo.Taas.Localhost:9999\r\n\r\n";
    let r = relay.raw(&host("demo"), head.as_bytes());
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body, "");
    let location = r.header("location").unwrap();
    // The label's own name, from the config (not the request's spelling).
    let rest = location
        .strip_prefix("https://demo.taas.localhost:")
        .unwrap_or_else(|| panic!("Location {location}"));
    let (q, path) = rest.split_once('/').unwrap();
    assert_eq!(path, "some/path?a=1&b=two");
    let q: u16 = q.parse().unwrap();
    assert_ne!(q, 9999);
    assert!((20000..=29999).contains(&q));
    assert!(support::is_listening(q));
    // Any method.
    let r = relay.request("DELETE", &host("demo"), "/x", None);
    assert_eq!(r.status, 307, "{r:?}");
}

#[test]
fn valid_label_with_nothing_waiting_is_503_with_retry_after() {
    let relay = TestRelay::start("plug_timeout = 0.5\npair_wait = 0.5");
    let p = relay.add_account("demo");
    // Never registered.
    let r = relay.request("GET", &host("demo"), "/", None);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("connection"), Some("close"));
    // Registered, but the plug timed out with no responder.
    assert_eq!(relay.register(&p, "demo").status, 200);
    assert!(wait_until(LIMIT, || refusals(&relay, "plug_timeout") == 1));
    let r = relay.request("GET", &host("demo"), "/", None);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
}

#[test]
fn foreign_host_is_421() {
    let relay = TestRelay::start("");
    for h in [
        "example.com",
        "a.b.taas.localhost",
        "taas.localhost",
        "-x.taas.localhost",
    ] {
        let head = format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n");
        let r = relay.raw(&host("demo"), head.as_bytes());
        assert_eq!(r.status, 421, "{h}: {r:?}");
        assert_eq!(r.header("connection"), Some("close"));
    }
}

#[test]
fn no_host_is_400() {
    let relay = TestRelay::start("");
    let r = relay.raw(&host("demo"), b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
}

#[test]
fn plug_accepts_exactly_one_connection() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let plug = register_plug(&relay, &p);
    let port = plug.port();
    let _first = connect(plug);
    assert!(wait_until(LIMIT, || relay.waiting("demo") == 1));
    assert!(
        wait_until(LIMIT, || !support::is_listening(port)),
        "plug still listening after its one connection"
    );
    match TcpStream::connect(("127.0.0.1", port)) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Ok(second) => assert_closed(&mut timed(second)),
    }
    assert_eq!(relay.waiting("demo"), 1);
}

#[test]
fn plug_closes_a_connection_from_another_address_and_keeps_waiting() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let plug = register_plug(&relay, &p);
    let mut intruder = timed(support::connect_from(OTHER_IP, plug).unwrap());
    assert_closed(&mut intruder);
    assert!(wait_until(LIMIT, || refusals(&relay, "plug_same_ip") == 1));
    assert_eq!(relay.waiting("demo"), 0);
    assert!(support::is_listening(plug.port()), "plug gave up");
    // The registering address still gets in, and is the one paired.
    let mut hidden = connect(plug);
    assert!(wait_until(LIMIT, || relay.waiting("demo") == 1));
    let q = relay.rendezvous("demo", "/").unwrap();
    paired_mobile(q, &mut hidden, b"hi");
}

#[test]
fn registration_from_another_address_is_plugged_from_that_address() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let head = format!(
        "PUT /register/demo HTTP/1.1\r\nHost: registrar.localhost\r\nAuthorization: {}\r\n\r\n",
        TestRelay::auth(&p)
    );
    let r = support::try_raw(
        &relay,
        Some(OTHER_IP),
        "registrar.localhost",
        head.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let plug: SocketAddr = r.body.trim().parse().unwrap();
    // 127.0.0.1 is now the stranger.
    let mut wrong = connect(plug);
    assert_closed(&mut wrong);
    assert_eq!(relay.waiting("demo"), 0);
    let _hidden = support::connect_from(OTHER_IP, plug).unwrap();
    assert!(wait_until(LIMIT, || relay.waiting("demo") == 1));
}

#[test]
fn plug_stops_listening_after_plug_timeout() {
    let relay = TestRelay::start("plug_timeout = 1");
    let p = relay.add_account("demo");
    let port = register_plug(&relay, &p).port();
    assert!(support::is_listening(port));
    assert!(
        wait_until(LIMIT, || !support::is_listening(port)),
        "plug {port} still listening"
    );
    assert_eq!(
        TcpStream::connect(("127.0.0.1", port)).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    assert_eq!(relay.waiting("demo"), 0);
    assert_eq!(refusals(&relay, "plug_timeout"), 1);
}

/// A stranger knocking on a plug without pause neither keeps it open past
/// `plug_timeout` nor gets in.
#[test]
fn plug_times_out_while_a_stranger_keeps_knocking() {
    let relay = TestRelay::start("plug_timeout = 1");
    let p = relay.add_account("demo");
    let plug = register_plug(&relay, &p);
    let mut knocks = 0;
    // Bounded: 5,000 knocks at most, a few ms apart.
    while knocks < 5000 && support::connect_from(OTHER_IP, plug).is_ok() {
        knocks += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        knocks < 5000,
        "plug {plug} still open after {knocks} knocks"
    );
    assert!(knocks > 0);
    assert_eq!(relay.waiting("demo"), 0);
    assert!(wait_until(LIMIT, || refusals(&relay, "plug_timeout") == 1));
}

/// A label whose pool holds `max_waiting` refuses the next registration with
/// 503 and Retry-After before any plug opens; nobody waiting is evicted (an
/// evicted hidden server would register again at once: a loop).
#[test]
fn full_pool_refuses_before_a_plug_opens_and_evicts_nobody() {
    let relay = TestRelay::start("max_waiting = 2");
    let p = relay.add_account("demo");
    let mut h1 = relay.responder(&p, "demo");
    let mut h2 = relay.responder(&p, "demo");
    let refused = relay.register(&p, "demo");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("15"));
    let snapshot = relay.server.snapshot();
    assert_eq!(
        snapshot.label("demo").unwrap().plugs_open,
        0,
        "no plug opened"
    );
    assert_eq!(refusals(&relay, "max_waiting"), 1);
    assert_eq!(relay.waiting("demo"), 2);
    // The two are paired in order, then there is room again.
    let q = relay.rendezvous("demo", "/").unwrap();
    let _m1 = paired_mobile(q, &mut h1, b"one");
    let _m2 = paired_mobile(q, &mut h2, b"two");
    assert_eq!(relay.register(&p, "demo").status, 200);
}

/// Open plugs count with the pool against `max_waiting`: one leaked token
/// cannot take the port range, other labels are not affected, and a dead
/// responder is dropped at the refusal so it never keeps a label full.
#[test]
fn plugs_and_pool_share_max_waiting() {
    let relay = TestRelay::start("max_waiting = 2");
    let p = relay.add_account("demo");
    let other = relay.add_account("other");
    let plugs: Vec<SocketAddr> = (0..2).map(|_| register_plug(&relay, &p)).collect();
    let refused = relay.register(&p, "demo");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refusals(&relay, "max_waiting"), 1);
    assert_eq!(relay.register(&other, "other").status, 200);
    let hidden = connect(plugs[0]);
    assert!(wait_until(LIMIT, || relay.waiting("demo") == 1));
    assert_eq!(relay.register(&p, "demo").status, 503, "1 waiting + 1 plug");
    drop(hidden);
    assert!(
        wait_until(LIMIT, || relay.register(&p, "demo").status == 200),
        "the dead responder still held its place"
    );
}

#[test]
fn dead_responders_are_never_paired() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let closed = relay.responder(&p, "demo");
    let reset = relay.responder(&p, "demo");
    let mut live = relay.responder(&p, "demo");
    let q = relay.rendezvous("demo", "/").unwrap();
    // One closes with FIN, one with RST, after the 307 was given out.
    let ends = [&closed, &reset].map(|s| (s.peer_addr().unwrap(), s.local_addr().unwrap()));
    drop(closed);
    socket2::SockRef::from(&reset)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(reset);
    // Once the relay's ends have had the FIN and the RST (under load the
    // kernel delivers them a little later), neither may be paired.
    assert!(wait_until(LIMIT, || ends.iter().all(
        |(relay_end, ours)| support::tcp_state(*relay_end, *ours) != Some(1)
    )));
    let mut mobile = paired_mobile(q, &mut live, b"alive?");
    send(&mut live, &mut mobile, b"yes");
}

#[test]
fn rendezvous_port_is_reused_while_open_and_closed_when_idle() {
    let (relay, p, mut hidden, q) =
        relay_with_responder("rendezvous_idle = 1\npair_wait = 0.5", "/a");
    let again = relay.rendezvous("demo", "/b").unwrap();
    assert_eq!(q, again, "one rendezvous port per label while open");
    {
        let mut mobile = paired_mobile(q, &mut hidden, b"x");
        drop(hidden);
        assert_closed(&mut mobile);
    }
    assert_eq!(relay.waiting("demo"), 0);
    assert!(
        wait_until(LIMIT, || !support::is_listening(q.port())),
        "rendezvous port {q} still open"
    );
    assert_eq!(
        TcpStream::connect(q).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    // A new responder: the next 307 opens a port again, and it works.
    let mut hidden = relay.responder(&p, "demo");
    let q2 = relay.rendezvous("demo", "/c").unwrap();
    assert!(support::is_listening(q2.port()));
    paired_mobile(q2, &mut hidden, b"y");
}

#[test]
fn pool_is_first_in_first_paired() {
    let relay = TestRelay::start("");
    let p = relay.add_account("demo");
    let mut hiddens: Vec<TcpStream> = (0..3).map(|_| relay.responder(&p, "demo")).collect();
    let q = relay.rendezvous("demo", "/").unwrap();
    let mut mobiles = Vec::new();
    for (i, hidden) in hiddens.iter_mut().enumerate() {
        let mut mobile = connect(q);
        let msg = format!("mobile {i}");
        let got = send_last(&mut mobile, hidden, msg.as_bytes());
        assert_eq!(String::from_utf8(got).unwrap(), msg, "responder {i}");
        mobiles.push(mobile);
    }
}

#[test]
fn a_mobile_waits_pair_wait_for_a_responder_to_arrive() {
    // pair_wait is generous: the responder arrives as soon as a registration is done.
    let (relay, p, mut first, q) = relay_with_responder("pair_wait = 20", "/");
    drop(paired_mobile(q, &mut first, b"0"));
    drop(first);
    assert!(wait_until(LIMIT, || pairs(&relay) == 0));
    assert_eq!(relay.waiting("demo"), 0);
    // The pool is empty: the mobile connection is held…
    let mut mobile = connect(q);
    mobile.write_all(b"early").unwrap();
    assert!(wait_until(LIMIT, || pairs(&relay) == 1));
    // …until a responder arrives. (Not `relay.responder`: the waiting connection
    // takes it at once, so the pool may never be seen holding it.)
    let mut hidden = connect(register_plug(&relay, &p));
    expect(&mut hidden, b"early");
    send(&mut hidden, &mut mobile, b"late");
}

#[test]
fn a_mobile_is_closed_when_no_responder_arrives_within_pair_wait() {
    let (relay, _p, mut first, q) = relay_with_responder("pair_wait = 0.5", "/");
    drop(paired_mobile(q, &mut first, b"0"));
    let mut mobile = connect(q);
    mobile.write_all(b"anyone?").unwrap();
    assert_closed(&mut mobile);
    assert!(wait_until(LIMIT, || refusals(&relay, "pair_wait") == 1));
}

/// A reproducible pseudo-random stream (xorshift64*).
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const BIG: usize = 16 << 20;
const CHUNK: usize = 64 * 1024;

/// Writes `BIG` octets of `Noise(seed)`, then half-closes.
fn send_noise(mut s: TcpStream, seed: u64) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut noise = Noise(seed);
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..BIG / CHUNK {
            noise.fill(&mut buf);
            s.write_all(&buf).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
    })
}

/// Reads to EOF and checks every octet against `Noise(seed)`; returns the count.
fn check_noise(mut s: TcpStream, seed: u64) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut noise = Noise(seed);
        let mut want = vec![0u8; CHUNK];
        let mut got = vec![0u8; CHUNK];
        let mut total = 0;
        loop {
            // Fill a whole chunk (or reach EOF) so it lines up with the sender's.
            let mut n = 0;
            while n < CHUNK {
                match s.read(&mut got[n..]).unwrap() {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                return total;
            }
            noise.fill(&mut want);
            assert!(got[..n] == want[..n], "mismatch in chunk at offset {total}");
            total += n;
            if n < CHUNK {
                assert_eq!(s.read(&mut got).unwrap(), 0, "data after a short chunk");
                return total;
            }
        }
    })
}

#[test]
fn relays_16_mib_each_way_at_once_byte_exact() {
    let (relay, _p, hidden, q) = relay_with_responder("", "/big");
    let mobile = connect(q);
    let senders = [
        send_noise(mobile.try_clone().unwrap(), 0x1234_5678_9abc_def1),
        send_noise(hidden.try_clone().unwrap(), 0x0fed_cba9_8765_4321),
    ];
    let at_hidden = check_noise(hidden, 0x1234_5678_9abc_def1);
    let at_mobile = check_noise(mobile, 0x0fed_cba9_8765_4321);
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(at_hidden.join().unwrap(), BIG, "mobile -> hidden");
    assert_eq!(at_mobile.join().unwrap(), BIG, "hidden -> mobile");
    assert!(wait_until(LIMIT, || pairs(&relay) == 0));
    assert_eq!(
        support::metric(&relay, "taas_relayed_bytes_total{direction=\"up\"}"),
        BIG as u64
    );
    assert_eq!(
        support::metric(&relay, "taas_relayed_bytes_total{direction=\"down\"}"),
        BIG as u64
    );
}

#[test]
fn mobile_half_close_reaches_hidden_which_keeps_sending() {
    let (_relay, _p, mut hidden, q) = relay_with_responder("", "/");
    let mut mobile = connect(q);
    assert_eq!(
        send_last(&mut mobile, &mut hidden, b"request"),
        b"request",
        "hidden sees the data, then EOF"
    );
    for part in [&b"answer "[..], b"after ", b"EOF"] {
        hidden.write_all(part).unwrap();
    }
    hidden.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut mobile), b"answer after EOF");
}

#[test]
fn hidden_half_close_reaches_mobile_which_keeps_sending() {
    let (_relay, _p, mut hidden, q) = relay_with_responder("", "/");
    let mut mobile = paired_mobile(q, &mut hidden, b"hello");
    assert_eq!(
        send_last(&mut hidden, &mut mobile, b"bye"),
        b"bye",
        "mobile sees the data, then EOF"
    );
    assert_eq!(
        send_last(&mut mobile, &mut hidden, b"still talking"),
        b"still talking"
    );
}

/// A mobile that connects and says nothing is closed after
/// `first_octet_timeout` without having taken a responder: the responder stays
/// for the next mobile, which is paired.
#[test]
fn a_silent_mobile_is_closed_after_first_octet_timeout_without_a_responder() {
    let (relay, _p, mut hidden, q) = relay_with_responder("first_octet_timeout = 0.5", "/");
    let start = Instant::now();
    let mut mobile = connect(q);
    assert_closed(&mut mobile);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(500) + MARGIN,
        "closed after {took:?}"
    );
    assert_eq!(relay.waiting("demo"), 1, "the responder was not taken");
    assert_eq!(refusals(&relay, "first_octet_timeout"), 1);
    let _m = paired_mobile(q, &mut hidden, b"served");
}

/// A pair where nothing moves for `idle_timeout` after one octet is closed,
/// both sides, at that time; counted in /metrics.
#[test]
fn a_pair_silent_after_one_octet_is_closed_after_idle_timeout() {
    let (relay, _p, mut hidden, q) = relay_with_responder("idle_timeout = 0.5", "/");
    // Before the octet is sent: the relay's clock starts when it moves it,
    // which is after this and before the hidden side has it.
    let last = Instant::now();
    let mut mobile = paired_mobile(q, &mut hidden, b"x");
    assert_closed(&mut hidden);
    assert_closed(&mut mobile);
    let took = last.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(500) + MARGIN,
        "closed after {took:?}"
    );
    assert!(wait_until(LIMIT, || support::metric(
        &relay,
        "taas_pairs_idle_closed_total"
    ) == 1));
}

/// A relay started with `config` pairs one mobile; the next, from the same
/// address, is closed by `limit` without taking a responder. Returns the relay,
/// the rendezvous port, the live pair (mobile, hidden) and the responder left.
fn second_mobile_refused(
    config: &str,
    limit: &str,
) -> (TestRelay, SocketAddr, (TcpStream, TcpStream), TcpStream) {
    let (relay, p, mut h1, q) = relay_with_responder(config, "/");
    let h2 = relay.responder(&p, "demo");
    let m1 = paired_mobile(q, &mut h1, b"one");
    let mut m2 = connect(q);
    assert_closed(&mut m2);
    assert_eq!(
        relay.waiting("demo"),
        1,
        "the refused one took no responder"
    );
    assert_eq!(refusals(&relay, limit), 1);
    (relay, q, (m1, h1), h2)
}

/// One address holds at most `max_pairs_per_ip` pairs; another address is
/// still paired, and the first may pair again once its pair ended.
#[test]
fn pairs_per_address_are_bounded() {
    let (relay, q, first, mut h2) =
        second_mobile_refused("max_pairs_per_ip = 1", "max_pairs_per_ip");
    let mut m3 = support::connect_from(OTHER_IP, q).unwrap();
    send(&mut m3, &mut h2, b"two");
    drop(first);
    assert!(wait_until(LIMIT, || pairs(&relay) == 1));
    let p = relay.add_account("more");
    let mut h4 = relay.responder(&p, "more");
    let q4 = relay.rendezvous("more", "/").unwrap();
    paired_mobile(q4, &mut h4, b"again");
}

#[test]
fn connections_beyond_max_pairs_are_closed_without_taking_a_responder() {
    let (relay, q, first, mut h2) = second_mobile_refused("max_pairs = 1", "max_pairs");
    drop(first);
    assert!(wait_until(LIMIT, || pairs(&relay) == 0));
    paired_mobile(q, &mut h2, b"three");
}

/// A fixed port (`LABEL:PORT`) the relay cannot bind is that registration's
/// error: 503 with Retry-After and no plug (never a silent fallback to a
/// random port); once the port is free the label registers and listens there.
#[test]
fn a_fixed_port_that_cannot_be_bound_is_a_clear_registration_error() {
    let relay = TestRelay::start("");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let p = relay.add_account(&format!("cam:{port}"));
    let r = relay.register(&p, "cam");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
    let e = taas::Error::FixedPortUnavailable {
        label: "cam".into(),
        port,
        err: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    };
    assert!(
        e.to_string()
            .contains(&format!("fixed port {port} of label cam"))
    );
    let snapshot = relay.server.snapshot();
    assert_eq!(
        snapshot.label("cam").unwrap().plugs_open,
        0,
        "no plug opened"
    );
    drop(taken);
    let mut hidden = relay.responder(&p, "cam");
    assert!(support::is_listening(port));
    let q = relay.rendezvous("cam", "/").unwrap();
    assert_eq!(q.port(), port, "the 307 gives the fixed port");
    let _m = paired_mobile(q, &mut hidden, b"fixed");
}
