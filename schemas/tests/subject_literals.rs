//! Every NATS subject callbus uses is built by `callbus_schemas::subjects` (or `input`, which
//! builds on it): this test fails when a string literal that starts a subject (`"callbus.…"`,
//! `"opensips.…"`, `"$SRV.…"` outside the service crate) appears in the source of any other
//! crate, so the contract has one spelling.

mod common;

use std::path::PathBuf;

/// The source dirs of the crates that ship in `callbus` (the tests and benchmarks, `tests/`,
/// are the contract's clients and name its subjects to check them).
const SOURCE_DIRS: &[&str] =
    &["schemas/src", "service/src", "bridge/src", "engine/src", "replay/src", "sim/src", "cli/src"];

/// Files allowed to spell subjects: where they are built.
const BUILDERS: &[&str] = &["schemas/src/subjects.rs", "service/src/lib.rs"];

/// The places in `text` where a string literal starts with a subject, as `line: literal start`;
/// comments and `#[cfg(test)]` modules are skipped.
fn subject_literals(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        if code.starts_with("#[cfg(test)]") {
            break; // unit tests name subjects to check them
        }
        for start in ["\"callbus.", "\"opensips.", "\"$SRV."] {
            if let Some(i) = code.find(start) {
                let rest = &code[i + 1..];
                // A file name, not a subject.
                if rest.starts_with("callbus.toml") {
                    continue;
                }
                found.push(format!("{}: {}", n + 1, rest.chars().take(40).collect::<String>()));
            }
        }
    }
    found
}

#[test]
fn subjects_are_spelled_only_where_they_are_built() {
    let root = common::root();
    let files: Vec<PathBuf> = SOURCE_DIRS.iter().flat_map(|dir| common::rust_files(&root.join(dir))).collect();
    assert!(files.len() > 30, "the source was found ({} files)", files.len());
    let mut spelled = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap_or(&file).to_string_lossy().replace('\\', "/");
        if BUILDERS.contains(&relative.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        spelled.extend(subject_literals(&text).into_iter().map(|at| format!("{relative}:{at}")));
    }
    assert!(spelled.is_empty(), "subjects spelled outside schemas/src/subjects.rs (build them there): {spelled:#?}");
}

#[test]
fn the_scan_finds_what_it_looks_for() {
    let text = "let a = \"callbus.cmd.x\";\n// \"opensips.n.status\"\nlet f = \"callbus.toml\";\nlet b = format!(\"opensips.{n}.mi\");\n#[cfg(test)]\nlet c = \"callbus.call.>\";\n";
    let found = subject_literals(text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].starts_with("1: callbus.cmd.x") && found[1].starts_with("4: opensips."), "{found:?}");
}
