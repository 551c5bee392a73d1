//! Provisioning files (docs/PROTOCOL.md section 5): what a hidden server needs to
//! register — `ID.json`, and the legacy `ID.js` (`exports.params = {…};`) that the
//! original's hidden servers read.
//!
//! Beside them go `ID.crt` and `ID.key`, the label certificate the relay's CA
//! issued for every label of the account and its key, where `taas expose` finds
//! them next to the provisioning file it is given.
//!
//! Invariants: all four files are secrets (the TOTP secret, the label key) and
//! are written mode 0600, by way of a new file renamed into place; reading
//! accepts either form, and `uuid` as the original's one-element array or a string.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cert::Issued;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Account;
use crate::sys::{create_private_dir, refuse_foreign_dir, write_private};
use crate::totp::{Algorithm, Totp};

/// How to reach the relay.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `public_host`.
    pub hostname: String,
    /// The well-known port.
    pub port: u16,
    /// Every PEM needed to verify the registrar the relay serves, then the
    /// relay's CA, concatenated (`cert::server_ca`); absent when the relay runs
    /// without TLS (then a hidden server uses plain HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// The provisioning file's content, with the field names hidden servers read.
#[derive(Clone, Serialize, Deserialize)]
pub struct Provision {
    /// `[ID]`.
    #[serde(deserialize_with = "one_or_many")]
    pub uuid: Vec<String>,
    /// The labels it may register.
    pub labels: Vec<String>,
    /// The TOTP secret.
    pub base32: String,
    /// Seconds per step.
    #[serde(default = "default_step")]
    pub step: u64,
    /// Code length.
    #[serde(default = "default_digits")]
    pub digits: u32,
    /// HMAC name.
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Always "totp".
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `LABEL.servers_domain` of the first label.
    #[serde(default)]
    pub name: String,
    /// `https://registrar_name` (`http://` when the relay runs without TLS).
    pub issuer: String,
    /// How to reach the relay.
    pub server: ServerInfo,
}

fn default_step() -> u64 {
    30
}
fn default_digits() -> u32 {
    6
}
fn default_algorithm() -> String {
    "sha1".into()
}
fn default_protocol() -> String {
    "totp".into()
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Provision {
    /// The file for `account` on the relay described by `config`; the `ca` is
    /// what verifies the registrar, and the relay's CA, when TLS is on.
    pub fn new(account: &Account, config: &Config) -> Result<Provision> {
        let totp = account.totp()?;
        let ca = crate::cert::server_ca(config)?;
        // `name` is the first label's host name (`cam` of a fixed-port `cam:8888`).
        let first = account.labels.first().map_or("", |l| {
            l.split_once(':').map_or(l.as_str(), |(name, _)| name)
        });
        Ok(Provision {
            uuid: vec![account.uuid.clone()],
            labels: account.labels.clone(),
            base32: account.auth_params.base32.clone(),
            step: totp.step,
            digits: totp.digits.unwrap_or(6),
            algorithm: totp.algorithm.name().into(),
            protocol: "totp".into(),
            name: format!("{first}.{}", config.servers_domain),
            issuer: format!("{}://{}", config.scheme(), config.registrar_name),
            server: ServerInfo {
                hostname: config.public_host.clone(),
                port: config.port,
                ca,
            },
        })
    }

    /// Reads `ID.json`, or a legacy `ID.js` (`exports.params = {…};`).
    pub fn load(path: &Path) -> Result<Provision> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, "read", e))?;
        let bad = |reason: String| Error::FileContent {
            path: path.to_path_buf(),
            reason,
        };
        let json = match (text.find('{'), text.rfind('}')) {
            (Some(a), Some(b)) if a < b => &text[a..=b],
            _ => return Err(bad("no JSON object in provisioning file".into())),
        };
        let p: Provision =
            serde_json::from_str(json).map_err(|e| bad(format!("not a provisioning file: {e}")))?;
        if p.uuid.is_empty() {
            return Err(bad("uuid is empty".into()));
        }
        p.totp().map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }

    /// The account ID.
    pub fn id(&self) -> &str {
        self.uuid.first().map_or("", String::as_str)
    }

    /// The TOTP this file describes.
    pub fn totp(&self) -> Result<Totp> {
        let algorithm = Algorithm::parse(&self.algorithm).ok_or_else(|| {
            Error::BadTotp(format!("algorithm {:?} is not supported", self.algorithm))
        })?;
        Totp::new(&self.base32, self.step, Some(self.digits), algorithm)
    }

    /// The registrar's host name, from `issuer`.
    pub fn registrar_name(&self) -> &str {
        let host = self
            .issuer
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        host.split(['/', ':']).next().unwrap_or(host)
    }

    /// Key Uri Format (`otpauth://totp/…`) for authenticator apps and QR codes.
    pub fn otpauth_uri(&self) -> String {
        let issuer = self.registrar_name();
        format!(
            "otpauth://totp/{issuer}:{}?secret={}&issuer={issuer}&algorithm={}&digits={}&period={}",
            self.id(),
            self.base32,
            self.algorithm.to_ascii_uppercase(),
            self.digits,
            self.step
        )
    }

    /// Writes `DIR/ID.json` and `DIR/ID.js`, mode 0600; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        refuse_foreign_dir(dir)?;
        create_private_dir(dir)?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Encode(format!("provisioning file: {e}")))?;
        let json_path = dir.join(format!("{}.json", self.id()));
        let js_path = dir.join(format!("{}.js", self.id()));
        write_private(&json_path, format!("{json}\n").as_bytes(), 0o600)?;
        // Both or neither: the caller rolls the account back on an error, so no
        // file with its secret may stay behind. What was not written (a planted
        // link, a file that could not be replaced) is left as it was.
        write_private(
            &js_path,
            format!("exports.params = {json};\n").as_bytes(),
            0o600,
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&json_path);
        })?;
        Ok((json_path, js_path))
    }
}

/// `DIR/ID.crt` and `DIR/ID.key`: the label certificate beside `DIR/ID.json`.
pub fn label_cert_paths(dir: &Path, id: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{id}.crt")), dir.join(format!("{id}.key")))
}

/// Writes the label certificate and its key as `DIR/ID.crt` and `DIR/ID.key`,
/// both mode 0600 (the key is a secret; the certificate goes with it), both or
/// neither; an earlier pair is replaced. Returns their paths.
pub fn write_label_cert(dir: &Path, id: &str, issued: &Issued) -> Result<(PathBuf, PathBuf)> {
    refuse_foreign_dir(dir)?;
    create_private_dir(dir)?;
    let (crt, key) = label_cert_paths(dir, id);
    write_private(&key, issued.key_pem.as_bytes(), 0o600)?;
    // Only what was written goes again on a failure.
    write_private(&crt, issued.cert_pem.as_bytes(), 0o600).inspect_err(|_| {
        let _ = std::fs::remove_file(&key);
    })?;
    Ok((crt, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn json_and_js_round_trip_with_every_field() {
        let dir = std::env::temp_dir().join(format!("taas-prov-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config::from_toml("tls = false", "t").unwrap();
        let account = Account::new(None, &["demo".into()]).unwrap();
        let p = Provision::new(&account, &config).unwrap();
        let (json, js) = p.write(&dir).unwrap();
        for path in [&json, &js] {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let back = Provision::load(path).unwrap();
            assert_eq!(back.id(), account.uuid);
            assert_eq!(back.base32, account.auth_params.base32);
            assert_eq!(back.name, "demo.taas.localhost");
            assert_eq!(back.registrar_name(), "registrar.localhost");
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        for key in [
            "uuid",
            "labels",
            "base32",
            "step",
            "digits",
            "algorithm",
            "protocol",
            "name",
            "issuer",
            "server",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert!(v["uuid"].is_array());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn otpauth_uri_shape() {
        let config = Config::from_toml("tls = false", "t").unwrap();
        let account = Account::new(None, &["demo".into()]).unwrap();
        let p = Provision::new(&account, &config).unwrap();
        let uri = p.otpauth_uri();
        assert!(uri.starts_with("otpauth://totp/registrar.localhost:"));
        assert!(uri.contains("&digits=6&period=30"));
    }
}
