//! The `taas` binary as operators and scripts use it (docs/INTERFACE.md), each test in
//! a fresh temporary directory: `users add|list|remove`, `token`, `cert`, and the
//! rule that every failure is one line on stderr and a non-zero exit.
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::{RedisServer, oathtool};
use taas::store::{Store, StoreSpec};
use taas::totp::{Algorithm, Totp};

/// Longest any one `taas` run may take before it is killed: a guard against a
/// hang, not a measurement.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// `taas ARGS` in `dir`; returns (exit ok, stdout, stderr).
fn taas(dir: &Path, args: &[&str]) -> (bool, String, String) {
    support::taas_within(dir, args, RUN_LIMIT)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Asserts a failed run with exactly one line on stderr; returns that line.
fn one_line_error(run: (bool, String, String), what: &str) -> String {
    let (ok, stdout, stderr) = run;
    assert!(!ok, "{what}: should fail; stdout {stdout:?}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: stderr must be one line: {stderr:?}"
    );
    assert!(stderr.ends_with('\n'), "{what}: {stderr:?}");
    stderr.trim_end().to_string()
}

/// Writes `taas.toml` in `dir` with `text`; returns its path as a string.
fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("taas.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// A config with a file store and no TLS, so no certificate is needed.
fn plain_config(dir: &Path) -> String {
    write_config(
        dir,
        &format!(
            "store = \"file:{}/accounts.json\"\ntls = false\n",
            dir.display()
        ),
    )
}

/// `taas users add ARGS` in `dir`, which must succeed; returns the ID.json path.
fn add(dir: &Path, args: &[&str]) -> PathBuf {
    let mut all = vec!["users", "add"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = taas(dir, &all);
    assert!(ok, "users add {args:?}: {stderr}");
    dir.join(stdout.lines().next().expect("a path on stdout"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The JSON object inside a legacy `exports.params = {…};` file.
fn js_params(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let body = text
        .strip_prefix("exports.params = ")
        .and_then(|t| t.trim_end().strip_suffix(';'))
        .unwrap_or_else(|| panic!("not exports.params = {{…}};: {text}"));
    serde_json::from_str(body).unwrap()
}

/// Files (not directories) in `dir`, by name.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// `users list` lines as (ID, labels).
fn list(dir: &Path, config: &[&str]) -> Vec<(String, String)> {
    let mut args = vec!["users", "list"];
    args.extend_from_slice(config);
    let (ok, stdout, stderr) = taas(dir, &args);
    assert!(ok, "users list: {stderr}");
    stdout
        .lines()
        .map(|l| {
            let (id, labels) = l.split_once(' ').unwrap_or((l, ""));
            (id.to_string(), labels.to_string())
        })
        .collect()
}

/// With no config at all, `users add` uses the built-in defaults: the file store
/// and certificate under `taas-data/`, and a provisioning file with every field of
/// docs/PROTOCOL.md section 5.
#[test]
fn users_add_with_embedded_defaults_writes_complete_provisioning_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, stdout, stderr) = taas(d, &["users", "add", "demo"]);
    assert!(ok, "{stderr}");
    let first = stdout.lines().next().unwrap();
    let json_path = d.join(first);
    assert!(json_path.is_file(), "first line {first:?} is not the file");
    let id = json_path.file_stem().unwrap().to_str().unwrap().to_string();
    assert!(taas::store::parse_uuid(&id).is_ok(), "{id}");
    assert_eq!(json_path.extension().unwrap(), "json");
    let js_path = json_path.with_extension("js");

    // The defaults' files.
    let data = d.join("taas-data");
    let crt = data.join("registrar.crt");
    assert!(data.join("accounts.json").is_file());
    assert_eq!(mode(&data.join("accounts.json")), 0o600);
    assert_eq!(mode(&crt), 0o444);
    assert_eq!(mode(&data.join("registrar.key")), 0o400);

    // Both provisioning files hold the secret: 0600.
    assert_eq!(mode(&json_path), 0o600);
    assert_eq!(mode(&js_path), 0o600);

    let v = read_json(&json_path);
    assert_eq!(v["uuid"], serde_json::json!([id]));
    assert_eq!(v["labels"], serde_json::json!(["demo"]));
    let secret = v["base32"].as_str().unwrap();
    assert_eq!(
        taas::totp::decode_base32(secret).unwrap().len(),
        20,
        "160-bit secret"
    );
    assert_eq!(v["step"], 30);
    assert_eq!(v["digits"], 6);
    assert_eq!(v["algorithm"], "sha1");
    assert_eq!(v["protocol"], "totp");
    assert_eq!(v["name"], "demo.taas.localhost");
    assert_eq!(v["issuer"], "https://registrar.localhost");
    assert_eq!(v["server"]["hostname"], "127.0.0.1");
    assert_eq!(v["server"]["port"], 8443);
    let pem = std::fs::read_to_string(&crt).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    // On a new installation the CA signed the registrar's certificate: the CA
    // alone verifies it, and is what server.ca carries.
    let ca = std::fs::read_to_string(data.join("ca.crt")).unwrap();
    assert_eq!(mode(&data.join("ca.crt")), 0o444);
    assert_eq!(mode(&data.join("ca.key")), 0o400);
    assert_eq!(v["server"]["ca"], ca.as_str());
    // And the label certificate with its key, beside ID.json.
    for ext in ["crt", "key"] {
        assert_eq!(mode(&json_path.with_extension(ext)), 0o600, "{ext}");
    }

    // The legacy file holds the same object.
    assert_eq!(js_params(&js_path), v);

    // The store holds the same secret under the same ID.
    let store = Store::open(&StoreSpec::File(data.join("accounts.json"))).unwrap();
    let account = store.get(&id).unwrap().expect("account stored");
    assert_eq!(account.labels, ["demo"]);
    assert_eq!(account.auth_params.base32, secret);

    // The secret goes to the files only: never on stdout or stderr.
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
}

/// `users list` shows ID and labels and never the secret; `users remove` deletes;
/// `-c` defaults to `./taas.toml`.
#[test]
fn users_list_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plain_config(d);
    assert!(list(d, &[]).is_empty());
    let one = read_json(&add(d, &["demo"]));
    let two = read_json(&add(d, &["other"]));
    let id1 = one["uuid"][0].as_str().unwrap().to_string();
    let id2 = two["uuid"][0].as_str().unwrap().to_string();
    // The ./taas.toml store was used, not the defaults.
    assert!(d.join("accounts.json").is_file());
    assert!(!d.join("taas-data").exists());

    let (ok, stdout, _) = taas(d, &["users", "list"]);
    assert!(ok);
    for p in [&one, &two] {
        let secret = p["base32"].as_str().unwrap();
        assert!(!stdout.contains(secret), "list shows a secret");
    }
    let mut want = vec![(id1.clone(), "demo".into()), (id2.clone(), "other".into())];
    want.sort();
    assert_eq!(list(d, &[]), want);

    let (ok, _, stderr) = taas(d, &["users", "remove", &id1]);
    assert!(ok, "{stderr}");
    assert_eq!(list(d, &[]), [(id2.clone(), "other".to_string())]);
    let line = one_line_error(taas(d, &["users", "remove", &id1]), "remove twice");
    assert!(line.contains(&id1), "{line}");

    // The same through an explicit -c from elsewhere.
    let elsewhere = tempfile::tempdir().unwrap();
    let config = d.join("taas.toml");
    let c = ["-c", config.to_str().unwrap()];
    assert_eq!(list(elsewhere.path(), &c), [(id2, "other".to_string())]);
}

/// `--id UUID` is used (in lower case); a malformed one or a taken one is refused
/// and leaves no account and no file behind.
#[test]
fn users_add_id_option() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plain_config(d);
    let out = d.join("out");
    let out_s = out.to_str().unwrap();
    let upper = "3B4CDB26-6A2C-4B8B-93E4-D8C3C0A1C7A1";
    let lower = upper.to_ascii_lowercase();
    let path = add(d, &["demo", "--id", upper, "--out", out_s]);
    assert_eq!(path, out.join(format!("{lower}.json")));
    assert_eq!(read_json(&path)["uuid"][0], lower.as_str());
    assert_eq!(list(d, &[]), [(lower.clone(), "demo".to_string())]);

    for bad in [
        "nope",
        "3b4cdb26-6a2c-4b8b-93e4",
        "3b4cdb26-6a2c-4b8b-93e4-d8c3c0a1c7ag",
    ] {
        let line = one_line_error(
            taas(d, &["users", "add", "fresh", "--id", bad, "--out", out_s]),
            bad,
        );
        assert!(line.contains(bad) && line.contains("UUID"), "{line}");
    }
    let line = one_line_error(
        taas(
            d,
            &["users", "add", "fresh", "--id", &lower, "--out", out_s],
        ),
        "existing ID",
    );
    assert!(line.contains(&lower) && line.contains("exists"), "{line}");
    assert_eq!(list(d, &[]), [(lower.clone(), "demo".to_string())]);
    assert_eq!(
        file_names(&out),
        [format!("{lower}.js"), format!("{lower}.json")]
    );
}

/// `taas token FILE` prints what `oathtool` computes for the same secret, from
/// the JSON file, the legacy `.js` file, and a file with other parameters.
#[test]
fn token_agrees_with_oathtool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plain_config(d);
    let json_path = add(d, &["demo"]);
    let js_path = json_path.with_extension("js");
    let mut v = read_json(&json_path);
    let secret = v["base32"].as_str().unwrap().to_string();

    // Another file: SHA-256, 8 digits.
    v["algorithm"] = "sha256".into();
    v["digits"] = 8.into();
    let other = d.join("other.json");
    std::fs::write(&other, v.to_string()).unwrap();

    for (file, digits, alg) in [
        (&json_path, 6, "sha1"),
        (&js_path, 6, "sha1"),
        (&other, 8, "sha256"),
    ] {
        // The token is computed between the two oathtool runs, so it equals one
        // of them even when a 30 s step boundary falls in between.
        let before = oathtool(&secret, digits, alg);
        let (ok, stdout, stderr) = taas(d, &["token", file.to_str().unwrap()]);
        let after = oathtool(&secret, digits, alg);
        assert!(ok, "{}: {stderr}", file.display());
        let token = stdout.trim_end();
        assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
        assert_eq!(token.len(), digits as usize);
        assert!(
            token == before || token == after,
            "{}: taas {token}, oathtool {before} then {after}",
            file.display()
        );
    }

    let line = one_line_error(taas(d, &["token", "/nonexistent.json"]), "token missing");
    assert!(line.contains("/nonexistent.json"), "{line}");
    let junk = d.join("junk.json");
    std::fs::write(&junk, "not json").unwrap();
    one_line_error(taas(d, &["token", junk.to_str().unwrap()]), "token junk");
}

/// The library's TOTP agrees with `oathtool` on fresh secrets for every algorithm
/// and code length it supports.
#[test]
fn library_totp_agrees_with_oathtool() {
    for (alg, name, len) in [
        (Algorithm::Sha1, "sha1", 20),
        (Algorithm::Sha256, "sha256", 32),
        (Algorithm::Sha512, "sha512", 64),
    ] {
        for digits in [6, 8] {
            let mut key = vec![0u8; len];
            taas::sys::random_bytes(&mut key).unwrap();
            let secret = taas::totp::encode_base32(&key);
            let totp = Totp::new(&secret, 30, Some(digits), alg).unwrap();
            let before = oathtool(&secret, digits, name);
            let token = totp.generate(taas::unix_time());
            let after = oathtool(&secret, digits, name);
            assert!(
                token == before || token == after,
                "{name}/{digits}: taas {token}, oathtool {before} then {after}"
            );
            assert!(totp.verify(&before, taas::unix_time()).is_some());
        }
    }
}

/// `taas cert -c`: key 0400, certificate 0444, and never over existing files.
#[test]
fn cert_modes_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = write_config(
        d,
        &format!(
            "cert = \"{0}/keys/relay.crt\"\nkey = \"{0}/keys/relay.key\"\n",
            d.display()
        ),
    );
    let (ok, stdout, stderr) = taas(d, &["cert", "-c", &config]);
    assert!(ok, "{stderr}");
    let crt = d.join("keys/relay.crt");
    let key = d.join("keys/relay.key");
    assert_eq!(stdout.lines().next().unwrap(), crt.to_str().unwrap());
    assert_eq!(mode(&key), 0o400);
    assert_eq!(mode(&crt), 0o444);
    let crt_pem = std::fs::read(&crt).unwrap();
    let key_pem = std::fs::read(&key).unwrap();
    assert!(crt_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    assert!(key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
    // What was written is a usable server certificate.
    assert!(taas::tls::server_config(&crt, &key).is_ok());

    let line = one_line_error(taas(d, &["cert", "-c", &config]), "second cert");
    assert!(line.contains("exists"), "{line}");
    // Either file alone present is refused too.
    std::fs::remove_file(&key).unwrap();
    one_line_error(taas(d, &["cert", "-c", &config]), "cert without key");
    assert!(!key.exists(), "a lone key was made");
    assert_eq!(std::fs::read(&crt).unwrap(), crt_pem);

    // The certificate cannot be written (its directory is a file): no key stays
    // behind to block the next try.
    std::fs::write(d.join("a-file"), "").unwrap();
    let config = write_config(
        d,
        &format!(
            "cert = \"{0}/a-file/relay.crt\"\nkey = \"{0}/keys2/relay.key\"\n",
            d.display()
        ),
    );
    let line = one_line_error(taas(d, &["cert", "-c", &config]), "unwritable cert");
    assert!(line.contains("a-file"), "{line}");
    assert!(!d.join("keys2/relay.key").exists(), "a lone key was left");
}

/// Each failure is one line on stderr naming what is wrong, and a non-zero exit.
#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Unknown config key: the key and the file are named.
    let bad = write_config(d, "store = \"file:accounts.json\"\nprot = 1\n");
    for args in [
        vec!["users", "list", "-c", &bad],
        vec!["users", "add", "demo", "-c", &bad],
        vec!["cert", "-c", &bad],
    ] {
        let line = one_line_error(taas(d, &args), "unknown key");
        assert!(line.contains("prot") && line.contains(&bad), "{line}");
    }
    // A bad value: key and file named.
    let bad_value = write_config(d, "port_range = \"9-1\"\n");
    let line = one_line_error(taas(d, &["users", "list", "-c", &bad_value]), "bad value");
    assert!(
        line.contains("port_range") && line.contains(&bad_value),
        "{line}"
    );

    // Unreadable config file.
    let line = one_line_error(
        taas(d, &["users", "list", "-c", "/nonexistent"]),
        "no config",
    );
    assert!(line.contains("/nonexistent"), "{line}");

    // No command at all.
    one_line_error(taas(d, &[]), "no command");

    // Bad labels (after `--`, so a leading `-` is a label, not a flag).
    let fresh = tempfile::tempdir().unwrap();
    let f = fresh.path();
    plain_config(f);
    for label in ["-x", "a_b", "a.b", "x-"] {
        let line = one_line_error(taas(f, &["users", "add", "--", label]), label);
        assert!(line.contains("label") && line.contains(label), "{line}");
    }
    assert!(list(f, &[]).is_empty());
    assert_eq!(file_names(f), ["taas.toml"], "nothing written");

    // A label owned by another ID.
    let owner = read_json(&add(f, &["demo"]))["uuid"][0]
        .as_str()
        .unwrap()
        .to_string();
    let line = one_line_error(
        taas(f, &["users", "add", "DEMO", "--out", "other"]),
        "taken",
    );
    assert!(line.contains("demo") && line.contains(&owner), "{line}");
    assert!(!f.join("other").exists(), "no files for a refused account");
    assert_eq!(list(f, &[]).len(), 1);

    // Unknown account.
    let ghost = "00000000-0000-4000-8000-000000000000";
    let line = one_line_error(taas(f, &["users", "remove", ghost]), "ghost");
    assert!(line.contains(ghost), "{line}");
}

/// argh's own errors (an unknown flag such as `users add -x`) must follow the same
/// one-line rule.
#[test]
fn argument_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["users", "add", "-x"],
        vec!["users", "add"],
        vec!["nonsense"],
    ] {
        one_line_error(taas(dir.path(), &args), &args.join(" "));
    }
}

/// A Redis store nobody answers: every command that needs it says the store is
/// unreachable, in one line, and writes nothing.
#[test]
fn redis_down_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = support::free_port();
    write_config(
        d,
        &format!("store = \"redis://127.0.0.1:{port}\"\ntls = false\n"),
    );
    for args in [
        vec!["users", "list"],
        vec!["users", "add", "demo", "--out", "out"],
        vec!["users", "remove", "00000000-0000-4000-8000-000000000000"],
    ] {
        let line = one_line_error(taas(d, &args), &args.join(" "));
        assert!(
            line.contains("unreachable") && line.contains(&port.to_string()),
            "{line}"
        );
    }
    assert!(!d.join("out").exists());
}

/// The same commands against a real Redis: accounts land there in the original's
/// layout (key = ID, value = the JSON record).
#[test]
fn users_commands_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_config(d, &format!("store = \"{}\"\ntls = false\n", redis.url()));
    let p = read_json(&add(d, &["demo"]));
    let id = p["uuid"][0].as_str().unwrap().to_string();
    assert_eq!(list(d, &[]), [(id.clone(), "demo".to_string())]);

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let text: String = redis::cmd("GET").arg(&id).query(&mut conn).unwrap();
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["uuid"], id.as_str());
    assert_eq!(record["labels"], serde_json::json!(["demo"]));
    assert_eq!(record["authParams"]["base32"], p["base32"]);
    assert_eq!(record["authParams"]["protocol"], "totp");

    one_line_error(taas(d, &["users", "add", "demo"]), "taken on redis");
    let (ok, _, stderr) = taas(d, &["users", "remove", &id]);
    assert!(ok, "{stderr}");
    assert!(list(d, &[]).is_empty());
}

/// `taas users add --out DIR` never writes through a planted symlink: the
/// provisioning file's name taken by a link is refused, the link's target is
/// untouched, and no account is left behind; as root, an output directory of
/// another user is refused with a message that says to run as that user.
#[test]
fn users_add_refuses_planted_symlinks_and_foreign_directories() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("taas.toml"),
        "store = \"file:data/accounts.json\"\ntls = false\n",
    )
    .unwrap();
    let out = d.join("prov");
    std::fs::create_dir(&out).unwrap();
    let target = d.join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    let id = "6f1c5b2e-8d4a-4c3b-9e7f-0a1b2c3d4e5f";
    std::os::unix::fs::symlink(&target, out.join(format!("{id}.json"))).unwrap();
    let (ok, _, err) = taas(d, &["users", "add", "demo", "--id", id, "--out", "prov"]);
    assert!(!ok, "wrote through a symlink");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let (ok, list, _) = taas(d, &["users", "list"]);
    assert!(ok);
    assert!(!list.contains(id), "the account was rolled back: {list}");
    // A link at the second file (ID.js): refused too; the first file, written,
    // goes again with the account, and the link it did not write stays.
    std::fs::remove_file(out.join(format!("{id}.json"))).unwrap();
    let js = out.join(format!("{id}.js"));
    std::os::unix::fs::symlink(&target, &js).unwrap();
    let (ok, _, err) = taas(d, &["users", "add", "demo", "--id", id, "--out", "prov"]);
    assert!(!ok, "wrote through a symlink");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(
        !out.join(format!("{id}.json")).exists(),
        "no secret left behind"
    );
    assert!(
        js.symlink_metadata().unwrap().file_type().is_symlink(),
        "the link is left as it was"
    );
    let (ok, list, _) = taas(d, &["users", "list"]);
    assert!(ok && !list.contains(id), "rolled back: {list}");

    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        println!("skipped: the foreign-directory half needs root");
        return;
    }
    let theirs = d.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let (ok, _, err) = taas(d, &["users", "add", "other", "--out", "theirs"]);
    assert!(!ok);
    assert!(err.contains("sudo -u"), "{err}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}
