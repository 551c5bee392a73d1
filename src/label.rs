//! LABEL rules (docs/PROTOCOL.md section 5): one DNS label, 1 to 63 of `a-z 0-9 -`, not
//! starting or ending with `-`, compared in lower case. An account's label entry
//! may be `LABEL:PORT`, the original's fixed-port form (docs/PROTOCOL.md section 2).

use crate::error::{Error, Result};

/// Longest DNS label (RFC 1035 section 2.3.4).
pub const MAX_LABEL: usize = 63;

/// Returns the label in lower case, or `BadLabel`.
pub fn validate(label: &str) -> Result<String> {
    let lower = label.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= MAX_LABEL
        && !lower.starts_with('-')
        && !lower.ends_with('-')
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(lower)
    } else {
        Err(Error::BadLabel(label.chars().take(80).collect()))
    }
}

/// An account's label entry: `LABEL` or `LABEL:PORT` (a fixed rendezvous port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The label, lower case.
    pub name: String,
    /// The fixed rendezvous port, when the entry is `LABEL:PORT`.
    pub port: Option<u16>,
}

impl Entry {
    /// Parses `LABEL` or `LABEL:PORT` (PORT 1 to 65535); the label is validated.
    pub fn parse(text: &str) -> Result<Entry> {
        let (name, port) = match text.split_once(':') {
            None => (text, None),
            Some((name, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| Error::BadLabel(text.chars().take(80).collect()))?;
                (name, Some(port))
            }
        };
        Ok(Entry {
            name: validate(name)?,
            port,
        })
    }

    /// The entry as an account stores it: `label` or `label:port`.
    pub fn stored(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.name),
            None => self.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_port_entries() {
        let e = Entry::parse("Cam:8888").unwrap();
        assert_eq!((e.name.as_str(), e.port), ("cam", Some(8888)));
        assert_eq!(e.stored(), "cam:8888");
        assert_eq!(Entry::parse("web").unwrap().port, None);
        for bad in [
            "cam:",
            "cam:0",
            "cam:65536",
            "cam:+1",
            "cam:1:2",
            ":80",
            "a_b:80",
        ] {
            assert!(Entry::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accepts_dns_labels_in_lower_case() {
        assert_eq!(validate("Demo-1").unwrap(), "demo-1");
        assert_eq!(validate("a").unwrap(), "a");
        assert!(validate(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in ["", "-a", "a-", "a.b", "a_b", "é", "a b", &"x".repeat(64)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
