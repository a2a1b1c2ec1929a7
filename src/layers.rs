//! The layer picture of ARCHITECTURE.md, checked: every top-level module has a layer, and a
//! module imports only modules of lower layers, so no cycle between top-level modules can
//! come back unnoticed. Reads the source files themselves (no build tool needed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. A module may import modules of lower layers only; the leaves import nothing
/// of ours. Keep in step with the picture in ARCHITECTURE.md ("Layers").
const LAYERS: &[&[&str]] = &[
    &["vocab", "files", "human", "secret", "backoff"],
    &[
        "timing",
        "redact",
        "image_file",
        "platform",
        "logging",
        "http_body",
    ],
    &["config", "studio", "engine", "thumbnails"],
    &["models", "outbox", "crash", "registration", "policy"],
    &["runtime"],
    &["tray"],
    &["ui"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Top-level module → the top-level modules its files name through `crate::` (or a chain of
/// `super::` that climbs to the crate root).
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = relative
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        let top = parts[0].trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" || top == "layers" {
            continue;
        }
        // How many `super::` reach the crate root from this file's module.
        let file_name = parts.last().unwrap();
        let depth = parts.len() - usize::from(file_name == "mod.rs");
        let text = without_comments(&std::fs::read_to_string(&file).unwrap());
        let names = found.entry(top.clone()).or_default();
        for path in paths_in(&text) {
            let segments: Vec<&str> = path.split("::").collect();
            let target = match segments.as_slice() {
                ["crate", name, ..] => Some(*name),
                [..] if segments.iter().take_while(|s| **s == "super").count() == depth => {
                    segments.get(depth).copied()
                }
                _ => None,
            };
            let is_module = |name: &&str| !name.is_empty() && *name != top && *name != "self";
            if let Some(target) = target.filter(is_module) {
                names.insert(target.to_owned());
            }
        }
    }
    found
}

fn rust_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

fn without_comments(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        kept.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    kept.push_str(rest);
    kept.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::…` and `super::…` path, with `use crate::{a, b::c}` groups expanded.
fn paths_in(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix) {
            let start = from + at;
            from = start + prefix.len();
            let before = text[..start].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `super::` inside `super::super::`, or a longer identifier
            }
            let mut path = String::new();
            for c in text[start..].chars() {
                if c.is_alphanumeric() || c == '_' || c == ':' {
                    path.push(c);
                } else {
                    break;
                }
            }
            let rest = &text[start + path.len()..];
            if path.ends_with("::") && rest.starts_with('{') {
                // A group: one path per name in it (nested groups name their first segment).
                let group_end = rest.find('}').unwrap_or(rest.len());
                for name in rest[1..group_end].split([',', '{']) {
                    let name = name.trim();
                    if let Some(first) = name.split("::").next().filter(|n| !n.is_empty()) {
                        paths.push(format!("{path}{first}"));
                    }
                }
            } else {
                paths.push(path);
            }
        }
    }
    paths
}

fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        start: &str,
        trail: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                trail.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                trail.push(next.clone());
                if walk(graph, next, start, trail, seen) {
                    return true;
                }
                trail.pop();
            }
        }
        false
    }
    let mut trail = vec![start.to_owned()];
    walk(graph, start, start, &mut trail, &mut BTreeSet::new()).then_some(trail)
}

#[test]
fn top_level_modules_form_layers_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = imports(&src);
    assert!(graph.len() > 10, "the scan found the modules: {graph:?}");

    let mut problems = Vec::new();
    for module in graph.keys() {
        if let Some(cycle) = cycle_through(&graph, module) {
            problems.push(format!("cycle: {}", cycle.join(" → ")));
        }
    }
    for (module, targets) in &graph {
        let Some(layer) = layer_of(module) else {
            problems.push(format!(
                "{module} has no layer: add it to LAYERS and ARCHITECTURE.md"
            ));
            continue;
        };
        for target in targets {
            match layer_of(target) {
                Some(target_layer) if target_layer < layer => {}
                Some(_) => problems.push(format!(
                    "{module} (layer {layer}) imports {target}, which is not below it"
                )),
                None => problems.push(format!("{module} imports {target}, which has no layer")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_scanner_sees_groups_supers_and_ignores_comments() {
    let text = "use crate::{config::Config, vocab::{job, device}};\n\
                // use crate::ui;\n/* crate::cli */ let x = super::super::engine::sd::Request;";
    let paths = paths_in(&without_comments(text));
    assert!(paths.contains(&"crate::config".to_owned()), "{paths:?}");
    assert!(paths.contains(&"crate::vocab".to_owned()), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("super::super::engine")),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("ui") || p.contains("cli")),
        "{paths:?}"
    );

    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle_through(&graph, "a"),
        Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()])
    );
}
