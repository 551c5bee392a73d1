//! Logging: `log` + `env_logger`, to stderr (journald adds its own time) and, when
//! `log_file` is set, appended to that file with a UTC timestamp. `reopen` is what
//! SIGHUP calls after logrotate moved the file.
//!
//! Invariants: nothing here formats a secret; callers never pass one; a peer's
//! text goes into a line only through `escape` (or `loggable_target`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::sys::{NOFOLLOW, lock};

/// The log file, when one is configured: its path and the open handle.
static LOG_FILE: OnceLock<(PathBuf, Mutex<File>)> = OnceLock::new();

/// Installs the logger; `RUST_LOG` overrides the default level `info`.
pub fn init(log_file: Option<&Path>) -> Result<()> {
    if let Some(path) = log_file {
        let file = open(path)?;
        let _ = LOG_FILE.set((path.to_path_buf(), Mutex::new(file)));
    }
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder
        .format(|buf, record| {
            writeln!(
                buf,
                "{} {:<5} {}",
                timestamp(SystemTime::now()),
                record.level(),
                record.args()
            )
        })
        .target(env_logger::Target::Pipe(Box::new(Tee)));
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
    Ok(())
}

/// Re-opens the log file (what SIGHUP does, after logrotate moved it). A failure
/// is logged and the old handle kept, so no line is lost for want of a file.
pub fn reopen() {
    let Some((path, file)) = LOG_FILE.get() else {
        log::info!("SIGHUP: no log file to reopen (log_file unset)");
        return;
    };
    match open(path) {
        Ok(new) => {
            *lock(file) = new;
            log::info!("SIGHUP: log file reopened");
        }
        Err(e) => log::error!("log file not reopened: {e}"),
    }
}

/// A request target as logged: the path, and "?…" in place of a query, which
/// may carry the hidden service's users' secrets (`?code=`, `?token=`); escaped
/// as `escape` does.
pub fn loggable_target(target: &str) -> String {
    match target.split_once('?') {
        Some((path, _)) => format!("{}?…", escape(path)),
        None => escape(target),
    }
}

/// A peer's text as a log field: printable ASCII as it is, the rest escaped
/// (`\n`, `\u{1b}`), at most 200 characters, so a peer cannot forge log lines.
pub fn escape(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_default)
        .collect();
    if text.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

/// Opens the log for appending: created 0600 (it names IDs and addresses), never
/// through a symlink.
fn open(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(NOFOLLOW)
        .open(path)
        .and_then(|f| {
            // A log left 0644 by an earlier version becomes 0600 too.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(f)
        })
        .map_err(|e| Error::file(path, "open log file", e))
}

/// Writes each log line to stderr and to the log file.
struct Tee;

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some((_, file)) = LOG_FILE.get() {
            let _ = lock(file).write_all(buf);
        }
        io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, UTC), without a date crate: days to
/// civil date by Howard Hinnant's algorithm.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn peer_text_is_escaped_in_log_fields() {
        assert_eq!(escape("demo.taas.localhost"), "demo.taas.localhost");
        assert_eq!(escape("a\r\nINFO forged"), "a\\r\\nINFO forged");
        assert_eq!(escape("\u{1b}[31m"), "\\u{1b}[31m");
        assert_eq!(loggable_target("/x\n?secret=1"), "/x\\n?…");
        assert!(escape(&"x".repeat(500)).len() <= 204);
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(timestamp(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_800);
        assert_eq!(timestamp(t), "2100-01-01T00:00:00.000Z");
    }
}
