//! The README's quick start, run as written: the commands are read from the
//! block README.md marks for this test, so the two cannot drift apart. They run
//! with the real binary in a temporary directory on the embedded defaults,
//! against a plain-HTTP app, and the last one, curl verifying the label's
//! certificate against `taas-data/ca.crt`, must print the app's page.
//!
//! Shortcuts admitted, for tests that run in parallel: the README's fixed ports
//! (8443, the relay; 8080, the app) become free ports, in the commands and in a
//! `taas.toml` that sets only `port`; `make run` becomes what its recipe runs
//! (`taas serve`, checked against the Makefile); `ID` becomes the ID `taas users
//! add` printed; curl gets `-sS --max-time 10` and is retried until the agent's
//! registrations are in (bounded).
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{APP_TEXT, PlainApp, Proc, taas_bin, wait_until};

/// The line before the block.
const MARK: &str = "<!-- tests/quickstart.rs runs the next block";

/// The commands of the marked block, comments and blank lines dropped.
fn quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let at = readme
        .find(MARK)
        .expect("README.md marks its quick start block for tests/quickstart.rs");
    let mut lines = readme[at..].lines().skip(1);
    assert_eq!(
        lines.next(),
        Some("```sh"),
        "the block follows the mark at once"
    );
    let commands: Vec<String> = lines
        .take_while(|l| !l.starts_with("```"))
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for c in &commands {
        assert!(
            !c.contains(['"', '\'', '$', '|', ';', '&', '\\', '`']),
            "a simple command, split at spaces: {c}"
        );
    }
    commands
}

/// What `make run` runs, from the Makefile: `… -- serve`.
fn make_run_is_serve() {
    let makefile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Makefile")).unwrap();
    let recipe = makefile
        .split("\nrun:")
        .nth(1)
        .and_then(|r| r.lines().nth(1))
        .expect("a run: target with a recipe");
    assert!(
        recipe.trim_end().ends_with("-- serve"),
        "make run: {recipe}"
    );
}

#[test]
fn readme_quick_start_works_as_written() {
    let commands = quick_start();
    assert!(
        commands.first().is_some_and(|c| c == "make run")
            && commands.last().is_some_and(|c| c.starts_with("curl ")),
        "the quick start starts the relay and ends with curl: {commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let relay_port = support::free_port();
    let app = PlainApp::start();
    std::fs::write(
        dir.path().join("taas.toml"),
        format!("port = {relay_port}\n"),
    )
    .unwrap();
    let mut running: Vec<Proc> = Vec::new();
    let mut id: Option<String> = None;
    let mut page = None;
    for (n, written) in commands.iter().enumerate() {
        let mut command = written
            .replace("8443", &relay_port.to_string())
            .replace("8080", &app.port.to_string());
        if let Some(id) = &id {
            command = command.replace("/ID.", &format!("/{id}."));
        }
        let words: Vec<&str> = command.split_whitespace().collect();
        let log = dir.path().join(format!("{n}.log"));
        match words.as_slice() {
            ["make", "run"] => {
                make_run_is_serve();
                running.push(spawn(dir.path(), &["serve"], &log));
                assert!(
                    wait_until(Duration::from_secs(10), || support::is_listening(
                        relay_port
                    )),
                    "taas serve is not listening on {relay_port}:\n{}",
                    read(&log)
                );
            }
            ["taas", rest @ ..] if matches!(rest.first(), Some(&"serve" | &"expose")) => {
                running.push(spawn(dir.path(), rest, &log));
            }
            ["taas", rest @ ..] => {
                let (ok, out, err) = support::taas(dir.path(), rest);
                assert!(ok, "{written}: {err}");
                if rest.starts_with(&["users", "add"]) {
                    let file = out.lines().next().expect("users add prints the file");
                    let stem = Path::new(file).file_stem().unwrap().to_str().unwrap();
                    id = Some(stem.to_string());
                }
            }
            ["curl", rest @ ..] => {
                let mut last = String::new();
                let mut served = false;
                wait_until(Duration::from_secs(20), || {
                    // A relay or agent that stopped will not come back.
                    if running.iter_mut().any(Proc::exited) {
                        return true;
                    }
                    let out = Command::new("curl")
                        .args(["-sS", "--max-time", "10"])
                        .args(rest)
                        .current_dir(dir.path())
                        .output()
                        .expect("curl");
                    last = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    served = out.status.success() && last.contains(APP_TEXT);
                    served
                });
                let logs: String = (0..n)
                    .map(|k| read(&dir.path().join(format!("{k}.log"))))
                    .collect();
                assert!(
                    served,
                    "{written} did not print the app's page; last try:\n{last}\nlogs:\n{logs}"
                );
                page = Some(last);
            }
            _ => panic!("a quick start command this test cannot run: {written}"),
        }
    }
    let page = page.expect("the quick start ran curl");
    assert!(page.contains("<h1 id=greeting>"), "{page}");
    assert!(app.connections() > 0);
    drop(running);
}

/// A long-running `taas ARGS` in `dir`, its stderr in `log`.
fn spawn(dir: &Path, args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(taas_bin())
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
