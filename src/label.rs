//! LABEL rules (PROTOCOL.md section 5): one DNS label, 1 to 63 of `a-z 0-9 -`, not
//! starting or ending with `-`, compared in lower case.

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

#[cfg(test)]
mod tests {
    use super::*;

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
