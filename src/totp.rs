//! TOTP (RFC 6238) over totp-lite: generation, and what totp-lite lacks —
//! verification over a ±1 step window with a constant-time comparison (`subtle`).
//!
//! Invariants: a secret never leaves this module in a message; every candidate code
//! of the window is computed and compared, whichever matches, so the time taken
//! does not say which step (or whether any) matched.

use subtle::ConstantTimeEq;
use totp_lite::{Sha1, Sha256, Sha512, totp_custom};

use crate::error::{Error, Result};

/// Shortest and longest code accepted (RFC 4226 section 5.3 asks for at least 6;
/// 8 is the most that `otpauth://` clients generate).
pub const DIGITS: std::ops::RangeInclusive<u32> = 6..=8;
/// Steps accepted either side of now (docs/PROTOCOL.md section 1: previous and next).
pub const WINDOW: u64 = 1;

/// The HMAC of a TOTP (RFC 6238 section 1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA1, the default.
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl Algorithm {
    /// Parses `sha1`, `sha256`, `sha512` in any case (with or without a dash).
    pub fn parse(text: &str) -> Option<Algorithm> {
        match text.to_ascii_lowercase().replace('-', "").as_str() {
            "sha1" => Some(Algorithm::Sha1),
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    /// The name used in account records and `otpauth://` URIs.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

/// One account's TOTP parameters, decoded and checked.
#[derive(Clone)]
pub struct Totp {
    /// The shared secret, raw bytes (never printed: `Debug` is not derived).
    secret: Vec<u8>,
    /// Seconds per step (RFC 6238 X; default 30).
    pub step: u64,
    /// Code length; `None` for a legacy record: as many as the token has, 6 to 8.
    pub digits: Option<u32>,
    /// The HMAC.
    pub algorithm: Algorithm,
}

impl Totp {
    /// Builds from a base32 secret (padding, spaces and case are forgiven).
    pub fn new(base32: &str, step: u64, digits: Option<u32>, algorithm: Algorithm) -> Result<Totp> {
        let secret =
            decode_base32(base32).ok_or_else(|| Error::BadTotp("secret is not base32".into()))?;
        if secret.is_empty() {
            return Err(Error::BadTotp("secret is empty".into()));
        }
        if step == 0 {
            return Err(Error::BadTotp("step must be at least 1 second".into()));
        }
        if let Some(d) = digits
            && !DIGITS.contains(&d)
        {
            return Err(Error::BadTotp(format!("digits must be 6 to 8, not {d}")));
        }
        Ok(Totp {
            secret,
            step,
            digits,
            algorithm,
        })
    }

    /// The code for `unix_time` (seconds since the epoch).
    pub fn generate(&self, unix_time: u64) -> String {
        self.code(unix_time / self.step, self.digits.unwrap_or(6))
    }

    /// The code of time step `counter` with `digits` digits.
    fn code(&self, counter: u64, digits: u32) -> String {
        let time = counter.saturating_mul(self.step);
        match self.algorithm {
            Algorithm::Sha1 => totp_custom::<Sha1>(self.step, digits, &self.secret, time),
            Algorithm::Sha256 => totp_custom::<Sha256>(self.step, digits, &self.secret, time),
            Algorithm::Sha512 => totp_custom::<Sha512>(self.step, digits, &self.secret, time),
        }
    }

    /// The time step (counter) that `token` is valid for, within ±`WINDOW` steps of
    /// `unix_time`, or `None`. Where several match, the latest.
    pub fn verify(&self, token: &str, unix_time: u64) -> Option<u64> {
        let digits = match self.digits {
            Some(d) => d,
            None => u32::try_from(token.len()).ok()?,
        };
        if token.len() != digits as usize || !DIGITS.contains(&digits) {
            return None;
        }
        let now = unix_time / self.step;
        let mut found = None;
        for counter in now.saturating_sub(WINDOW)..=now.saturating_add(WINDOW) {
            let candidate = self.code(counter, digits);
            if bool::from(candidate.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(counter);
            }
        }
        found
    }
}

/// Decodes RFC 4648 base32, forgiving lower case, spaces and `=` padding.
pub fn decode_base32(text: &str) -> Option<Vec<u8>> {
    let clean: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).ok()
}

/// Encodes RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn encode_base32(bytes: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B: the seeds are ASCII "1234567890" repeated to 20, 32
    /// and 64 bytes; 8 digits; 30 s step.
    #[test]
    fn rfc6238_appendix_b_vectors() {
        let seed = |n: usize| encode_base32(&b"1234567890".repeat(7)[..n]);
        let cases: [(u64, &str, &str, &str); 6] = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        for (time, sha1, sha256, sha512) in cases {
            for (alg, n, want) in [
                (Algorithm::Sha1, 20, sha1),
                (Algorithm::Sha256, 32, sha256),
                (Algorithm::Sha512, 64, sha512),
            ] {
                let t = Totp::new(&seed(n), 30, Some(8), alg).unwrap();
                assert_eq!(t.generate(time), want, "{alg:?} at {time}");
                assert_eq!(t.verify(want, time), Some(time / 30));
            }
        }
    }

    #[test]
    fn window_is_one_step_each_side() {
        let t = Totp::new("JBSWY3DPEHPK3PXP", 30, Some(6), Algorithm::Sha1).unwrap();
        let now = 1_700_000_000;
        let step = now / 30;
        assert_eq!(t.verify(&t.generate(now - 30), now), Some(step - 1));
        assert_eq!(t.verify(&t.generate(now + 30), now), Some(step + 1));
        assert_eq!(t.verify(&t.generate(now - 60), now), None);
        assert_eq!(t.verify(&t.generate(now + 60), now), None);
    }

    #[test]
    fn digits_rules() {
        let legacy = Totp::new("JBSWY3DPEHPK3PXP", 30, None, Algorithm::Sha1).unwrap();
        let now = 1_700_000_000;
        let six = legacy.generate(now);
        assert_eq!(six.len(), 6);
        assert!(legacy.verify(&six, now).is_some());
        let eight = Totp::new("JBSWY3DPEHPK3PXP", 30, Some(8), Algorithm::Sha1)
            .unwrap()
            .generate(now);
        assert!(
            legacy.verify(&eight, now).is_some(),
            "legacy takes 8 digits too"
        );
        let fixed = Totp::new("JBSWY3DPEHPK3PXP", 30, Some(6), Algorithm::Sha1).unwrap();
        assert_eq!(
            fixed.verify(&eight, now),
            None,
            "an account with digits=6 refuses 8"
        );
        assert_eq!(legacy.verify("12345", now), None);
        assert_eq!(legacy.verify("abcdef", now), None);
        assert!(Totp::new("JBSWY3DPEHPK3PXP", 30, Some(9), Algorithm::Sha1).is_err());
        assert!(Totp::new("not base32!", 30, None, Algorithm::Sha1).is_err());
    }

    #[test]
    fn base32_is_forgiving() {
        assert_eq!(
            decode_base32("jbsw y3dp ehpk 3pxp").unwrap(),
            b"Hello!\xde\xad\xbe\xef"
        );
        assert_eq!(decode_base32("MZXW6===").unwrap(), b"foo");
        assert_eq!(encode_base32(b"foo"), "MZXW6");
    }
}
