//! The relay's certificates: its own name-constrained certificate authority, the
//! registrar's certificate it signs, label certificates for hidden servers: an
//! operator tool (loading PEM files into rustls is `tls`'s). Made with rcgen on
//! ring, the one crypto library linked; checked with rustls-webpki, the verifier
//! rustls itself uses.
//!
//! # Who holds which key
//!
//! - The relay's operator holds the CA key (`ca_key`). Its certificate
//!   (`ca_cert`) is what mobile clients trust, so the operator can issue a
//!   certificate for any name under `servers_domain` and, with the relay in the
//!   path, pose as a hidden server to a mobile that trusts the CA. RFC 5280 name
//!   constraints (`name_constraints`) stop the CA from vouching for any other
//!   site: permitted are `servers_domain`, `registrar_name` and `public_host`.
//! - The relay holds the registrar's key (`key`) and serves its certificate.
//! - The hidden server holds its label key (`ID.key`); the relay never sees it.
//!
//! Invariants: a key is written mode 0400 and a certificate 0444, never over an
//! existing file; an existing registrar certificate is never replaced; the CA
//! key is read only to issue a certificate and dropped right after (`Ca` lives
//! for one issuance); every certificate issued is verified against the CA file
//! before it is handed out; loading a key that others may read is warned about;
//! key material is never put in a message.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::config::Config;
use crate::directory::Directory;
use crate::error::{Error, Result};
use crate::redis_link::RedisLink;
use crate::store::{Account, StoreSpec};
use crate::sys::{create_private, random_bytes, unix_time};
use crate::tls::{load_certs, warn_if_readable};

/// Days a certificate issued here (registrar, labels) is valid: 825, the most
/// Apple platforms accept for a TLS server certificate ("Requirements for
/// trusted certificates in iOS 13 and macOS 10.15"), so a phone that trusts the
/// CA accepts them.
pub const LEAF_DAYS: i64 = 825;
/// Days the CA is valid: 20 years; every device that trusts it would have to be
/// given a new one when it ends.
pub const CA_DAYS: i64 = 20 * 365 + 5;
/// Certificates start to be valid this many days before they are made, for
/// clients whose clock is a little behind.
const BACKDATE_DAYS: i64 = 1;
/// Random bytes in a serial number (RFC 5280 4.1.2.2 allows up to 20 octets;
/// CA/B Forum asks for at least 64 random bits).
const SERIAL_BYTES: usize = 16;
/// Common name of the registrar's certificate (the names are in its SANs).
const REGISTRAR_CN: &str = "taas relay";

/// The names a relay certificate is valid for: IP `public_host` (or DNS when it
/// is a name), DNS `registrar_name`, DNS `*.servers_domain`, and on a node DNS
/// `*.registrar_name`: every node's `NODE.registrar_name`, the name a
/// draining node's 307 gives another node's registrar (one certificate serves
/// all nodes).
pub fn subject_alt_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        config.public_host.clone(),
        config.registrar_name.clone(),
        format!("*.{}", config.servers_domain),
    ];
    if config.node.is_some() {
        names.push(format!("*.{}", config.registrar_name));
    }
    names
}

/// A new key pair and self-signed certificate for `names`, as PEM (cert, key).
/// (What `taas cert` made before the relay had a CA; tests and examples use it.)
pub fn generate(names: Vec<String>) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(rcgen_error)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, REGISTRAR_CN);
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn rcgen_error(e: rcgen::Error) -> Error {
    Error::Tls(format!("certificate generation: {e}"))
}

/// The CA's name constraints (RFC 5280 4.2.1.10): permitted DNS subtrees
/// `servers_domain` and `registrar_name`, and `public_host` as a single IP
/// address (/32 or /128) or as a DNS subtree, whichever it is. A DNS subtree
/// admits the name and every name under it; names of other types (e-mail, URI)
/// are not used by TLS servers.
pub fn name_constraints(config: &Config) -> rcgen::NameConstraints {
    use rcgen::GeneralSubtree;
    let mut permitted = vec![
        GeneralSubtree::DnsName(config.servers_domain.clone()),
        GeneralSubtree::DnsName(config.registrar_name.clone()),
    ];
    permitted.push(match config.public_host.parse::<IpAddr>() {
        Ok(ip) => {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            GeneralSubtree::IpAddress(rcgen::CidrSubnet::from_addr_prefix(ip, prefix))
        }
        Err(_) => GeneralSubtree::DnsName(config.public_host.to_ascii_lowercase()),
    });
    let mut unique = Vec::new();
    for s in permitted {
        if !unique.contains(&s) {
            unique.push(s);
        }
    }
    rcgen::NameConstraints {
        permitted_subtrees: unique,
        excluded_subtrees: Vec::new(),
    }
}

/// The CA's subject: `O=taas, CN=taas relay CA XXXXXXXX`, the hex digits being
/// the first four bytes of the SHA-256 of its public key. It follows from the
/// key alone, so the issuer of a new certificate is rebuilt from `ca_key`
/// without parsing `ca_cert` (and two relays' CAs on one phone have two names).
pub fn ca_name(key: &rcgen::KeyPair) -> rcgen::DistinguishedName {
    use rcgen::PublicKeyData;
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
    let id: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::OrganizationName, "taas");
    name.push(rcgen::DnType::CommonName, format!("taas relay CA {id}"));
    name
}

/// The parameters that make the CA and that rebuild it as an issuer.
fn ca_params(config: &Config, key: &rcgen::KeyPair) -> Result<rcgen::CertificateParams> {
    use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = ca_name(key);
    // pathlen 0: the CA signs end-entity certificates only, no sub-CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(name_constraints(config));
    validity(&mut params, CA_DAYS)?;
    Ok(params)
}

/// Sets `not_before` (a day ago), `not_after` (`days` after that: Apple
/// counts a leaf's days from `not_before`) and a random serial number.
fn validity(params: &mut rcgen::CertificateParams, days: i64) -> Result<()> {
    let today = i64::try_from(unix_time() / 86_400)
        .map_err(|_| Error::Tls("the system clock is out of range".into()))?;
    let from = today - BACKDATE_DAYS;
    let (y, m, d) = date(from)?;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = date(from + days)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let mut serial = [0u8; SERIAL_BYTES];
    random_bytes(&mut serial)?;
    // A positive INTEGER, with no leading zero octet to strip.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(())
}

/// Year, month, day of day `days` after 1970-01-01, in the range rcgen takes
/// (`date_time_ymd` panics outside it).
fn date(days: i64) -> Result<(i32, u8, u8)> {
    let (y, m, d) = civil_from_days(days);
    match i32::try_from(y) {
        Ok(y) if (1970..=9999).contains(&y) => Ok((y, m, d)),
        _ => Err(Error::Tls(format!(
            "the system clock gives the year {y}: set the clock"
        ))),
    }
}

/// Year, month, day of day `z` after 1970-01-01 (proleptic Gregorian; Howard
/// Hinnant's `civil_from_days`, exact for every day).
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A PEM `CERTIFICATE` block for `der` (64 columns, LF), as rcgen writes them.
pub fn pem_of(der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A certificate and its new key, as PEM, for `names`.
pub struct Issued {
    /// The names in its SANs.
    pub names: Vec<String>,
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (a secret: never logged).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The relay's CA, loaded for one issuance: its certificate and its key. Not
/// kept: whoever loads it drops it when the certificate is made.
pub struct Ca {
    /// `ca_cert`, for messages.
    path: PathBuf,
    /// The CA certificate.
    cert: CertificateDer<'static>,
    /// The CA key (never logged; `Ca`'s `Debug` leaves it out).
    key: rcgen::KeyPair,
    /// The issuer rcgen signs with, rebuilt from the key (`ca_name`).
    params: rcgen::CertificateParams,
}

/// Names the CA file only: the key is never shown.
impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Reads `ca_cert` and `ca_key`; `CaMissing` names the absent one.
    pub fn load(config: &Config) -> Result<Ca> {
        for path in [&config.ca_cert, &config.ca_key] {
            if !path.exists() {
                return Err(Error::CaMissing { path: path.clone() });
            }
        }
        let cert = load_certs(&config.ca_cert)?.swap_remove(0);
        warn_if_readable(&config.ca_key);
        let text = fs::read_to_string(&config.ca_key)
            .map_err(|e| Error::file(&config.ca_key, "read", e))?;
        let key = rcgen::KeyPair::from_pem(&text).map_err(|e| Error::FileContent {
            path: config.ca_key.clone(),
            reason: format!("no usable private key: {e}"),
        })?;
        let params = ca_params(config, &key)?;
        Ok(Ca {
            path: config.ca_cert.clone(),
            cert,
            key,
            params,
        })
    }

    /// A new key and a certificate for `names` (DNS names or IP addresses), with
    /// `common_name`, signed by the CA and verified against `ca_cert` (so a name
    /// outside the constraints, or a key that is not the certificate's, is an
    /// error and nothing is handed out).
    pub fn issue(&self, names: &[String], common_name: &str) -> Result<Issued> {
        use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};
        let refused = |reason: String| Error::CaRefused {
            ca: self.path.clone(),
            names: names.to_vec(),
            reason,
        };
        let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .map_err(|e| refused(format!("not a DNS name or IP address: {e}")))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_DAYS)?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
        verify_issued(cert.der(), &self.cert).map_err(refused)?;
        Ok(Issued {
            names: names.to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Checks `leaf` chains to `ca` as the only trust anchor, for TLS servers, now:
/// signature, validity, basic constraints and name constraints (webpki).
fn verify_issued(
    leaf: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
) -> std::result::Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("ca_cert: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algs,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => format!(
            "the certificate made with ca_key does not chain to ca_cert ({e:?}): the two files do not belong together"
        ),
        webpki::Error::NameConstraintViolation => {
            "outside the CA's name constraints (servers_domain, registrar_name, public_host)".into()
        }
        other => format!("{other:?}"),
    })
}

/// What `make_missing` made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Made {
    /// The CA key and certificate.
    pub ca: bool,
    /// The registrar's key and certificate, signed by the CA.
    pub registrar: bool,
}

impl Made {
    /// True when anything was made.
    pub fn any(self) -> bool {
        self.ca || self.registrar
    }

    /// One line for the log or stderr, naming the files made.
    pub fn describe(self, config: &Config) -> String {
        let mut parts = Vec::new();
        if self.ca {
            parts.push(format!(
                "the relay's CA {} (0444; key {} 0400), constrained to {}",
                config.ca_cert.display(),
                config.ca_key.display(),
                permitted_names(config).join(", ")
            ));
        }
        if self.registrar {
            parts.push(format!(
                "the registrar's certificate {} (0444; key {} 0400) signed by it, for {}",
                config.cert.display(),
                config.key.display(),
                subject_alt_names(config).join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// The CA's permitted subtrees, as text.
pub fn permitted_names(config: &Config) -> Vec<String> {
    name_constraints(config)
        .permitted_subtrees
        .iter()
        .map(|s| match s {
            rcgen::GeneralSubtree::DnsName(n) => n.clone(),
            rcgen::GeneralSubtree::IpAddress(_) => config.public_host.clone(),
            _ => String::new(),
        })
        .collect()
}

/// Whether a pair of files (certificate, key) is there: both, neither, or an
/// error naming the one that is missing.
fn pair_present(cert: &Path, key: &Path) -> Result<bool> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) | (false, true) => {
            let (there, gone) = if cert.exists() {
                (cert, key)
            } else {
                (key, cert)
            };
            Err(Error::Usage(format!(
                "{} exists but {} does not: restore it, or remove {} to make a new pair",
                there.display(),
                gone.display(),
                there.display()
            )))
        }
    }
}

/// Makes what is missing: the CA (unless `ca_cert` and `ca_key` are there) and
/// then the registrar's key and certificate signed by it (unless `cert` and
/// `key` are there: an existing registrar certificate, self-signed or a public
/// CA's, is never replaced). Half a pair is an error, and nothing is made.
pub fn make_missing(config: &Config) -> Result<Made> {
    let have_ca = pair_present(&config.ca_cert, &config.ca_key)?;
    let have_registrar = pair_present(&config.cert, &config.key)?;
    let mut made = Made::default();
    if !have_ca {
        write_ca(config)?;
        made.ca = true;
    }
    if !have_registrar {
        let issued = Ca::load(config)?.issue(&subject_alt_names(config), REGISTRAR_CN)?;
        write_pair(&config.cert, &config.key, &issued.cert_pem, &issued.key_pem)?;
        made.registrar = true;
    }
    Ok(made)
}

/// A new CA key (0400) and certificate (0444).
fn write_ca(config: &Config) -> Result<()> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_error)?;
    let cert = ca_params(config, &key)?
        .self_signed(&key)
        .map_err(rcgen_error)?;
    write_pair(
        &config.ca_cert,
        &config.ca_key,
        &cert.pem(),
        &key.serialize_pem(),
    )
}

/// Writes a key (0400) and then its certificate (0444), both new files; on a
/// failure neither stays.
fn write_pair(cert_path: &Path, key_path: &Path, cert: &str, key: &str) -> Result<()> {
    create_private(key_path, key.as_bytes(), 0o400)?;
    // Both or neither: a key without its certificate would block the next try.
    create_private(cert_path, cert.as_bytes(), 0o444).map_err(|e| {
        let _ = fs::remove_file(key_path);
        e.into()
    })
}

/// `taas cert`: makes the CA and the registrar's certificate, whichever is
/// missing (`make_missing`); refuses when both are there already.
pub fn write_new(config: &Config) -> Result<Made> {
    let made = make_missing(config)?;
    if !made.any() {
        return Err(Error::Usage(format!(
            "{} exists already, and so does the CA {}; remove them first to make new ones",
            config.cert.display(),
            config.ca_cert.display()
        )));
    }
    Ok(made)
}

/// On a start with the default certificate paths and TLS on: make what is
/// missing (`make_missing`). Returns what it made.
pub fn ensure_default(config: &Config) -> Result<Made> {
    if !config.tls || !config.cert_is_default {
        return Ok(Made::default());
    }
    make_missing(config)
}

/// `LABEL.servers_domain` for every label of `account` (a fixed-port `cam:8888`
/// gives `cam.servers_domain`), once each; and, for each of `nodes`,
/// `LABEL.NODE.servers_domain` (the name a cross-node 307 gives).
pub fn label_names(config: &Config, account: &Account, nodes: &[String]) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for text in &account.labels {
        let label = crate::label::Entry::parse(text)?.name;
        let domain = &config.servers_domain;
        let each = std::iter::once(format!("{label}.{domain}"))
            .chain(nodes.iter().map(|node| format!("{label}.{node}.{domain}")));
        for name in each {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// The node names a label certificate must carry: every node that ever
/// joined the shared directory in this config's Redis (the tools may run
/// with a config that names no node), and this config's own `node`; none
/// for a relay on a file store.
pub fn node_names(config: &Config) -> Result<Vec<String>> {
    let mut nodes = Vec::new();
    if let StoreSpec::Redis(url) = &config.store {
        nodes = Directory::known_nodes(&RedisLink::parse(url, 1)?)?;
    }
    if let Some(own) = &config.node
        && !nodes.contains(own)
    {
        nodes.push(own.clone());
    }
    Ok(nodes)
}

/// A certificate from the relay's CA for every label of `account`, with a new
/// key. Reads the CA key and drops it before returning.
pub fn issue_label_cert(config: &Config, account: &Account) -> Result<Issued> {
    let names = label_names(config, account, &node_names(config)?)?;
    let first = names.first().cloned().ok_or_else(|| Error::BadAccount {
        id: account.uuid.clone(),
        reason: "no label".into(),
    })?;
    Ca::load(config)?.issue(&names, &first)
}

/// Whether account tools issue label certificates: always with TLS on (the CA
/// is then required), and with TLS off when a CA is there.
pub fn issues_label_certs(config: &Config) -> bool {
    config.tls || (config.ca_cert.exists() && config.ca_key.exists())
}

/// Every PEM a hidden server needs to verify the registrar this relay serves,
/// then the relay's CA, in one string without duplicates (`server.ca` of a
/// provisioning file; Node's `ca` and rustls both read several PEMs from one):
/// for the registrar certificate (the first in `cert`) the relay's CA when the
/// CA issued it, the certificate itself when it is self-signed, else the
/// certificates that follow it in the file (the operator's chain; none means
/// the hidden server relies on its system roots). `None` with TLS off.
pub fn server_ca(config: &Config) -> Result<Option<String>> {
    if !config.tls {
        return Ok(None);
    }
    let chain = load_certs(&config.cert)?;
    let ca = if config.ca_cert.exists() {
        Some(load_certs(&config.ca_cert)?.swap_remove(0))
    } else {
        None
    };
    let bad = |reason: String| Error::FileContent {
        path: config.cert.clone(),
        reason,
    };
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| bad(format!("the first certificate does not parse: {e}")))?;
    let ca_subject = match &ca {
        Some(der) => Some(
            webpki::anchor_from_trusted_cert(der)
                .map_err(|e| Error::FileContent {
                    path: config.ca_cert.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?
                .subject
                .as_ref()
                .to_vec(),
        ),
        None => None,
    };
    let mut trust: Vec<&CertificateDer<'static>> = Vec::new();
    match (&ca, ca_subject) {
        (Some(ca), Some(subject)) if leaf.issuer() == subject.as_slice() => trust.push(ca),
        _ if leaf.issuer() == leaf.subject() => trust.push(&chain[0]),
        _ => trust.extend(chain.iter().skip(1)),
    }
    trust.extend(ca.iter());
    let mut pem = String::new();
    let mut seen: Vec<&[u8]> = Vec::new();
    for cert in trust {
        if !seen.contains(&cert.as_ref()) {
            seen.push(cert.as_ref());
            pem.push_str(&pem_of(cert));
        }
    }
    Ok(Some(pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{client_config, server_config};
    use rcgen::{CidrSubnet, GeneralSubtree};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_leaf_is_valid_825_days_from_its_not_before() {
        let mut params = rcgen::CertificateParams::default();
        validity(&mut params, LEAF_DAYS).unwrap();
        assert_eq!((params.not_after - params.not_before).whole_days(), 825);
        assert!(params.not_before < rcgen::date_time_ymd(2100, 1, 1));
    }

    /// A config whose files are all in `dir`, plus `extra` lines.
    fn config_in(dir: &Path, extra: &str) -> Config {
        let text = format!(
            "cert = \"{0}/r.crt\"\nkey = \"{0}/r.key\"\nca_cert = \"{0}/ca.crt\"\nca_key = \"{0}/ca.key\"\n{extra}\n",
            dir.display()
        );
        Config::from_toml(&text, "t").unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn constraints_take_public_host_as_an_ip_or_a_dns_subtree() {
        let dns = |n: &str| GeneralSubtree::DnsName(n.into());
        let c = Config::default();
        assert_eq!(
            name_constraints(&c).permitted_subtrees,
            [
                dns("taas.localhost"),
                dns("registrar.localhost"),
                GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 1], [255; 4])),
            ]
        );
        let c = Config::from_toml("public_host = \"2001:db8::7\"", "t").unwrap();
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        v6[15] = 7;
        assert_eq!(
            name_constraints(&c).permitted_subtrees[2],
            GeneralSubtree::IpAddress(CidrSubnet::V6(v6, [255; 16]))
        );
        let c = Config::from_toml(
            "public_host = \"Relay.Example.com\"\nbind_host = \"0.0.0.0\"\nservers_domain = \"taas.example.com\"\nregistrar_name = \"registrar.taas.example.com\"",
            "t",
        )
        .unwrap();
        assert_eq!(
            name_constraints(&c).permitted_subtrees,
            [
                dns("taas.example.com"),
                dns("registrar.taas.example.com"),
                dns("relay.example.com"),
            ]
        );
        // The same name twice is one subtree.
        let c = Config::from_toml(
            "public_host = \"taas.example.com\"\nbind_host = \"0.0.0.0\"\nservers_domain = \"taas.example.com\"",
            "t",
        )
        .unwrap();
        assert_eq!(name_constraints(&c).permitted_subtrees.len(), 2);
        assert!(name_constraints(&c).excluded_subtrees.is_empty());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert!(date(-1).is_err() && date(3_000_000).is_err());
    }

    #[test]
    fn new_installation_ca_signs_registrar_and_labels_within_its_constraints() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "");
        let made = write_new(&config).unwrap();
        assert_eq!(
            made,
            Made {
                ca: true,
                registrar: true
            }
        );
        assert_eq!(mode(&config.ca_key), 0o400);
        assert_eq!(mode(&config.ca_cert), 0o444);
        assert_eq!(mode(&config.key), 0o400);
        assert_eq!(mode(&config.cert), 0o444);
        assert!(server_config(&config.cert, &config.key).is_ok());
        let err = write_new(&config).unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
        // server.ca is the CA alone: it verifies the registrar.
        let ca_pem = fs::read_to_string(&config.ca_cert).unwrap();
        assert_eq!(
            server_ca(&config).unwrap().as_deref(),
            Some(ca_pem.as_str())
        );
        let ca = Ca::load(&config).unwrap();
        let ok = ca.issue(&["demo.taas.localhost".into()], "demo").unwrap();
        assert!(ok.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ok:?}").contains("PRIVATE"), "Debug shows no key");
        let e = ca.issue(&["evil.example.com".into()], "evil").unwrap_err();
        assert!(matches!(e, Error::CaRefused { .. }), "{e}");
        assert!(e.to_string().contains("name constraints"), "{e}");
        let e = ca.issue(&["10.0.0.1".into()], "ip").unwrap_err();
        assert!(matches!(e, Error::CaRefused { .. }), "{e}");
    }

    #[test]
    fn an_existing_registrar_certificate_is_kept_and_trusted_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "");
        // A self-signed one from an old `taas cert`.
        let (cert, key) = generate(subject_alt_names(&config)).unwrap();
        write_pair(&config.cert, &config.key, &cert, &key).unwrap();
        let made = write_new(&config).unwrap();
        assert_eq!(
            made,
            Made {
                ca: true,
                registrar: false
            }
        );
        assert_eq!(fs::read_to_string(&config.cert).unwrap(), cert);
        let ca_pem = fs::read_to_string(&config.ca_cert).unwrap();
        let both = server_ca(&config).unwrap().unwrap();
        assert_eq!(both, format!("{cert}{ca_pem}"));
        // An operator's: leaf, then its chain; the chain and the CA are carried.
        let issuer_key = rcgen::KeyPair::generate().unwrap();
        let mut issuer_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        issuer_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Operator CA");
        issuer_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer_cert = issuer_params.self_signed(&issuer_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(subject_alt_names(&config))
            .unwrap()
            .signed_by(
                &leaf_key,
                &rcgen::Issuer::from_params(&issuer_params, &issuer_key),
            )
            .unwrap();
        let file = dir.path().join("fullchain.pem");
        fs::write(&file, format!("{}{}", leaf.pem(), issuer_cert.pem())).unwrap();
        let mut operator = config.clone();
        operator.cert = file.clone();
        assert_eq!(
            server_ca(&operator).unwrap().unwrap(),
            format!("{}{ca_pem}", issuer_cert.pem())
        );
        // No chain after the leaf: the CA only (system roots for the rest).
        fs::write(&file, leaf.pem()).unwrap();
        assert_eq!(server_ca(&operator).unwrap().unwrap(), ca_pem);
        // The CA's own PEM after a CA-issued leaf is not repeated.
        let issued = Ca::load(&config)
            .unwrap()
            .issue(&subject_alt_names(&config), REGISTRAR_CN)
            .unwrap();
        fs::write(&file, format!("{}{ca_pem}", issued.cert_pem)).unwrap();
        assert_eq!(server_ca(&operator).unwrap().unwrap(), ca_pem);
    }

    #[test]
    fn half_a_pair_is_refused_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "");
        fs::write(&config.cert, "x").unwrap();
        let e = write_new(&config).unwrap_err().to_string();
        assert!(e.contains("r.crt exists but") && e.contains("r.key"), "{e}");
        assert!(!config.ca_cert.exists() && !config.ca_key.exists());
        // A missing CA is named, with what to do.
        let e = Ca::load(&config).unwrap_err();
        assert!(matches!(e, Error::CaMissing { .. }), "{e}");
        assert!(e.to_string().contains("ca.crt") && e.to_string().contains("taas cert"));
    }

    #[test]
    fn a_ca_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "");
        write_new(&config).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        fs::set_permissions(&config.ca_key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&config.ca_key, other.serialize_pem()).unwrap();
        let e = Ca::load(&config)
            .unwrap()
            .issue(&["demo.taas.localhost".into()], "demo")
            .unwrap_err();
        assert!(e.to_string().contains("do not belong together"), "{e}");
    }

    #[test]
    fn client_config_reads_several_pems() {
        let (a, _) = generate(vec!["a.example".into()]).unwrap();
        let (b, _) = generate(vec!["b.example".into()]).unwrap();
        assert!(client_config(Some(&format!("{a}{b}"))).is_ok());
        assert!(client_config(Some("not a pem")).is_err());
    }
}
