//! The account store (docs/PROTOCOL.md section 5), one suite run against both stores:
//! the JSON file in a temporary directory and a real `redis-server` on loopback.
//! Then what only one of them has: Redis going away and coming back, and the file
//! store shared between instances and between processes.
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::RedisServer;
use taas::Error;
use taas::store::{Account, Store, StoreSpec};

/// How long a child `taas` may run before the test gives up on it.
const CHILD_LIMIT: Duration = Duration::from_secs(60);

/// Secret of the legacy record: ASCII "12345678901234567890" (RFC 6238's SHA-1
/// seed), as the original's key generator kept it three ways.
const LEGACY_ASCII: &str = "12345678901234567890";
const LEGACY_HEX: &str = "3132333435363738393031323334353637383930";
const LEGACY_BASE32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

/// A record exactly as the original taas-server's users.js stored it: no `digits`,
/// no `algorithm`, the key in three encodings, and the two URLs it drew its page with.
fn legacy_record(id: &str) -> Value {
    json!({
        "uuid": id,
        "labels": ["legacy"],
        "authParams": {
            "protocol": "totp",
            "ascii": LEGACY_ASCII,
            "hex": LEGACY_HEX,
            "base32": LEGACY_BASE32,
            "step": 30
        },
        "authURL": format!("otpauth://totp/{id}?secret={LEGACY_BASE32}"),
        "qrcodeURL": format!(
            "https://chart.googleapis.com/chart?chs=166x166&cht=qr&chl=otpauth%3A%2F%2Ftotp%2F{id}"
        )
    })
}

/// Reads and writes records behind the store's back, in the store's own layout.
trait Raw {
    /// Stores `record` under `id` as the original would have.
    fn put(&self, id: &str, record: &Value);
    /// The record under `id` as stored now.
    fn get(&self, id: &str) -> Option<Value>;
}

/// A file store in a temporary directory.
struct FileFixture {
    /// Holds the directory until the test ends.
    _dir: tempfile::TempDir,
    /// `DIR/accounts.json`.
    path: PathBuf,
    /// The store under test.
    store: Store,
}

impl FileFixture {
    fn new() -> FileFixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.json");
        let store = Store::open(&StoreSpec::File(path.clone())).unwrap();
        FileFixture {
            _dir: dir,
            path,
            store,
        }
    }

    /// The file as a JSON object of ID to record (empty when absent).
    fn map(&self) -> serde_json::Map<String, Value> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).unwrap(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(e) => panic!("{}: {e}", self.path.display()),
        }
    }
}

impl Raw for FileFixture {
    fn put(&self, id: &str, record: &Value) {
        let mut map = self.map();
        map.insert(id.to_string(), record.clone());
        std::fs::write(&self.path, serde_json::to_vec(&map).unwrap()).unwrap();
    }

    fn get(&self, id: &str) -> Option<Value> {
        self.map().remove(id)
    }
}

/// A store on a real `redis-server` of its own.
struct RedisFixture {
    /// Stopped on drop.
    server: RedisServer,
    /// The store under test.
    store: Store,
}

impl RedisFixture {
    fn new() -> RedisFixture {
        let server = RedisServer::start();
        let store = Store::open(&StoreSpec::Redis(server.url())).unwrap();
        RedisFixture { server, store }
    }

    /// A plain client of the same server (the original's view of the database).
    fn client(&self) -> redis::Connection {
        let conn = redis::Client::open(self.server.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn
    }
}

impl Raw for RedisFixture {
    fn put(&self, id: &str, record: &Value) {
        redis::cmd("SET")
            .arg(id)
            .arg(record.to_string())
            .query::<()>(&mut self.client())
            .unwrap();
    }

    fn get(&self, id: &str) -> Option<Value> {
        let text: Option<String> = redis::cmd("GET").arg(id).query(&mut self.client()).unwrap();
        text.map(|t| serde_json::from_str(&t).unwrap())
    }
}

fn new_account(labels: &[&str]) -> Account {
    let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    Account::new(None, &labels).unwrap()
}

fn ids(store: &Store) -> Vec<String> {
    store.list().unwrap().into_iter().map(|a| a.uuid).collect()
}

// ---- The suite: every function takes a `Store` and holds for both kinds. ----

/// insert, get, list (ordered by ID), update, remove.
fn insert_get_list_update_remove(store: &Store) {
    assert!(store.list().unwrap().is_empty());
    let a = new_account(&["alpha"]);
    let b = new_account(&["beta", "beta-two"]);
    assert!(store.get(&a.uuid).unwrap().is_none());
    store.insert(&a).unwrap();
    store.insert(&b).unwrap();

    let got = store.get(&a.uuid).unwrap().expect("inserted account");
    assert_eq!(
        serde_json::to_value(&got).unwrap(),
        serde_json::to_value(&a).unwrap()
    );
    let mut want = vec![a.uuid.clone(), b.uuid.clone()];
    want.sort();
    assert_eq!(ids(store), want, "list is every account, ordered by ID");

    let mut a2 = got;
    a2.labels.push("alpha-two".into());
    store.update(&a2).unwrap();
    assert_eq!(
        store.get(&a.uuid).unwrap().unwrap().labels,
        ["alpha", "alpha-two"]
    );
    assert_eq!(store.list().unwrap().len(), 2, "update adds no account");

    store.remove(&a.uuid).unwrap();
    assert!(store.get(&a.uuid).unwrap().is_none());
    assert_eq!(ids(store), [b.uuid.as_str()]);
    // The removed account's label is free again.
    store.insert(&new_account(&["alpha"])).unwrap();
    store.ping().unwrap();
}

/// An existing ID, a label another ID owns, an unknown ID: each has its own error
/// and changes nothing.
fn refusals(store: &Store) {
    let a = new_account(&["taken"]);
    store.insert(&a).unwrap();

    let mut same_id = new_account(&["other"]);
    same_id.uuid = a.uuid.clone();
    match store.insert(&same_id) {
        Err(Error::AccountExists(id)) => assert_eq!(id, a.uuid),
        other => panic!("insert of an existing ID: {other:?}"),
    }
    assert_eq!(store.get(&a.uuid).unwrap().unwrap().labels, ["taken"]);

    let thief = new_account(&["free", "taken"]);
    match store.insert(&thief) {
        Err(Error::LabelTaken { label, owner }) => {
            assert_eq!(label, "taken");
            assert_eq!(owner, a.uuid);
        }
        other => panic!("insert with another's label: {other:?}"),
    }
    assert!(store.get(&thief.uuid).unwrap().is_none());

    // Taking the label by update is refused the same way.
    let b = new_account(&["bee"]);
    store.insert(&b).unwrap();
    let mut b2 = b.clone();
    b2.labels.push("taken".into());
    assert!(matches!(store.update(&b2), Err(Error::LabelTaken { .. })));
    assert_eq!(store.get(&b.uuid).unwrap().unwrap().labels, ["bee"]);

    // An account may keep its own labels on update.
    store.update(&b).unwrap();

    let ghost = new_account(&["ghost"]);
    match store.remove(&ghost.uuid) {
        Err(Error::NoSuchAccount(id)) => assert_eq!(id, ghost.uuid),
        other => panic!("remove of an unknown ID: {other:?}"),
    }
    assert!(matches!(store.update(&ghost), Err(Error::NoSuchAccount(_))));
    assert_eq!(store.list().unwrap().len(), 2);
}

/// A record in the original taas-server's shape, written behind the store's back,
/// reads, verifies `oathtool`'s tokens and survives an update with every field it
/// had.
fn legacy_record_round_trips(store: &Store, raw: &dyn Raw) {
    let id = "3b4cdb26-6a2c-4b8b-93e4-d8c3c0a1c7a1";
    let original = legacy_record(id);
    raw.put(id, &original);

    let account = store.get(id).unwrap().expect("legacy record is an account");
    assert_eq!(account.labels, ["legacy"]);
    assert_eq!(account.auth_params.digits, None);
    assert_eq!(account.auth_params.algorithm, None);
    assert_eq!(serde_json::to_value(&account).unwrap(), original);
    assert_eq!(ids(store), [id]);

    // Its TOTP is SHA-1, 30 s, and takes as many digits as the token has.
    let totp = account.totp().unwrap();
    for digits in [6, 8] {
        let token = support::oathtool(LEGACY_BASE32, digits, "sha1");
        assert!(
            totp.verify(&token, taas::unix_time()).is_some(),
            "oathtool's {digits}-digit token refused"
        );
    }
    let wrong = support::oathtool("JBSWY3DPEHPK3PXP", 6, "sha1");
    assert!(totp.verify(&wrong, taas::unix_time()).is_none());

    // A label edit keeps every field the original wrote, in the store itself.
    let mut edited = account;
    edited.labels.push("legacy-two".into());
    store.update(&edited).unwrap();
    let mut want = original.clone();
    want["labels"] = json!(["legacy", "legacy-two"]);
    assert_eq!(raw.get(id).unwrap(), want, "as stored");
    assert_eq!(
        serde_json::to_value(store.get(id).unwrap().unwrap()).unwrap(),
        want,
        "as read back"
    );
    // An account inserted beside it does not disturb it.
    store.insert(&new_account(&["fresh"])).unwrap();
    assert_eq!(raw.get(id).unwrap(), want);
}

/// Writers racing for the same labels: each label ends with exactly one owner,
/// and every loser is told `LabelTaken`.
fn one_owner_per_label_under_concurrent_inserts(store: &Store) {
    const LABELS: usize = 5;
    const RACERS: usize = 8;
    for l in 0..LABELS {
        let label = format!("contested-{l}");
        let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..RACERS)
                .map(|_| {
                    let account = new_account(&[&label]);
                    scope.spawn(move || store.insert(&account))
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{label}: {results:?}");
        assert!(
            results
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(Error::LabelTaken { .. }))),
            "{results:?}"
        );
    }
    let all = store.list().unwrap();
    assert_eq!(all.len(), LABELS, "one account per label");
}

/// Runs a suite function on a fresh file store and on a fresh Redis store.
macro_rules! on_both_stores {
    ($($suite:ident),* $(,)?) => {
        mod file_store {
            $(
                #[test]
                fn $suite() {
                    let f = super::FileFixture::new();
                    super::$suite(&f.store);
                }
            )*

            #[test]
            fn legacy_record_round_trips() {
                let f = super::FileFixture::new();
                super::legacy_record_round_trips(&f.store, &f);
            }
        }

        mod redis_store {
            $(
                #[test]
                fn $suite() {
                    let r = super::RedisFixture::new();
                    super::$suite(&r.store);
                }
            )*

            #[test]
            fn legacy_record_round_trips() {
                let r = super::RedisFixture::new();
                super::legacy_record_round_trips(&r.store, &r);
            }
        }
    };
}

on_both_stores!(insert_get_list_update_remove, refusals);

#[test]
fn file_store_one_owner_per_label_under_concurrent_inserts() {
    let f = FileFixture::new();
    one_owner_per_label_under_concurrent_inserts(&f.store);
}

#[test]
fn redis_store_one_owner_per_label_under_concurrent_inserts() {
    let r = RedisFixture::new();
    one_owner_per_label_under_concurrent_inserts(&r.store);
}

// ---- Redis only. ----

/// Redis gone is "store unreachable", never "no such account"; once it is back
/// the same `Store` value reconnects by itself.
#[test]
fn redis_outage_is_unavailable_then_reconnects() {
    let mut r = RedisFixture::new();
    let a = new_account(&["outage"]);
    r.store.insert(&a).unwrap();
    assert!(r.store.get(&a.uuid).unwrap().is_some());

    r.server.stop();
    match r.store.get(&a.uuid) {
        Err(e @ Error::StoreUnavailable(_)) => {
            let text = e.to_string();
            assert!(text.contains("redis"), "{text}");
            assert!(text.contains(&r.server.port.to_string()), "{text}");
            assert_eq!(e.status(), 503);
        }
        other => panic!("get with Redis down: {other:?}"),
    }
    for (what, result) in [
        ("list", r.store.list().map(|_| ())),
        ("insert", r.store.insert(&new_account(&["down"]))),
        ("update", r.store.update(&a)),
        ("remove", r.store.remove(&a.uuid)),
        ("ping", r.store.ping()),
    ] {
        assert!(
            matches!(result, Err(Error::StoreUnavailable(_))),
            "{what} with Redis down: {result:?}"
        );
    }
    // Opening a store on a dead Redis fails at once, too.
    assert!(matches!(
        Store::open(&StoreSpec::Redis(r.server.url())),
        Err(Error::StoreUnavailable(_))
    ));

    r.server.restart();
    // No persistence: the restarted server is empty, and says so.
    assert!(r.store.get(&a.uuid).unwrap().is_none());
    r.store.insert(&a).unwrap();
    assert_eq!(r.store.get(&a.uuid).unwrap().unwrap().labels, ["outage"]);
    assert_eq!(ids(&r.store), [a.uuid.as_str()]);
}

/// Keys that are not account records (another program's, or another type) are
/// skipped by `list`, not an error, and not an account for `get`.
#[test]
fn redis_foreign_keys_are_not_accounts() {
    let r = RedisFixture::new();
    let a = new_account(&["mine"]);
    r.store.insert(&a).unwrap();
    let mut c = r.client();
    redis::cmd("SET")
        .arg("not-json")
        .arg("hello")
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("RPUSH")
        .arg("a-list")
        .arg("x")
        .query::<()>(&mut c)
        .unwrap();
    let connections = |c: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("stats").query(c).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = connections(&mut c);
    assert_eq!(ids(&r.store), [a.uuid.as_str()]);
    assert!(r.store.get("not-json").unwrap().is_none());
    assert!(r.store.get("a-list").unwrap().is_none());
    // A WRONGTYPE answer is not a broken connection: no reconnect.
    assert_eq!(connections(&mut c), before, "the store reconnected");
    // `remove` deletes accounts only, never another program's keys.
    for key in ["not-json", "a-list"] {
        match r.store.remove(key) {
            Err(Error::NoSuchAccount(id)) => assert_eq!(id, key),
            other => panic!("remove {key}: {other:?}"),
        }
    }
    let exists: u64 = redis::cmd("EXISTS")
        .arg("not-json")
        .arg("a-list")
        .query(&mut c)
        .unwrap();
    assert_eq!(exists, 2, "a foreign key was deleted");
}

// ---- File only. ----

/// Root writing the relay's store (`sudo taas users add`) in a directory the
/// service user owns is refused, with a message that says to run it as that
/// user: that user could plant a link there for root to follow. Nothing is
/// written.
#[test]
fn file_store_refuses_root_in_another_users_directory() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        println!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
    let path = data.join("accounts.json");
    let store = Store::open(&StoreSpec::File(path.clone())).unwrap();
    let e = store.insert(&new_account(&["first"])).unwrap_err();
    assert!(matches!(e, Error::ForeignOwner { uid: 65534, .. }), "{e}");
    assert!(e.to_string().contains("sudo -u"), "{e}");
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing written"
    );
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), 65534);
}

/// Every read goes to the file: a second instance sees the first one's writes
/// (and the other way round) without being reopened.
#[test]
fn file_store_instances_see_each_other() {
    let f = FileFixture::new();
    let other = Store::open(&StoreSpec::File(f.path.clone())).unwrap();
    let a = new_account(&["shared"]);
    f.store.insert(&a).unwrap();
    assert!(other.get(&a.uuid).unwrap().is_some());

    let mut a2 = other.get(&a.uuid).unwrap().unwrap();
    a2.labels = vec!["renamed".into()];
    other.update(&a2).unwrap();
    assert_eq!(f.store.get(&a.uuid).unwrap().unwrap().labels, ["renamed"]);

    // The label check sees the other instance's accounts too.
    assert!(matches!(
        f.store.insert(&new_account(&["renamed"])),
        Err(Error::LabelTaken { .. })
    ));

    other.remove(&a.uuid).unwrap();
    assert!(f.store.get(&a.uuid).unwrap().is_none());
    assert!(matches!(
        f.store.remove(&a.uuid),
        Err(Error::NoSuchAccount(_))
    ));

    // The file holds the secrets: mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&f.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// `taas users add LABEL -c CONFIG --out OUT` as a child process; its stderr
/// when it fails.
fn add_in_child(cwd: &Path, config: &Path, out: &Path, label: &str) -> Result<(), String> {
    let (config, out) = (config.to_str().unwrap(), out.to_str().unwrap());
    let args = ["users", "add", label, "-c", config, "--out", out];
    match support::taas_within(cwd, &args, CHILD_LIMIT) {
        (true, _, _) => Ok(()),
        (false, _, stderr) => Err(format!("users add {label}: {}", stderr.trim_end())),
    }
}

/// Writers in separate processes at once lose none of each other's accounts.
#[test]
fn file_store_concurrent_processes_lose_nothing() {
    const WRITERS: usize = 2;
    const EACH: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("data/accounts.json");
    let config = dir.path().join("taas.toml");
    std::fs::write(
        &config,
        format!("store = \"file:{}\"\ntls = false\n", accounts.display()),
    )
    .unwrap();
    let out = dir.path().join("prov");

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (cwd, config, out) = (dir.path().to_path_buf(), config.clone(), out.clone());
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|i| add_in_child(&cwd, &config, &out, &format!("w{w}-{i}")))
                    .filter_map(Result::err)
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    let failures: Vec<String> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");

    let (ok, stdout, err) = support::taas_within(
        dir.path(),
        &["users", "list", "-c", config.to_str().unwrap()],
        CHILD_LIMIT,
    );
    assert!(ok, "{err}");
    let mut labels: Vec<&str> = stdout
        .lines()
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    labels.sort();
    let mut want: Vec<String> = (0..WRITERS)
        .flat_map(|w| (0..EACH).map(move |i| format!("w{w}-{i}")))
        .collect();
    want.sort();
    assert_eq!(labels, want, "every account made is listed");

    // Every provisioning file written belongs to a stored account.
    let store = Store::open(&StoreSpec::File(accounts)).unwrap();
    let files = json_files(&out);
    assert_eq!(files.len(), WRITERS * EACH);
    for file in files {
        let p = taas::provision::Provision::load(&file).unwrap();
        let a = store.get(p.id()).unwrap().expect("account of a file");
        assert_eq!(a.auth_params.base32, p.base32);
    }
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect()
}
