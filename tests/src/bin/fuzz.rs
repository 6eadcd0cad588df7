//! `fuzz`: runs every target of `callbus_tests::fuzz` for a while. Prints
//! `RESULT|fuzz <target> executions|N|execs`, crashes and the share of inputs accepted.
//!
//! `cargo run --release -p callbus-tests --bin fuzz -- --seconds 3` is the CI run;
//! the long run is `-- --seconds 600` (see `docs/security.md`). `--target NAME` runs one
//! target; `--seed N` replays a sequence. A crash's input is saved in `fuzz-crashes/`; move it
//! to `tests/fuzz-regressions/<target>/` once fixed, where a test replays it for ever.

use std::time::{Duration, Instant};

use callbus_tests::fixtures_dir as fixtures;
use callbus_tests::fuzz::{mutate, targets, Rng};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let seconds: f64 = value("--seconds").and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let only = value("--target");
    let seed: u64 = value("--seed").and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    // Seeds are read (and a missing fixtures folder reported) before panics go quiet.
    let targets = targets();
    for target in &targets {
        assert!(!target.seeds.is_empty(), "{}: no seeds (fixtures at {}?)", target.name, fixtures().display());
    }
    // Panics are expected to be caught and reported, not printed mid-run.
    std::panic::set_hook(Box::new(|_| {}));
    eprintln!("fuzz: seed {seed}, {seconds} s per target");
    let mut total_crashes = 0;
    for target in targets {
        if only.as_deref().is_some_and(|o| o != target.name) {
            continue;
        }
        let mut rng = Rng(seed ^ (target.name.len() as u64 * 0x9e37_79b9_7f4a_7c15) | 1);
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let (mut execs, mut crashes, mut accepted, mut slowest) = (0u64, 0u64, 0u64, Duration::ZERO);
        // The seeds themselves first.
        let mut pending: Vec<Vec<u8>> = target.seeds.clone();
        while Instant::now() < deadline {
            let input = pending.pop().unwrap_or_else(|| {
                let a = &target.seeds[rng.below(target.seeds.len())];
                let b = &target.seeds[rng.below(target.seeds.len())];
                mutate(&mut rng, a, b)
            });
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(|| (target.run)(&input));
            slowest = slowest.max(started.elapsed());
            execs += 1;
            accepted += u64::from(matches!(outcome, Ok(true)));
            if outcome.is_err() {
                crashes += 1;
                let _ = std::fs::create_dir_all("fuzz-crashes");
                let path = format!("fuzz-crashes/{}-{crashes}.bin", target.name);
                let _ = std::fs::write(&path, &input);
                eprintln!("CRASH in {}: input saved to {path}", target.name);
            }
        }
        println!("RESULT|fuzz {} executions|{execs}|execs", target.name);
        println!("RESULT|fuzz {} crashes|{crashes}|crashes", target.name);
        println!("RESULT|fuzz {} inputs accepted|{:.1}|%", target.name, accepted as f64 * 100.0 / execs.max(1) as f64);
        println!("RESULT|fuzz {} slowest execution|{:.3}|ms", target.name, slowest.as_secs_f64() * 1e3);
        total_crashes += crashes;
    }
    if total_crashes > 0 {
        eprintln!("fuzz: {total_crashes} crashes (seed {seed}); inputs in fuzz-crashes/");
        std::process::exit(1);
    }
}
