//! TLS with rustls on ring, the one crypto library linked: the relay's server
//! configuration from its PEM files, a client configuration trusting a given CA
//! (a provisioning file's `ca`) or the system's roots, and both sides of a
//! handshake run under the connection's deadline. Used by the relay, the agent
//! and the operator tools alike.
//!
//! Invariants: a handshake never outlives the `DeadlineStream` it runs on (an
//! expiry is `Error::Timeout("handshake")`); a `ServerCert` swaps its whole
//! configuration at once, so a connection has the old certificate or the new
//! one, and a file that does not load keeps the old; loading a key that others
//! may read is warned about; key material is never put in a message.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use crate::error::{Error, Result};
use crate::http::DeadlineStream;
use crate::sys::unpoisoned;

/// Where a host without a `ca` in its provisioning file finds the system roots
/// (Debian and Fedora layouts).
const SYSTEM_ROOTS: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The relay's side of a TLS connection.
pub type ServerStream = StreamOwned<ServerConnection, DeadlineStream>;
/// A client's side of a TLS connection.
pub type ClientStream = StreamOwned<ClientConnection, DeadlineStream>;

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
    warn_if_readable(path);
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::FileContent {
        path: path.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

/// Warns when the key at `path` (followed through symlinks) is readable by others.
pub fn warn_if_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        log::warn!(
            "{}: private key is readable by others (mode {:o}); chmod 0400 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
}

/// The relay's rustls server configuration, from its PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| Error::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(config))
}

/// A rustls client configuration trusting exactly `ca_pem` when given, else the
/// system's roots.
pub fn client_config(ca_pem: Option<&str>) -> Result<Arc<ClientConfig>> {
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
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A served certificate and key (the relay's registrar certificate, the
/// agent's label certificate), re-read on SIGHUP.
pub struct ServerCert {
    /// The certificate chain file (PEM).
    cert: PathBuf,
    /// The private key file (PEM).
    key: PathBuf,
    /// The configuration made from them; new connections take a clone.
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerCert {
    /// Loads `cert` and `key`; the error names the file that does not load, or
    /// says that the key is not the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerCert> {
        Ok(ServerCert {
            config: RwLock::new(server_config(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        unpoisoned(self.config.read()).clone()
    }

    /// Re-reads both files (through symlinks, as certbot's `live/` files are);
    /// on success new connections get them, on failure the old configuration
    /// stays and the error says why. Connections made keep theirs.
    pub fn reload(&self) -> Result<()> {
        let fresh = server_config(&self.cert, &self.key)?;
        *unpoisoned(self.config.write()) = fresh;
        Ok(())
    }
}

/// The server's side of a handshake on `io`, within its deadline. A TLS error
/// (the client's garbage, or its alert: e.g. it does not trust the
/// certificate) names the SNI the client sent.
pub fn accept(config: &Arc<ServerConfig>, io: DeadlineStream) -> Result<ServerStream> {
    let conn = ServerConnection::new(config.clone()).map_err(|e| Error::Tls(e.to_string()))?;
    handshake(StreamOwned::new(conn, io)).map_err(|(conn, e)| match e.kind() {
        std::io::ErrorKind::InvalidData => {
            let sni = conn.server_name().unwrap_or("-");
            Error::Tls(format!("handshake (SNI {sni}): {e}"))
        }
        _ => Error::io("handshake", e),
    })
}

/// A client's handshake with `name` (SNI, and the name its certificate must
/// hold) on `io`, within its deadline.
pub fn connect(config: &Arc<ClientConfig>, name: &str, io: DeadlineStream) -> Result<ClientStream> {
    let server_name =
        ServerName::try_from(name.to_string()).map_err(|e| Error::Tls(format!("{name}: {e}")))?;
    let conn = ClientConnection::new(config.clone(), server_name)
        .map_err(|e| Error::Tls(e.to_string()))?;
    handshake(StreamOwned::new(conn, io)).map_err(|(_, e)| Error::io("handshake", e))
}

/// Drives a handshake to its end; on an error, the connection and what failed.
fn handshake<C, D>(
    mut tls: StreamOwned<C, DeadlineStream>,
) -> std::result::Result<StreamOwned<C, DeadlineStream>, (C, std::io::Error)>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return Err((tls.conn, e));
        }
    }
    Ok(tls)
}
