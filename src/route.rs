//! Where a request on the well-known port goes, by its `Host` (docs/PROTOCOL.md
//! section 2): the registrar (also as `NODE.registrar_name`, this node's own
//! name for it), or a label under `servers_domain` (or under
//! `NODE.servers_domain`, this node's own name for it).
//!
//! Invariants: matching is case-insensitive and ignores a `:port` and a trailing
//! dot; a label is returned only validated and in lower case; anything else is
//! `MisdirectedHost` (421), never a guess.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::label;

/// Where a request goes, by its `Host`.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The registrar host.
    Registrar,
    /// `LABEL.servers_domain`, with the label validated and lower case.
    Label(String),
}

/// Routes a `Host` value: case-insensitive, any `:port` ignored.
pub fn route(host: Option<&str>, config: &Config) -> Result<Route> {
    let host = host
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::BadRequest("no Host header".into()))?;
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == config.registrar_name || config.node_registrar_name().is_some_and(|n| n == name) {
        return Ok(Route::Registrar);
    }
    if let Some(label) = name.strip_suffix(&format!(".{}", config.servers_domain)) {
        // `LABEL.NODE.servers_domain`, this node's name for a label (what a
        // cross-node 307 names), is the label too.
        let label = match &config.node {
            Some(node) => label.strip_suffix(&format!(".{node}")).unwrap_or(label),
            None => label,
        };
        if let Ok(label) = label::validate(label) {
            return Ok(Route::Label(label));
        }
    }
    Err(Error::MisdirectedHost(host.chars().take(100).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_routing() {
        let c = Config::default();
        assert_eq!(
            route(Some("registrar.localhost"), &c).unwrap(),
            Route::Registrar
        );
        assert_eq!(
            route(Some("REGISTRAR.localhost:8443"), &c).unwrap(),
            Route::Registrar
        );
        assert_eq!(
            route(Some("Demo.taas.localhost:1"), &c).unwrap(),
            Route::Label("demo".into())
        );
        assert_eq!(
            route(Some("demo.taas.localhost."), &c).unwrap(),
            Route::Label("demo".into())
        );
        for bad in [
            "example.com",
            "a.b.taas.localhost",
            "taas.localhost",
            "-x.taas.localhost",
            "[::1]:80",
        ] {
            assert!(
                matches!(route(Some(bad), &c), Err(Error::MisdirectedHost(_))),
                "{bad}"
            );
        }
        assert!(matches!(route(None, &c), Err(Error::BadRequest(_))));
        let c = Config {
            node: Some("b".into()),
            ..Config::default()
        };
        assert_eq!(
            route(Some("cam.b.taas.localhost"), &c).unwrap(),
            Route::Label("cam".into())
        );
        assert!(route(Some("cam.c.taas.localhost"), &c).is_err());
        // This node's own registrar name; another node's is not here.
        assert_eq!(
            route(Some("B.registrar.localhost:8443"), &c).unwrap(),
            Route::Registrar
        );
        assert!(route(Some("c.registrar.localhost"), &c).is_err());
    }
}
