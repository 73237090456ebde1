//! The relay's layering (relay/src/lib.rs): each layer imports only the layers below it, so
//! no two modules import each other. Reads every source file and checks each `crate::…`
//! path in its code (comments aside) against the table below; a new top-level module must
//! be given a layer here.

use std::path::{Path, PathBuf};

/// Top-level modules, bottom to top. A module may use its own files and the layers below.
const LAYERS: &[&[&str]] = &[
    &["template", "pem"],
    &["config"],
    &[
        "protocol", "metrics", "limits", "slots", "signal", "clock", "events",
    ],
    &[
        "task", "confirm", "auth", "authz", "nats", "history", "registry",
    ],
    &["access"],
    &["conn"],
    &["fanout"],
    &["presence"],
    &["state"],
    &["session"],
    &["edge"],
    &["runtime"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("relay/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file's code names with `crate::`.
fn uses(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(braced) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: every name in the braces.
                let inner = braced.split('}').next().unwrap_or("");
                for part in inner.split(',') {
                    let n = part.trim().split("::").next().unwrap_or("").trim();
                    if !n.is_empty() {
                        found.push(n.to_owned());
                    }
                }
            } else if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

#[test]
fn every_layer_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 30, "found only {} source files", files.len());
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a name")
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(own) = layer(&top) else {
            wrong.push(format!(
                "{}: module `{top}` has no layer in tests/layering.rs",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable");
        for used in uses(&text) {
            if used == top {
                continue;
            }
            match layer(&used) {
                Some(l) if l < own => {}
                Some(l) => wrong.push(format!(
                    "{}: `crate::{used}` (layer {l}) from layer {own} (`{top}`)",
                    rel.display()
                )),
                None => wrong.push(format!(
                    "{}: `crate::{used}` is not a module with a layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_every_form_of_import() {
    let text = "use crate::a::B;\nuse crate::{b, c::D};\nlet x = crate::d::f(); // crate::e\n/// crate::f\n";
    assert_eq!(uses(text), ["a", "b", "c", "d"]);
}
