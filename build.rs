//! Puts the git revision in the binary (`taas --version`). No timestamp, no path:
//! the same revision builds the same bytes from any checkout.

use std::process::Command;

fn main() {
    let rev = std::env::var("TAAS_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TAAS_GIT_REV={rev}");
    println!("cargo:rerun-if-env-changed=TAAS_GIT_REV");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
