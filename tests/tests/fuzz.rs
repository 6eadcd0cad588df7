//! The fuzz targets: the inputs kept in `tests/fuzz-regressions/` never crash again, and a
//! short seeded run over every target finds nothing (the long runs: `docs/security.md`).

use std::path::Path;

use callbus_tests::fuzz::{mutate, targets, Rng};

#[test]
fn kept_inputs_do_not_crash_their_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions");
    let mut replayed = 0;
    for target in targets() {
        let Ok(dir) = std::fs::read_dir(root.join(target.name)) else { continue };
        for entry in dir.filter_map(Result::ok) {
            let input = std::fs::read(entry.path()).expect("readable");
            let outcome = std::panic::catch_unwind(|| (target.run)(&input));
            assert!(outcome.is_ok(), "{} crashes on {}", target.name, entry.path().display());
            replayed += 1;
        }
    }
    assert!(replayed >= 2, "the kept inputs were found ({replayed})");
}

#[test]
fn a_short_seeded_run_of_every_target_finds_nothing() {
    for target in targets() {
        assert!(!target.seeds.is_empty(), "{} has seeds", target.name);
        let mut rng = Rng(0x5eed_f022 ^ target.name.len() as u64);
        let mut accepted = 0;
        for seed in &target.seeds {
            assert!(std::panic::catch_unwind(|| (target.run)(seed)).is_ok(), "{} crashes on a seed", target.name);
        }
        for _ in 0..3_000 {
            let a = &target.seeds[rng.below(target.seeds.len())];
            let b = &target.seeds[rng.below(target.seeds.len())];
            let input = mutate(&mut rng, a, b);
            match std::panic::catch_unwind(|| (target.run)(&input)) {
                Ok(ok) => accepted += usize::from(ok),
                Err(_) => panic!("{} crashes on {:?}", target.name, String::from_utf8_lossy(&input)),
            }
        }
        assert!(accepted > 0, "{}: no mutated input was accepted: the mutations do not reach the parser", target.name);
    }
}
