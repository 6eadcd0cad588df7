//! The checked-in JSON Schemas in `schemas/json/` are exactly what the Rust types generate.
//! Regenerate with `CALLBUS_UPDATE_SCHEMAS=1 cargo test -p callbus-schemas --test json_schema_drift`.

use std::path::PathBuf;

#[test]
fn checked_in_schemas_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let update = std::env::var_os("CALLBUS_UPDATE_SCHEMAS").is_some();
    let mut drift = Vec::new();
    let generated = callbus_schemas::json_schema::all();
    for (name, schema) in &generated {
        let path = dir.join(format!("{name}.json"));
        let text = callbus_schemas::json_schema::render(schema);
        if update {
            std::fs::write(&path, &text).expect("write schema");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            drift.push(path.display().to_string());
        }
    }
    let on_disk = std::fs::read_dir(&dir).expect("schemas/json exists").count();
    assert_eq!(on_disk, generated.len(), "schemas/json holds files no type generates");
    assert!(
        drift.is_empty(),
        "JSON Schemas differ from the code: {drift:?}\nrun: CALLBUS_UPDATE_SCHEMAS=1 cargo test -p callbus-schemas --test json_schema_drift"
    );
}
