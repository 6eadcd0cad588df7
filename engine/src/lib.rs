//! The callbus engine: turns OpenSIPS events and app commands into a durable, replayable
//! history per call, and drives OpenSIPS through the bridge.
//!
//! - [`log`]: the append-only event log (sled), with group commit.
//! - [`machines`]: pure per-call state machines.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod log;
pub mod machines;
