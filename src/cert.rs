//! The relay's certificate: a self-signed one made with rcgen (on ring, the one
//! crypto library linked), and loading PEM files into rustls with
//! `rustls-pki-types`' `PemObject`.
//!
//! Invariants: a key is written mode 0400 and a certificate 0444, never over an
//! existing file; loading a key that others may read is warned about; key material
//! is never put in a message.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::create_private_dir;

/// Where a host without a `ca` in its provisioning file finds the system roots
/// (Debian and Fedora layouts).
const SYSTEM_ROOTS: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The names a relay certificate is valid for: IP `public_host` (or DNS when it
/// is a name), DNS `registrar_name`, DNS `*.servers_domain`.
pub fn subject_alt_names(config: &Config) -> Vec<String> {
    vec![
        config.public_host.clone(),
        config.registrar_name.clone(),
        format!("*.{}", config.servers_domain),
    ]
}

/// A new key pair and self-signed certificate for `names`, as PEM (cert, key).
pub fn generate(names: Vec<String>) -> Result<(String, String)> {
    let tls = |e: rcgen::Error| Error::Tls(format!("certificate generation: {e}"));
    let key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(tls)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "taas relay");
    let cert = params.self_signed(&key).map_err(tls)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `taas cert`: writes a new key (0400) and certificate (0444); refuses to
/// overwrite either.
pub fn write_new(config: &Config) -> Result<()> {
    for path in [&config.cert, &config.key] {
        if path.exists() {
            return Err(Error::Usage(format!(
                "{} exists already; remove it first to make a new certificate",
                path.display()
            )));
        }
    }
    let (cert, key) = generate(subject_alt_names(config))?;
    create_new(&config.key, key.as_bytes(), 0o400)?;
    // Both or neither: a key without its certificate would block the next try.
    create_new(&config.cert, cert.as_bytes(), 0o444).inspect_err(|_| {
        let _ = fs::remove_file(&config.key);
    })
}

/// On first start with the default paths and TLS on: make the certificate when
/// both files are absent. Returns true when it did.
pub fn ensure_default(config: &Config) -> Result<bool> {
    if !config.tls || !config.cert_is_default || config.cert.exists() || config.key.exists() {
        return Ok(false);
    }
    write_new(config)?;
    Ok(true)
}

/// Creates `path` (and a private parent directory) with `mode`; fails if it exists.
fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::refuse_foreign_dir(dir)?;
        create_private_dir(dir)?;
    }
    // O_EXCL already refuses an existing name, a symlink included.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .mode(mode)
        .open(path)
        .map_err(|e| Error::file(path, "create", e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .map_err(|e| {
            let _ = fs::remove_file(path);
            Error::file(path, "write", e)
        })
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |reason: String| Error::FileContent {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read certificates: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in file".into()));
    }
    Ok(certs)
}

/// Loads a private key, warning when its mode lets others read it.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "{}: private key is readable by others (mode {:o}); chmod 0400 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::FileContent {
        path: path.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

/// The relay's rustls server configuration, from its PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| Error::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(config))
}

/// A rustls client configuration trusting exactly `ca_pem` when given, else the
/// system's roots.
pub fn client_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| Error::Tls(format!("bad ca PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("bad ca certificate: {e}")))?;
            }
        }
        None => {
            let path = SYSTEM_ROOTS
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| Error::Tls("no ca given and no system root store found".into()))?;
            let (_added, _ignored) = roots.add_parsable_certificates(load_certs(path)?);
        }
    }
    if roots.is_empty() {
        return Err(Error::Tls("no trusted certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_cert_loads_with_modes_and_refuses_overwrite() {
        let dir = std::env::temp_dir().join(format!("taas-cert-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let text = format!("cert = \"{0}/r.crt\"\nkey = \"{0}/r.key\"\n", dir.display());
        let config = Config::from_toml(&text, "t").unwrap();
        write_new(&config).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&config.key), 0o400);
        assert_eq!(mode(&config.cert), 0o444);
        assert!(server_config(&config.cert, &config.key).is_ok());
        let err = write_new(&config).unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
        let pem = fs::read_to_string(&config.cert).unwrap();
        assert!(client_config(Some(&pem)).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }
}
