//! The README's Python example (`examples/click_to_dial.py`, nats-py) against a running stack.
//!
//! It needs `python3` with `nats-py`; `CALLBUS_PYTHON` names the interpreter (`.ci/run` makes
//! a virtualenv with nats-py and sets it, and `CALLBUS_REQUIRE_PYTHON=1` so that a missing
//! interpreter fails the test instead of skipping it).

use std::process::Command;

use callbus_tests::stack::Stack;

fn python() -> Option<String> {
    let python = std::env::var("CALLBUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).args(["-c", "import nats"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("CALLBUS_REQUIRE_PYTHON").is_err(),
        "{python} with nats-py is required (CALLBUS_REQUIRE_PYTHON is set): pip install nats-py"
    );
    eprintln!("SKIPPED: {python} cannot import nats (pip install nats-py); .ci/run runs this test");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_click_to_dial_example_connects_a_call_and_reports_a_busy_one() {
    let Some(python) = python() else { return };
    let s = Stack::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/click_to_dial.py");
    let run = |caller: &'static str, callee: &'static str| {
        let (python, url) = (python.clone(), s.nats.url());
        tokio::task::spawn_blocking(move || {
            Command::new(python).arg(script).args([caller, callee]).env("CALLBUS_NATS", url).output().expect("runs")
        })
    };
    let out = run("sip:alice@127.0.0.1", "sip:bob@127.0.0.1").await.expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("connected connected")), "{text}");
    let out = run("sip:alice@127.0.0.1", "sip:busy@127.0.0.1").await.expect("join");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("callee_busy"));
}
