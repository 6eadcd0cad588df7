//! No module of a shipped crate depends on another that depends back on it: this test reads each
//! crate's source, takes the top-level modules (a file or a directory under `src/`, the crate
//! root aside) and the `crate::<module>` paths each one names outside its unit tests, and fails
//! on any cycle between them.

use std::collections::{BTreeMap, BTreeSet};
mod common;

const CRATES: &[&str] = &["schemas", "service", "client", "door", "bridge", "engine", "replay", "sim", "cli"];

/// Cycles still there: (crate, modules). None: the list stays for a cycle met while taking
/// one apart, and the test fails when a listed cycle is gone, so the list stays true.
const KNOWN: &[(&str, &[&str])] = &[];

/// The top-level modules `text` names as `crate::<module>` (also inside `use crate::{…}`),
/// up to its `#[cfg(test)]` module.
fn named_modules(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, d::{e, f}}`: the first name of each top-level item.
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(first_name(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.extend(first_name(&item));
        } else {
            out.extend(first_name(rest));
        }
    }
    out
}

fn first_name(path: &str) -> Option<String> {
    let name: String = path.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())).then_some(name)
}

/// The strongly connected groups of more than one module.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability is enough at this size: a and b are in one cycle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = edges.keys().map(|m| (m, reach(m))).collect();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for (m, r) in &reaches {
        let mut group: Vec<String> = reaches
            .iter()
            .filter(|(o, ro)| r.contains(*o as &String) && ro.contains(*m as &String))
            .map(|(o, _)| (*o).clone())
            .collect();
        group.sort();
        if group.len() > 1 && !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

#[test]
fn no_module_depends_on_one_that_depends_back() {
    let root = common::root();
    let mut found = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let all = common::rust_files(&src);
        assert!(!all.is_empty(), "{krate}: no source found");
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in all {
            let relative = file.strip_prefix(&src).unwrap_or(&file);
            let top = relative
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned());
            let Some(top) = top.filter(|t| t != "lib" && t != "main") else { continue };
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let named: Vec<String> = named_modules(&text).into_iter().filter(|m| *m != top).collect();
            edges.entry(top).or_default().extend(named);
        }
        // Only the crate's own modules (not its root's items, such as `crate::EngineConfig`).
        let modules: BTreeSet<String> = edges.keys().cloned().collect();
        for targets in edges.values_mut() {
            targets.retain(|t| modules.contains(t));
        }
        for group in cycles(&edges) {
            found.push((krate.to_string(), group));
        }
    }
    let known: Vec<(String, Vec<String>)> =
        KNOWN.iter().map(|(k, g)| (k.to_string(), g.iter().map(|m| m.to_string()).collect())).collect();
    assert_eq!(found, known, "module cycles (crate, modules) differ from the known ones");
}

#[test]
fn the_reader_sees_paths_and_use_groups() {
    let text = "use crate::log::{A, B};\nuse crate::{driver, machines::{x, y}, EngineConfig};\nfn f() { crate::cluster::go(); }\n#[cfg(test)]\nuse crate::later;";
    let named: Vec<String> = named_modules(text).into_iter().collect();
    assert_eq!(named, ["cluster", "driver", "log", "machines"]);
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned(), "c".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(cycles(&edges), vec![vec!["a".to_owned(), "b".to_owned()]]);
}
