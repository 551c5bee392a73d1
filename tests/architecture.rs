//! The module graph follows the data flow (issue 15): every module of `src/`
//! (a file, with its submodules' files) belongs to a declared layer, imports only from its own layer or those below, and no
//! imports go in a circle. An import is a `crate::NAME` path (or a name in a
//! `use crate::{…}` group) outside the file's trailing `#[cfg(test)]` module and
//! its comments; `main.rs` (the binary) and `lib.rs` (the map) are not modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    ("base: imports nothing of the crate", &["sys"]),
    ("base: the error type", &["error"]),
    (
        "rules",
        &[
            "http",
            "label",
            "limits",
            "logging",
            "redis_link",
            "relay",
            "totp",
        ],
    ),
    (
        "core",
        &[
            "auth",
            "config",
            "directory",
            "metrics",
            "pool",
            "store",
            "tls",
        ],
    ),
    ("state", &["state"]),
    ("steps", &["plug", "rendezvous", "route", "status"]),
    (
        "steps: the node's heartbeat, above the rendezvous",
        &["node"],
    ),
    ("steps: the registrar, above the plug", &["registrar"]),
    ("the relay process", &["server"]),
    ("operator tools", &["admin", "agent", "cert", "provision"]),
];

/// Items of `lib.rs` that are not modules but may be named (`crate::version()`).
const LIB_ITEMS: &[&str] = &["version"];

/// Module → the modules it imports. A module is `src/NAME.rs` with the files
/// under `src/NAME/` (its submodules).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_str()
                .unwrap();
            let name = top.trim_end_matches(".rs").to_string();
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let body = match text.rfind("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            let code: String = body
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            graph.entry(name).or_default().extend(imports(&code));
        }
    }
    graph
}

/// The first segment of every `crate::…` path in `code`, the heads of a
/// `crate::{a, b::c}` group included.
fn imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

#[test]
fn every_module_has_a_layer_and_imports_only_downwards() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let Some(own) = layer_of(module) else {
            wrong.push(format!(
                "src/{module}.rs is in no layer of tests/architecture.rs"
            ));
            continue;
        };
        for dep in deps {
            if dep == module || LIB_ITEMS.contains(&dep.as_str()) {
                continue;
            }
            if !graph.contains_key(dep) {
                wrong.push(format!(
                    "{module} names crate::{dep}, which is not a module: name the module that defines it"
                ));
                continue;
            }
            let theirs = layer_of(dep).unwrap_or(usize::MAX);
            if theirs > own {
                wrong.push(format!(
                    "{module} ({}) imports {dep} ({}), a higher layer",
                    LAYERS[own].0,
                    LAYERS.get(theirs).map_or("no layer", |l| l.0)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_import_circles() {
    let graph = graph();
    // Depth-first search; a back edge to a module on the stack closes a circle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        circles: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|s| *s == m) {
            let mut circle = stack[at..].to_vec();
            circle.push(m);
            circles.push(circle.join(" -> "));
            return;
        }
        if !done.insert(m) {
            return;
        }
        stack.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            if dep != m && graph.contains_key(dep) {
                visit(dep, graph, stack, done, circles);
            }
        }
        stack.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

/// Imports no layer rule forbids but the flow does: the two branches of the
/// answer (`registrar` → `plug`, and `rendezvous`) never import each other, and
/// `route` and `status` import no step.
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("registrar", &["rendezvous", "status", "route"]),
    ("plug", &["rendezvous", "registrar", "status", "route"]),
    ("rendezvous", &["registrar", "plug", "status", "route"]),
    ("route", &["registrar", "plug", "rendezvous", "status"]),
    ("status", &["registrar", "plug", "rendezvous", "route"]),
    ("pool", &["state", "plug", "rendezvous", "relay"]),
];

#[test]
fn the_bottom_imports_nothing_and_the_branches_stay_apart() {
    let graph = graph();
    assert_eq!(
        graph["sys"],
        BTreeSet::new(),
        "sys imports nothing of the crate"
    );
    for (module, never) in FORBIDDEN {
        for dep in *never {
            assert!(!graph[*module].contains(*dep), "{module} imports {dep}");
        }
    }
}

#[test]
fn the_import_reader_sees_paths_and_groups() {
    let got = imports("use crate::a::B;\nuse crate::{b, c::{D, e}, f};\nlet x = crate::g::h();");
    let want: BTreeSet<String> = ["a", "b", "c", "f", "g"].map(String::from).into();
    assert_eq!(got, want);
}
