//! Accounts (docs/PROTOCOL.md section 5) behind one enum over two stores: an embedded
//! JSON file, or Redis in the original taas-server's layout (key = ID, value = the
//! JSON record).
//!
//! Invariants:
//! - a record's unknown fields (the original's `authURL`, `qrcodeURL`, …) survive
//!   every read and write;
//! - the file store writes a temporary file, fsyncs it, renames it over the old
//!   one and fsyncs the directory, all under an exclusive lock on `PATH.lock`, so a
//!   crash leaves the old file whole and two writers never lose each other's work;
//!   every read goes to the file, so another process's change is seen at once;
//! - Redis failures are `StoreUnavailable`, never "no such account"; a dropped
//!   connection is re-opened on the next call (through Sentinel, at the server
//!   the sentinels name master then).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::label;
use crate::redis_link::RedisLink;
use crate::sys::{
    NOFOLLOW, create_private_dir, random_bytes, refuse_foreign_dir, refuse_symlink, write_private,
};
use crate::totp::{Algorithm, Totp};

/// All the time one store call may take, waiting for the connection included
/// (well inside `head_timeout`'s default of 10 s): a stalled Redis costs each
/// registration at most this.
pub const STORE_DEADLINE: Duration = Duration::from_secs(3);
/// Store calls that may wait for the Redis connection at once; beyond, an
/// immediate 503 (so a stalled Redis cannot hold every connection slot of the
/// well-known port).
pub const MAX_STORE_WAITERS: usize = 8;
/// The Redis key that serialises account writes (not an account: not JSON).
pub const WRITE_LOCK: &str = "taas:write-lock";
/// A write lock left by a dead writer expires after this long.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// How long a writer waits for the lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Keys fetched per Redis `SCAN` round.
const SCAN_COUNT: usize = 200;

/// Where accounts live, as the `store` key says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `file:PATH`.
    File(PathBuf),
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` or
    /// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`, kept
    /// whole for `RedisLink`.
    Redis(String),
}

impl StoreSpec {
    /// Parses the `store` key.
    pub fn parse(text: &str) -> std::result::Result<StoreSpec, String> {
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path".into());
            }
            return Ok(StoreSpec::File(PathBuf::from(path)));
        }
        if RedisLink::is_url(text) {
            RedisLink::parse(text, 1).map_err(|e| e.to_string())?;
            return Ok(StoreSpec::Redis(text.to_string()));
        }
        Err("expected file:PATH, redis://[:PASSWORD@]HOST:PORT[/DB] or \
             redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]"
            .into())
    }

    /// For log lines: the file, or Redis's address without the password.
    pub fn describe(&self) -> String {
        match self {
            StoreSpec::File(p) => format!("file:{}", p.display()),
            StoreSpec::Redis(url) => match RedisLink::parse(url, 1) {
                Ok(link) => format!("redis {}", link.describe()),
                Err(_) => "redis".into(),
            },
        }
    }
}

/// An account record, in the original's JSON layout.
#[derive(Clone, Serialize, Deserialize)]
pub struct Account {
    /// The ID.
    pub uuid: String,
    /// Labels this ID may register, lower case.
    pub labels: Vec<String>,
    /// How it authenticates.
    #[serde(rename = "authParams")]
    pub auth_params: AuthParams,
    /// Fields this version does not know, kept as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// TOTP parameters of an account.
#[derive(Clone, Serialize, Deserialize)]
pub struct AuthParams {
    /// Always "totp".
    pub protocol: String,
    /// The secret, base32.
    pub base32: String,
    /// Seconds per step; 30 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// "sha1", "sha256" or "sha512"; sha1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Code length; absent in legacy records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digits: Option<u32>,
    /// Fields this version does not know (the original kept `ascii`, `hex`, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl std::fmt::Debug for Account {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("uuid", &self.uuid)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Account {
    /// A new account: random UUID unless `id` is given, 160 random bits of secret
    /// (RFC 4226 section 4 recommends 160), SHA-1, 6 digits, 30 s.
    pub fn new(id: Option<&str>, labels: &[String]) -> Result<Account> {
        let uuid = match id {
            Some(id) => parse_uuid(id)?,
            None => new_uuid()?,
        };
        let labels = labels
            .iter()
            .map(|l| label::Entry::parse(l).map(|e| e.stored()))
            .collect::<Result<Vec<_>>>()?;
        let mut secret = [0u8; 20];
        random_bytes(&mut secret)?;
        Ok(Account {
            uuid,
            labels,
            auth_params: AuthParams {
                protocol: "totp".into(),
                base32: crate::totp::encode_base32(&secret),
                step: Some(30),
                algorithm: Some("sha1".into()),
                digits: Some(6),
                extra: Map::new(),
            },
            extra: Map::new(),
        })
    }

    /// The TOTP of this account, checked.
    pub fn totp(&self) -> Result<Totp> {
        let bad = |reason: String| Error::BadAccount {
            id: self.uuid.clone(),
            reason,
        };
        let p = &self.auth_params;
        if !p.protocol.eq_ignore_ascii_case("totp") {
            return Err(bad(format!("protocol {:?} is not totp", p.protocol)));
        }
        let algorithm = match &p.algorithm {
            None => Algorithm::Sha1,
            Some(a) => Algorithm::parse(a).ok_or_else(|| bad(format!("algorithm {a:?}")))?,
        };
        Totp::new(&p.base32, p.step.unwrap_or(30), p.digits, algorithm)
            .map_err(|e| bad(e.to_string()))
    }

    /// Does this account own `label` (already lower case)? An entry `LABEL:PORT`
    /// owns LABEL.
    pub fn owns(&self, label: &str) -> bool {
        self.labels
            .iter()
            .any(|l| entry_name(l).eq_ignore_ascii_case(label))
    }

    /// The fixed rendezvous port of `label`, when its entry is `LABEL:PORT`.
    pub fn fixed_port(&self, label: &str) -> Option<u16> {
        self.labels
            .iter()
            .filter_map(|l| label::Entry::parse(l).ok())
            .find(|e| e.name == label)
            .and_then(|e| e.port)
    }

    /// The fixed ports of this account's labels.
    pub fn fixed_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.labels
            .iter()
            .filter_map(|l| label::Entry::parse(l).ok()?.port)
    }
}

/// The label part of a stored entry (`cam` of `cam:8888`).
fn entry_name(entry: &str) -> &str {
    entry.split_once(':').map_or(entry, |(name, _)| name)
}

/// A random (version 4) UUID, RFC 9562 section 5.4.
pub fn new_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Checks the shape of a UUID (8-4-4-4-12 hex) and returns it in lower case.
pub fn parse_uuid(text: &str) -> Result<String> {
    let groups: Vec<&str> = text.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.bytes().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(Error::BadId(text.chars().take(80).collect()))
    }
}

/// The account store: one of two kinds.
pub enum Store {
    /// A JSON file on local disk.
    File(FileStore),
    /// A Redis server (boxed: its client is much larger than a path).
    Redis(Box<RedisStore>),
}

impl Store {
    /// Opens the store; a Redis store is pinged so a bad address shows at once.
    pub fn open(spec: &StoreSpec) -> Result<Store> {
        match spec {
            StoreSpec::File(path) => Ok(Store::File(FileStore::new(path))),
            StoreSpec::Redis(url) => {
                let store = RedisStore::new(url)?;
                store.ping()?;
                Ok(Store::Redis(Box::new(store)))
            }
        }
    }

    /// The account with this ID, if any.
    pub fn get(&self, id: &str) -> Result<Option<Account>> {
        match self {
            Store::File(s) => Ok(s.read()?.remove(id)),
            Store::Redis(s) => s.get(id),
        }
    }

    /// Every account, ordered by ID.
    pub fn list(&self) -> Result<Vec<Account>> {
        match self {
            Store::File(s) => Ok(s.read()?.into_values().collect()),
            Store::Redis(s) => s.list(),
        }
    }

    /// Adds a new account; refuses an existing ID or a label another ID owns.
    pub fn insert(&self, account: &Account) -> Result<()> {
        self.write(account, true)
    }

    /// Replaces an existing account (label edits); refuses a label another owns.
    pub fn update(&self, account: &Account) -> Result<()> {
        self.write(account, false)
    }

    fn write(&self, account: &Account, new: bool) -> Result<()> {
        match self {
            Store::File(s) => s.modify(|map| {
                check_write(map.values(), account, new, map.contains_key(&account.uuid))?;
                map.insert(account.uuid.clone(), account.clone());
                Ok(())
            }),
            Store::Redis(s) => s.locked(|| {
                let all = s.list()?;
                let exists = all.iter().any(|a| a.uuid == account.uuid);
                check_write(all.iter(), account, new, exists)?;
                s.set(account, new)
            }),
        }
    }

    /// Deletes an account; `NoSuchAccount` when there is none.
    pub fn remove(&self, id: &str) -> Result<()> {
        let removed = match self {
            Store::File(s) => {
                let mut found = false;
                s.modify(|map| {
                    found = map.remove(id).is_some();
                    Ok(())
                })?;
                found
            }
            // Only a key that holds an account: a shared Redis has others.
            Store::Redis(s) => s.locked(|| match s.get(id)? {
                Some(_) => s.del(id),
                None => Ok(false),
            })?,
        };
        if removed {
            Ok(())
        } else {
            Err(Error::NoSuchAccount(id.to_string()))
        }
    }

    /// Does the store answer? (The status page's `/ready`.)
    pub fn ping(&self) -> Result<()> {
        match self {
            Store::File(s) => s.read().map(|_| ()),
            Store::Redis(s) => s.ping(),
        }
    }
}

/// The checks shared by both stores before a write.
fn check_write<'a>(
    others: impl Iterator<Item = &'a Account>,
    account: &Account,
    new: bool,
    exists: bool,
) -> Result<()> {
    if new && exists {
        return Err(Error::AccountExists(account.uuid.clone()));
    }
    if !new && !exists {
        return Err(Error::NoSuchAccount(account.uuid.clone()));
    }
    let ports: Vec<u16> = account.fixed_ports().collect();
    if let Some(port) = ports
        .iter()
        .enumerate()
        .find_map(|(i, p)| ports[..i].contains(p).then_some(*p))
    {
        return Err(Error::PortTaken {
            port,
            owner: account.uuid.clone(),
        });
    }
    for other in others.filter(|a| a.uuid != account.uuid) {
        if let Some(l) = account.labels.iter().find(|l| other.owns(entry_name(l))) {
            return Err(Error::LabelTaken {
                label: l.clone(),
                owner: other.uuid.clone(),
            });
        }
        if let Some(port) = account
            .fixed_ports()
            .find(|p| other.fixed_ports().any(|q| q == *p))
        {
            return Err(Error::PortTaken {
                port,
                owner: other.uuid.clone(),
            });
        }
    }
    Ok(())
}

/// Accounts as a JSON object of ID to record, in one file.
pub struct FileStore {
    /// The JSON file.
    path: PathBuf,
}

type AccountMap = BTreeMap<String, Account>;

impl FileStore {
    /// A store at `path` (created on first write).
    pub fn new(path: &Path) -> FileStore {
        FileStore {
            path: path.to_path_buf(),
        }
    }

    /// The accounts as on disk now; an absent file is an empty store.
    pub fn read(&self) -> Result<AccountMap> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AccountMap::new()),
            // Out of descriptors, a vanished disk…: unreachable, 503 (not 500).
            Err(e) => {
                return Err(Error::StoreUnavailable(format!(
                    "{}: {e}",
                    self.path.display()
                )));
            }
        };
        if text.trim().is_empty() {
            return Ok(AccountMap::new());
        }
        serde_json::from_str(&text).map_err(|e| Error::FileContent {
            path: self.path.clone(),
            reason: format!("not an accounts file: {e}"),
        })
    }

    /// Read-modify-write under the lock, then an atomic replace. Run as root
    /// against a directory of another user, refused: root would otherwise
    /// write where that user can plant links.
    fn modify(&self, change: impl FnOnce(&mut AccountMap) -> Result<()>) -> Result<()> {
        refuse_foreign_dir(self.dir())?;
        refuse_symlink(&self.path)?;
        // Root replacing another user's store would leave it root's and 0600:
        // unreadable for the relay.
        refuse_foreign_dir(&self.path)?;
        let _lock = self.lock()?;
        let mut map = self.read()?;
        change(&mut map)?;
        let mut text = serde_json::to_vec_pretty(&map).map_err(|e| Error::FileContent {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        text.push(b'\n');
        write_private(&self.path, &text, 0o600)?;
        let dir = self.dir();
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::file(dir, "sync", e))
    }

    /// The directory the store lives in.
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    /// Takes the exclusive lock on `PATH.lock` (never through a symlink),
    /// creating the directory if needed.
    fn lock(&self) -> Result<File> {
        create_private_dir(self.dir())?;
        let lock_path = sibling(&self.path, "lock");
        refuse_symlink(&lock_path)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| Error::file(&lock_path, "open", e))?;
        file.lock()
            .map_err(|e| Error::file(&lock_path, "lock", e))?;
        Ok(file)
    }
}

/// `PATH.EXT` beside `PATH`.
fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Accounts in Redis, one key per ID.
pub struct RedisStore {
    /// Where Redis is, and the store's one connection.
    link: RedisLink,
    /// `HOST:PORT` for messages (no password).
    addr: String,
}

impl RedisStore {
    /// A store for `url`; does not connect yet.
    pub fn new(url: &str) -> Result<RedisStore> {
        let link = RedisLink::parse(url, MAX_STORE_WAITERS)?;
        let addr = link.describe().to_string();
        Ok(RedisStore { link, addr })
    }

    /// Runs `f` on the store's connection (`RedisLink::with`), within
    /// `STORE_DEADLINE` and among at most `MAX_STORE_WAITERS` callers.
    fn with<T>(&self, f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> Result<T> {
        self.link.with(STORE_DEADLINE, f)
    }

    /// Where this store's Redis is (the shared directory opens its own
    /// connections there).
    pub fn link(&self) -> &RedisLink {
        &self.link
    }

    fn ping(&self) -> Result<()> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    /// Runs `f` holding the store's write lock (`WRITE_LOCK`, `SET NX PX`), so the
    /// label check and the write of two writers never interleave. The lock
    /// expires by itself after `LOCK_TTL` if its holder dies; it is released
    /// only by its holder (compare-and-delete in one Lua script).
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut token = [0u8; 16];
        random_bytes(&mut token)?;
        let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let ttl = LOCK_TTL.as_millis() as u64;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            let got: Option<String> = self.with(|c| {
                redis::cmd("SET")
                    .arg(WRITE_LOCK)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query(c)
            })?;
            if got.is_some() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::StoreUnavailable(format!(
                    "redis {}: write lock {WRITE_LOCK} held elsewhere for {} s",
                    self.addr,
                    LOCK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = f();
        let release = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";
        let _ = self.with(|c| {
            redis::cmd("EVAL")
                .arg(release)
                .arg(1)
                .arg(WRITE_LOCK)
                .arg(&token)
                .query::<i64>(c)
        });
        result
    }

    fn get(&self, id: &str) -> Result<Option<Account>> {
        Ok(self.raw(id)?.and_then(|text| parse_record(id, &text)))
    }

    /// The string value of `key`; `None` for no key or a key of another type.
    fn raw(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| match redis::cmd("GET").arg(key).query(c) {
            // A key of another type (a list, a hash…): not an account.
            Err(e) if e.code() == Some("WRONGTYPE") => Ok(None),
            other => other,
        })
    }

    fn list(&self) -> Result<Vec<Account>> {
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = self.with(|c| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query(c)
            })?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(a) = self.get(&key)? {
                out.push(a);
            }
        }
        Ok(out)
    }

    fn set(&self, account: &Account, new: bool) -> Result<()> {
        let json = serde_json::to_string(account).map_err(|e| Error::BadAccount {
            id: account.uuid.clone(),
            reason: e.to_string(),
        })?;
        let flag = if new { "NX" } else { "XX" };
        let done: Option<String> = self.with(|c| {
            redis::cmd("SET")
                .arg(&account.uuid)
                .arg(&json)
                .arg(flag)
                .query(c)
        })?;
        match (done, new) {
            (Some(_), _) => Ok(()),
            // A first try that timed out may have landed before the retry.
            (None, true) if self.raw(&account.uuid)?.as_deref() == Some(json.as_str()) => Ok(()),
            (None, true) => Err(Error::AccountExists(account.uuid.clone())),
            (None, false) => Err(Error::NoSuchAccount(account.uuid.clone())),
        }
    }

    fn del(&self, id: &str) -> Result<bool> {
        self.with(|c| redis::cmd("DEL").arg(id).query::<i64>(c))
            .map(|n| n > 0)
    }
}

/// A Redis value as an account, or `None` (logged) when it is not one.
fn parse_record(key: &str, text: &str) -> Option<Account> {
    match serde_json::from_str::<Account>(text) {
        Ok(a) => Some(a),
        Err(e) => {
            log::debug!("redis key {key:?} is not an account record: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The original taas-server's record, as its users.js wrote it.
    pub const LEGACY: &str = r#"{"uuid":"3b4cdb26-6a2c-4b8b-93e4-d8c3c0a1c7a1","labels":["demo"],
        "authParams":{"protocol":"totp","base32":"JBSWY3DPEHPK3PXP","ascii":"Hello!","step":30},
        "authURL":"totp://JBSWY3DPEHPK3PXP/taas?step=30","qrcodeURL":"https://chart.example/qr"}"#;

    #[test]
    fn legacy_record_keeps_extra_fields() {
        let a: Account = serde_json::from_str(LEGACY).unwrap();
        assert_eq!(a.auth_params.digits, None);
        assert!(a.totp().is_ok());
        let back: Value = serde_json::to_value(&a).unwrap();
        let orig: Value = serde_json::from_str(LEGACY).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn new_account_shape() {
        let a = Account::new(None, &["Demo".into()]).unwrap();
        assert!(parse_uuid(&a.uuid).is_ok());
        assert_eq!(a.uuid.as_bytes()[14], b'4');
        assert_eq!(a.labels, ["demo"]);
        assert_eq!(a.auth_params.base32.len(), 32, "160 bits");
        assert!(!format!("{a:?}").contains(&a.auth_params.base32));
        assert!(Account::new(Some("nope"), &["x".into()]).is_err());
        assert!(Account::new(None, &["-x".into()]).is_err());
    }

    #[test]
    fn crash_between_write_and_rename_keeps_old_file() {
        let dir = std::env::temp_dir().join(format!("taas-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = FileStore::new(&dir.join("accounts.json"));
        let a = Account::new(None, &["one".into()]).unwrap();
        store
            .modify(|m| {
                m.insert(a.uuid.clone(), a.clone());
                Ok(())
            })
            .unwrap();
        let before = fs::read(dir.join("accounts.json")).unwrap();
        // A writer that died after writing its temporary file, before the rename.
        let tmp = dir.join(".accounts.json.0123456789abcdef.tmp");
        fs::write(&tmp, b"{ half").unwrap();
        assert_eq!(fs::read(dir.join("accounts.json")).unwrap(), before);
        assert_eq!(store.read().unwrap().len(), 1);
        // The next writer is not disturbed by the leftover.
        let c = Account::new(None, &["three".into()]).unwrap();
        Store::File(FileStore::new(&dir.join("accounts.json")))
            .insert(&c)
            .unwrap();
        assert_eq!(store.read().unwrap().len(), 2);
        let mode = fs::metadata(dir.join("accounts.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            fs::read(&tmp).unwrap(),
            b"{ half",
            "another's file untouched"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_fixed_port_twice_in_an_account_is_refused() {
        let dir = tempfile_dir("ports");
        let store = Store::File(FileStore::new(&dir.join("accounts.json")));
        let a = Account::new(None, &["a:8888".into(), "b:8888".into()]).unwrap();
        assert!(matches!(
            store.insert(&a),
            Err(Error::PortTaken { port: 8888, .. })
        ));
        let b = Account::new(None, &["a:8888".into(), "b:8889".into()]).unwrap();
        store.insert(&b).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn planted_symlinks_are_refused_and_their_targets_untouched() {
        let dir = tempfile_dir("links");
        let target = dir.join("target");
        fs::write(&target, b"precious").unwrap();
        let store = Store::File(FileStore::new(&dir.join("accounts.json")));
        let a = Account::new(None, &["one".into()]).unwrap();
        for planted in ["accounts.json.lock", "accounts.json"] {
            let link = dir.join(planted);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let e = store.insert(&a).unwrap_err();
            assert!(matches!(e, Error::Symlink(_)), "{planted}: {e}");
            assert_eq!(fs::read(&target).unwrap(), b"precious", "{planted}");
            fs::remove_file(&link).unwrap();
        }
        store.insert(&a).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh directory under the system's temporary one.
    fn tempfile_dir(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("taas-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
