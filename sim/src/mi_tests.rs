//! Tests of `mi`.
#[test]
fn default_events_are_registered() {
    for e in callbus_schemas::event::DEFAULT_EVENTS {
        assert!(super::EVENTS.contains(&e));
    }
}
