//! The relay's certificate, an operator tool (`taas cert`, and the first start of
//! `taas serve` with the default paths): a key pair and a self-signed certificate
//! made with rcgen (on ring, the one crypto library linked). Loading them is
//! `tls`'s.
//!
//! Invariants: a key is written mode 0400 and a certificate 0444, never over an
//! existing file nor through a symlink; key material is never put in a message.

use std::fs;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::sys::create_private;

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
    create_private(&config.key, key.as_bytes(), 0o400)?;
    // Both or neither: a key without its certificate would block the next try.
    create_private(&config.cert, cert.as_bytes(), 0o444).map_err(|e| {
        let _ = fs::remove_file(&config.key);
        e.into()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{client_config, server_config};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

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
