//! The validated configuration: docs/INTERFACE.md's TOML keys, their defaults, and the
//! checks that turn a typo into an error naming the key and the file.
//!
//! Invariant: once a `Config` exists every value in it is usable; the core never
//! parses a raw string from the file again.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::label;
use crate::relay::Copier;
use crate::store::StoreSpec;

/// What `-c` falls back to when that file exists (docs/INTERFACE.md).
pub const DEFAULT_CONFIG_FILE: &str = "taas.toml";
/// Where the embedded defaults keep their files.
pub const DEFAULT_DATA_DIR: &str = "taas-data";

/// The relay's settings, validated. Field names are docs/INTERFACE.md's keys.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where these settings came from: a file path or "built-in defaults".
    pub source: String,
    /// The address given out in 200 bodies and 307s (`taasHost`).
    pub public_host: String,
    /// The address the listeners bind; `public_host` unless set.
    pub bind_host: IpAddr,
    /// The well-known TLS port (`taasPort`); 0 picks a free one (tests).
    pub port: u16,
    /// Host name of the registrar (`namedRegistrar`), lower case.
    pub registrar_name: String,
    /// Labels live under it (`namedServers`), lower case.
    pub servers_domain: String,
    /// The first label of `registrar_name` when it is `LABEL.servers_domain`: no
    /// account may own it.
    pub reserved_label: Option<String>,
    /// What the 307's `Location` names: the label's name or `public_host`.
    pub redirect_host: RedirectHost,
    /// PEM certificate chain of the relay.
    pub cert: PathBuf,
    /// PEM private key of the relay.
    pub key: PathBuf,
    /// True when `cert` and `key` are both the defaults: then they are generated on
    /// first start when absent.
    pub cert_is_default: bool,
    /// PEM certificate of the relay's name-constrained CA (what mobile clients
    /// trust; provisioning files carry it in `server.ca`).
    pub ca_cert: PathBuf,
    /// PEM private key of the relay's CA: read only by the tools that issue
    /// certificates (`taas cert`, `taas users`, `taas admin`) and by `taas serve`
    /// at a first start that makes the registrar's certificate.
    pub ca_key: PathBuf,
    /// `false` serves plain HTTP on the well-known port.
    pub tls: bool,
    /// Where accounts live.
    pub store: StoreSpec,
    /// First and last port (inclusive) for plug and rendezvous ports.
    pub port_range: (u16, u16),
    /// Waiting responders and open plugs per label (docs/PROTOCOL.md section 1,
    /// default 21, the original's).
    pub max_waiting: usize,
    /// How long a plug waits for its one connection (default 30 s).
    pub plug_timeout: Duration,
    /// How long a mobile connection waits for a responder (default 5 s).
    pub pair_wait: Duration,
    /// How long an unused rendezvous port stays open (default 60 s).
    pub rendezvous_idle: Duration,
    /// The plug accepts only the registering IP address.
    pub plug_same_ip: bool,
    /// Failed authentications allowed per address and per ID before 429 (default 10).
    pub auth_fail_budget: u32,
    /// One failure is forgiven every this long (default 6 s).
    pub auth_fail_refill: Duration,
    /// Also append the log here.
    pub log_file: Option<PathBuf>,
    /// One deadline for TLS handshake plus request head (default 10 s).
    pub head_timeout: Duration,
    /// Largest request head accepted, in bytes (default 8 KiB).
    pub max_head: usize,
    /// Connections open at once on the well-known port (default 512).
    pub max_connections: usize,
    /// Connections open at once on the well-known port from one IP (default 32).
    pub max_connections_per_ip: usize,
    /// Relayed pairs at once (default 4096).
    pub max_pairs: usize,
    /// Relayed pairs at once with mobiles from one address (default 64).
    pub max_pairs_per_ip: usize,
    /// On SIGTERM, how long live pairs may go on (default 10 s).
    pub shutdown_grace: Duration,
    /// A connection at a rendezvous port silent this long is closed without
    /// having taken a responder (default 10 s).
    pub first_octet_timeout: Duration,
    /// A pair with no octet either way this long is closed (default 3600 s;
    /// `None` when the key is 0).
    pub idle_timeout: Option<Duration>,
    /// When set, every registration is answered 307 to this registrar URL.
    pub registrar_redirect: Option<String>,
    /// The status listener (`/metrics`, `/status`, `/ready`); off when unset.
    pub status_listen: Option<SocketAddr>,
    /// How the relay copies: `splice(2)` (key `splice = true`, the default) or
    /// `std::io::copy`.
    pub copier: Copier,
    /// This relay's name among several sharing one Redis store (a DNS label,
    /// lower case): turns the shared directory on (docs/PROTOCOL.md section 7).
    pub node: Option<String>,
    /// With `node`: a mobile request for a label with no responder here is
    /// answered 307 to a node that has some (default true); else 503.
    pub cross_node_redirects: bool,
}

/// The host a 307 names (`redirect_host`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectHost {
    /// `LABEL.servers_domain`, the original's: the client checks the hidden
    /// server's certificate against the name it asked for.
    Name,
    /// `public_host`, for set-ups without wildcard DNS.
    Address,
}

/// The file as written, every key optional. Unknown keys are refused by serde,
/// with the key's name in the message.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `public_host`, as written.
    public_host: Option<String>,
    /// `bind_host`, as written.
    bind_host: Option<String>,
    /// `port`, as written.
    port: Option<u16>,
    /// `registrar_name`, as written.
    registrar_name: Option<String>,
    /// `servers_domain`, as written.
    servers_domain: Option<String>,
    /// `redirect_host`, as written.
    redirect_host: Option<String>,
    /// `cert`, as written.
    cert: Option<PathBuf>,
    /// `key`, as written.
    key: Option<PathBuf>,
    /// `ca_cert`, as written.
    ca_cert: Option<PathBuf>,
    /// `ca_key`, as written.
    ca_key: Option<PathBuf>,
    /// `tls`, as written.
    tls: Option<bool>,
    /// `store`, as written.
    store: Option<String>,
    /// `port_range`, as written.
    port_range: Option<String>,
    /// `max_waiting`, as written.
    max_waiting: Option<usize>,
    /// `plug_timeout`, as written.
    plug_timeout: Option<f64>,
    /// `pair_wait`, as written.
    pair_wait: Option<f64>,
    /// `rendezvous_idle`, as written.
    rendezvous_idle: Option<f64>,
    /// `plug_same_ip`, as written.
    plug_same_ip: Option<bool>,
    /// `auth_fail_budget`, as written.
    auth_fail_budget: Option<u32>,
    /// `auth_fail_refill`, as written.
    auth_fail_refill: Option<f64>,
    /// `log_file`, as written.
    log_file: Option<PathBuf>,
    /// `head_timeout`, as written.
    head_timeout: Option<f64>,
    /// `max_head`, as written.
    max_head: Option<usize>,
    /// `max_connections`, as written.
    max_connections: Option<usize>,
    /// `max_connections_per_ip`, as written.
    max_connections_per_ip: Option<usize>,
    /// `max_pairs`, as written.
    max_pairs: Option<usize>,
    /// `max_pairs_per_ip`, as written.
    max_pairs_per_ip: Option<usize>,
    /// `shutdown_grace`, as written.
    shutdown_grace: Option<f64>,
    /// `first_octet_timeout`, as written.
    first_octet_timeout: Option<f64>,
    /// `idle_timeout`, as written.
    idle_timeout: Option<f64>,
    /// `registrar_redirect`, as written.
    registrar_redirect: Option<String>,
    /// `status_listen`, as written.
    status_listen: Option<String>,
    /// `splice`, as written.
    splice: Option<bool>,
    /// `node`, as written.
    node: Option<String>,
    /// `cross_node_redirects`, as written.
    cross_node_redirects: Option<bool>,
}

impl Default for Config {
    fn default() -> Config {
        // The defaults cannot fail to validate; the test below proves it.
        match Config::from_raw(RawConfig::default(), "built-in defaults") {
            Ok(config) => config,
            Err(e) => panic!("built-in defaults are invalid: {e}"),
        }
    }
}

impl Config {
    /// Loads `path`, or `./taas.toml` when `path` is `None` and that file exists,
    /// or else the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::ConfigRead {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text; `source` names it in errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::ConfigRead {
            path: PathBuf::from(source),
            reason: toml_reason(text, &e),
        })?;
        Config::from_raw(raw, source)
    }

    fn from_raw(raw: RawConfig, source: &str) -> Result<Config> {
        let bad = |key: &str, reason: String| Error::ConfigValue {
            source: source.to_string(),
            key: key.to_string(),
            reason,
        };
        let seconds = |key: &str, value: Option<f64>, default: f64| -> Result<Duration> {
            let v = value.unwrap_or(default);
            if !(v > 0.0 && v <= 86_400.0) {
                return Err(bad(
                    key,
                    format!("{v} seconds: must be more than 0 and at most 86400"),
                ));
            }
            Ok(Duration::from_secs_f64(v))
        };
        let positive = |key: &str, value: Option<usize>, default: usize| -> Result<usize> {
            match value.unwrap_or(default) {
                0 => Err(bad(key, "must be at least 1".into())),
                n => Ok(n),
            }
        };

        let public_host = raw.public_host.unwrap_or_else(|| "127.0.0.1".into());
        if public_host.is_empty() || public_host.contains(['/', ' ', '[', ']']) {
            return Err(bad("public_host", format!("{public_host:?} is not a host")));
        }
        let bind_text = raw.bind_host.unwrap_or_else(|| public_host.clone());
        let bind_host: IpAddr = bind_text.parse().map_err(|_| {
            bad(
                "bind_host",
                format!(
                    "{bind_text:?} is not an IP address (set bind_host when public_host is a name)"
                ),
            )
        })?;
        let registrar_name = host_name(&raw.registrar_name, "registrar.localhost")
            .map_err(|r| bad("registrar_name", r))?;
        let servers_domain = host_name(&raw.servers_domain, "taas.localhost")
            .map_err(|r| bad("servers_domain", r))?;
        // A registrar named LABEL.servers_domain takes that label's name: an
        // exact match of registrar_name is the registrar (docs/PROTOCOL.md section 2).
        let reserved_label = registrar_name
            .strip_suffix(&format!(".{servers_domain}"))
            .filter(|first| !first.contains('.'))
            .map(str::to_string);
        let redirect_host = match raw.redirect_host.as_deref() {
            None | Some("name") => RedirectHost::Name,
            Some("address") => RedirectHost::Address,
            Some(other) => {
                return Err(bad(
                    "redirect_host",
                    format!("{other:?} is not \"name\" or \"address\""),
                ));
            }
        };
        let cert_is_default = raw.cert.is_none() && raw.key.is_none();
        let data = Path::new(DEFAULT_DATA_DIR);
        let store_text = raw
            .store
            .unwrap_or_else(|| format!("file:{DEFAULT_DATA_DIR}/accounts.json"));
        let store = StoreSpec::parse(&store_text).map_err(|r| bad("store", r))?;
        let range_text = raw.port_range.unwrap_or_else(|| "20000-29999".into());
        let port_range = parse_range(&range_text).map_err(|r| bad("port_range", r))?;
        let auth_fail_budget = raw.auth_fail_budget.unwrap_or(10);
        if auth_fail_budget == 0 {
            return Err(bad("auth_fail_budget", "must be at least 1".into()));
        }
        let max_head = raw.max_head.unwrap_or(8192);
        if !(256..=1 << 20).contains(&max_head) {
            return Err(bad(
                "max_head",
                format!("{max_head} is not between 256 and 1048576"),
            ));
        }
        let registrar_redirect = match raw.registrar_redirect {
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
                if url.contains(['\r', '\n', ' ']) {
                    return Err(bad("registrar_redirect", "contains white space".into()));
                }
                Some(url.trim_end_matches('/').to_string())
            }
            Some(url) => {
                return Err(bad(
                    "registrar_redirect",
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
            None => None,
        };
        let status_listen = match raw.status_listen {
            Some(text) => Some(
                text.parse()
                    .map_err(|_| bad("status_listen", format!("{text:?} is not IP:PORT")))?,
            ),
            None => None,
        };
        let node = match raw.node {
            Some(name) => {
                let name = label::validate(&name).map_err(|e| bad("node", e.to_string()))?;
                if matches!(store, StoreSpec::File(_)) {
                    return Err(bad(
                        "node",
                        format!(
                            "{name:?} needs a Redis store (store = \"redis://…\" or \
                             \"redis+sentinel://…\"): nodes share their directory there, \
                             and a file store is one machine's"
                        ),
                    ));
                }
                Some(name)
            }
            None => None,
        };
        if raw.cross_node_redirects.is_some() && node.is_none() {
            return Err(bad(
                "cross_node_redirects",
                "only means something with node set".into(),
            ));
        }
        Ok(Config {
            source: source.to_string(),
            public_host,
            bind_host,
            port: raw.port.unwrap_or(8443),
            registrar_name,
            servers_domain,
            reserved_label,
            redirect_host,
            cert: raw.cert.unwrap_or_else(|| data.join("registrar.crt")),
            key: raw.key.unwrap_or_else(|| data.join("registrar.key")),
            cert_is_default,
            ca_cert: raw.ca_cert.unwrap_or_else(|| data.join("ca.crt")),
            ca_key: raw.ca_key.unwrap_or_else(|| data.join("ca.key")),
            tls: raw.tls.unwrap_or(true),
            store,
            port_range,
            max_waiting: positive("max_waiting", raw.max_waiting, 21)?,
            plug_timeout: seconds("plug_timeout", raw.plug_timeout, 30.0)?,
            pair_wait: seconds("pair_wait", raw.pair_wait, 5.0)?,
            rendezvous_idle: seconds("rendezvous_idle", raw.rendezvous_idle, 60.0)?,
            plug_same_ip: raw.plug_same_ip.unwrap_or(true),
            auth_fail_budget,
            auth_fail_refill: seconds("auth_fail_refill", raw.auth_fail_refill, 6.0)?,
            log_file: raw.log_file,
            head_timeout: seconds("head_timeout", raw.head_timeout, 10.0)?,
            max_head,
            max_connections: positive("max_connections", raw.max_connections, 512)?,
            max_connections_per_ip: positive(
                "max_connections_per_ip",
                raw.max_connections_per_ip,
                32,
            )?,
            max_pairs: positive("max_pairs", raw.max_pairs, 4096)?,
            max_pairs_per_ip: positive("max_pairs_per_ip", raw.max_pairs_per_ip, 64)?,
            shutdown_grace: seconds("shutdown_grace", raw.shutdown_grace, 10.0)?,
            first_octet_timeout: seconds("first_octet_timeout", raw.first_octet_timeout, 10.0)?,
            idle_timeout: match raw.idle_timeout {
                Some(0.0) => None,
                v => Some(seconds("idle_timeout", v, 3600.0)?),
            },
            registrar_redirect,
            status_listen,
            copier: if raw.splice.unwrap_or(true) {
                Copier::Splice
            } else {
                Copier::Copy
            },
            node,
            cross_node_redirects: raw.cross_node_redirects.unwrap_or(true),
        })
    }

    /// `public_host:port` as it goes in a 200 body or a `Location`: IPv6 in brackets.
    pub fn public_addr(&self, port: u16) -> String {
        host_port(&self.public_host, port)
    }

    /// The `Location` of a 307 for `label` to its rendezvous port `port`:
    /// `SCHEME://LABEL.servers_domain:PORT` (or `public_host` with
    /// `redirect_host = "address"`) followed by `target`, which must start with
    /// `/`. Built from the configuration and a validated label only.
    pub fn rendezvous_url(&self, label: &str, port: u16, target: &str) -> String {
        let host = match self.redirect_host {
            RedirectHost::Name => format!("{label}.{}:{port}", self.servers_domain),
            RedirectHost::Address => self.public_addr(port),
        };
        format!("{}://{host}{target}", self.scheme())
    }

    /// The `Location` of a cross-node 307 for `label` to `node`'s rendezvous
    /// port `port`: `LABEL.NODE.servers_domain` (one wildcard DNS record per
    /// node, `*.NODE.servers_domain`; label certificates name it), or that
    /// node's `public_host` (`host`, as the node published it) with
    /// `redirect_host = "address"`.
    pub fn node_url(&self, label: &str, node: &str, host: &str, port: u16, target: &str) -> String {
        let host = match self.redirect_host {
            RedirectHost::Name => format!("{label}.{node}.{}:{port}", self.servers_domain),
            RedirectHost::Address => host_port(host, port),
        };
        format!("{}://{host}{target}", self.scheme())
    }

    /// The `Location` of a draining node's 307 for a registration to another
    /// node's registrar: `NODE.registrar_name` (one DNS record per node; the
    /// registrar certificate all nodes share names `*.registrar_name`) at that
    /// node's well-known `port`, followed by `target`.
    pub fn registrar_url(&self, node: &str, port: u16, target: &str) -> String {
        format!(
            "{}://{node}.{}:{port}{target}",
            self.scheme(),
            self.registrar_name
        )
    }

    /// This node's own name for its registrar, `NODE.registrar_name` (what
    /// another node's 307 names), when it is a node.
    pub fn node_registrar_name(&self) -> Option<String> {
        let node = self.node.as_ref()?;
        Some(format!("{node}.{}", self.registrar_name))
    }

    /// Refuses an account with a label entry this relay cannot serve
    /// (`check_entry`).
    pub fn check_account(&self, account: &crate::store::Account) -> Result<()> {
        for text in &account.labels {
            self.check_entry(&label::Entry::parse(text)?)?;
        }
        Ok(())
    }

    /// Refuses an account's label entry this relay cannot serve: the reserved
    /// label, or a fixed port inside `port_range` or on the well-known port.
    pub fn check_entry(&self, entry: &label::Entry) -> Result<()> {
        if self.reserved_label.as_deref() == Some(entry.name.as_str()) {
            return Err(Error::ReservedLabel {
                label: entry.name.clone(),
                reason: format!(
                    "{}.{} is the registrar's name (registrar_name)",
                    entry.name, self.servers_domain
                ),
            });
        }
        let Some(port) = entry.port else {
            return Ok(());
        };
        let (first, last) = self.port_range;
        let reason = if (first..=last).contains(&port) {
            format!(
                "port {port} lies inside port_range {first}-{last}, where plugs and rendezvous ports are taken"
            )
        } else if port == self.port {
            format!("port {port} is the relay's well-known port")
        } else if self.status_listen.is_some_and(|a| a.port() == port) {
            format!("port {port} is the status listener's")
        } else {
            return Ok(());
        };
        Err(Error::BadFixedPort {
            entry: entry.stored(),
            reason,
        })
    }

    /// The URL scheme mobile clients are sent to: `https` unless TLS is off.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// `HOST:PORT`, an IPv6 address in brackets.
fn host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// One line naming the line and key of a TOML error (toml's own text spans lines).
fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[start..].lines().next().unwrap_or("");
    // The key, unless the message names it already ("unknown field `x`").
    match line.split_once('=').map(|(key, _)| key.trim()) {
        Some(key) if !key.is_empty() && !e.message().contains(&format!("`{key}`")) => {
            format!("line {line_no}, key `{key}`: {}", e.message())
        }
        _ => format!("line {line_no}: {}", e.message()),
    }
}

/// A host name key: lower case, dot-separated DNS labels.
fn host_name(value: &Option<String>, default: &str) -> std::result::Result<String, String> {
    let name = value.as_deref().unwrap_or(default).to_ascii_lowercase();
    if name.len() > 253 || name.split('.').any(|part| label::validate(part).is_err()) {
        return Err(format!("{name:?} is not a DNS name"));
    }
    Ok(name)
}

/// `"FIRST-LAST"`, both ports, FIRST <= LAST, FIRST > 0.
fn parse_range(text: &str) -> std::result::Result<(u16, u16), String> {
    let err = || format!("{text:?} is not FIRST-LAST with 1 <= FIRST <= LAST <= 65535");
    let (a, b) = text.split_once('-').ok_or_else(err)?;
    let a: u16 = a.trim().parse().map_err(|_| err())?;
    let b: u16 = b.trim().parse().map_err(|_| err())?;
    if a == 0 || a > b {
        return Err(err());
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_needs_redis_and_a_dns_label() {
        let e = Config::from_toml("node = \"a\"", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node") && e.contains("Redis store"), "{e}");
        let redis = "store = \"redis://127.0.0.1:6379\"\n";
        let c = Config::from_toml(&format!("{redis}node = \"A1\""), "t").unwrap();
        assert_eq!(c.node.as_deref(), Some("a1"));
        assert!(c.cross_node_redirects);
        assert!(Config::from_toml(&format!("{redis}node = \"a.b\""), "t").is_err());
        assert!(Config::from_toml("cross_node_redirects = false", "t").is_err());
        let url = c.node_url("cam", "b", "127.0.0.3", 20001, "/x?y");
        assert_eq!(url, "https://cam.b.taas.localhost:20001/x?y");
        let c = Config::from_toml(
            &format!("{redis}node = \"a\"\nredirect_host = \"address\""),
            "t",
        )
        .unwrap();
        assert_eq!(c.node_url("cam", "b", "::1", 5, "/"), "https://[::1]:5/");
    }

    #[test]
    fn defaults_are_valid_and_on_loopback() {
        let c = Config::default();
        assert_eq!(c.public_host, "127.0.0.1");
        assert_eq!(c.bind_host, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.port, 8443);
        assert_eq!(c.port_range, (20000, 29999));
        assert_eq!(c.max_waiting, 21);
        assert_eq!(c.redirect_host, RedirectHost::Name);
        assert_eq!(c.reserved_label, None);
        assert_eq!(c.first_octet_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        let off = Config::from_toml("idle_timeout = 0", "t").unwrap();
        assert_eq!(off.idle_timeout, None);
        assert_eq!(c.plug_timeout, Duration::from_secs(30));
        assert!(c.cert_is_default && c.tls && c.plug_same_ip);
        assert_eq!(c.cert, Path::new("taas-data/registrar.crt"));
        assert_eq!(c.ca_cert, Path::new("taas-data/ca.crt"));
        assert_eq!(c.ca_key, Path::new("taas-data/ca.key"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("prot = 1\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("prot"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        for (text, key) in [
            ("tls = 1", "tls"),
            ("port = 70000", "port"),
            ("pair_wait = true", "pair_wait"),
            ("public_host = 5", "public_host"),
            ("max_connections = 1.5", "max_connections"),
        ] {
            let e = Config::from_toml(text, "x.toml").unwrap_err().to_string();
            assert!(
                e.contains("x.toml") && e.contains(&format!("key `{key}`")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_name_key_and_file() {
        for (text, key) in [
            ("port_range = \"9-1\"", "port_range"),
            ("max_waiting = 0", "max_waiting"),
            ("plug_timeout = -1", "plug_timeout"),
            ("store = \"mysql://x\"", "store"),
            ("registrar_name = \"bad_name\"", "registrar_name"),
            ("public_host = \"example.com\"", "bind_host"),
        ] {
            let e = Config::from_toml(text, "y.toml").unwrap_err().to_string();
            assert!(e.contains("y.toml") && e.contains(key), "{text}: {e}");
        }
        let e = Config::from_toml("port = \"x\"", "z.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("z.toml"), "{e}");
    }

    #[test]
    fn registrar_under_servers_domain_reserves_its_label() {
        let c = Config::from_toml(
            "registrar_name = \"registrar.taas.example.com\"\nservers_domain = \"taas.example.com\"",
            "t",
        )
        .unwrap();
        assert_eq!(c.reserved_label.as_deref(), Some("registrar"));
        let e = c
            .check_entry(&label::Entry::parse("registrar").unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::ReservedLabel { .. }), "{e}");
        assert!(e.to_string().contains("registrar_name"), "{e}");
        assert!(c.check_entry(&label::Entry::parse("web").unwrap()).is_ok());
    }

    #[test]
    fn fixed_ports_outside_the_range_only() {
        let c = Config::default();
        let entry = |t: &str| label::Entry::parse(t).unwrap();
        assert!(c.check_entry(&entry("cam:8888")).is_ok());
        for bad in ["cam:20000", "cam:29999", "cam:8443"] {
            let e = c.check_entry(&entry(bad)).unwrap_err();
            assert!(matches!(e, Error::BadFixedPort { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn location_names_the_label_or_the_address() {
        let c = Config::default();
        assert_eq!(
            c.rendezvous_url("demo", 20001, "/a?b=1"),
            "https://demo.taas.localhost:20001/a?b=1"
        );
        let c = Config::from_toml("redirect_host = \"address\"", "t").unwrap();
        assert_eq!(
            c.rendezvous_url("demo", 20001, "/"),
            "https://127.0.0.1:20001/"
        );
        assert!(Config::from_toml("redirect_host = \"ip\"", "t").is_err());
    }

    #[test]
    fn ipv6_public_addr_is_bracketed() {
        let c = Config::from_toml("public_host = \"::1\"", "t").unwrap();
        assert_eq!(c.public_addr(20001), "[::1]:20001");
        assert_eq!(Config::default().public_addr(5), "127.0.0.1:5");
    }

    #[test]
    fn fractional_seconds_and_names_are_lowered() {
        let c = Config::from_toml("pair_wait = 0.5\nregistrar_name = \"Reg.Example.COM\"", "t")
            .unwrap();
        assert_eq!(c.pair_wait, Duration::from_millis(500));
        assert_eq!(c.registrar_name, "reg.example.com");
    }
}
