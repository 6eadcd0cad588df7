//! `docs/subjects.md`'s command, error and notification tables are generated from
//! `callbus_schemas::catalog`: this test fails when they differ, and rewrites them when run with
//! `CALLBUS_BLESS=1` (then review the diff).

use std::path::PathBuf;

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/subjects.md")
}

/// `text` with each generated section replaced by `sections`' text; errors name a missing marker.
fn regenerate(text: &str, sections: &[(&str, String)]) -> Result<String, String> {
    let mut out = text.to_owned();
    for (name, body) in sections {
        let begin = format!("<!-- generated: {name} (from schemas/src/catalog.rs; CALLBUS_BLESS=1 cargo test -p callbus-schemas --test subjects_doc) -->\n");
        let end = format!("<!-- end: {name} -->");
        let start = out.find(&begin).ok_or_else(|| format!("docs/subjects.md lacks the line {begin:?}"))? + begin.len();
        let stop = out[start..].find(&end).ok_or_else(|| format!("docs/subjects.md lacks {end:?}"))? + start;
        out.replace_range(start..stop, body);
    }
    Ok(out)
}

#[test]
fn the_tables_of_docs_subjects_are_the_catalogs() {
    let path = doc_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let expected = regenerate(&text, &callbus_schemas::catalog::sections()).unwrap_or_else(|e| panic!("{e}"));
    if expected == text {
        return;
    }
    if std::env::var_os("CALLBUS_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("write docs/subjects.md");
        eprintln!("rewrote the generated tables of {}", path.display());
        return;
    }
    let first = text.lines().zip(expected.lines()).position(|(a, b)| a != b).unwrap_or(0);
    panic!(
        "docs/subjects.md's tables differ from schemas/src/catalog.rs from line {}:\n  doc:     {:?}\n  catalog: {:?}\nEdit the catalog (not the table), then run CALLBUS_BLESS=1 cargo test -p callbus-schemas --test subjects_doc",
        first + 1,
        text.lines().nth(first).unwrap_or(""),
        expected.lines().nth(first).unwrap_or("")
    );
}

#[test]
fn a_missing_marker_is_named() {
    let e = regenerate("no markers here", &[("commands", String::new())]).expect_err("missing");
    assert!(e.contains("generated: commands"), "{e}");
}
