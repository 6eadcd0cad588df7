//! The callbus engine: turns OpenSIPS events and app commands into a durable, replayable
//! history per call, and drives OpenSIPS through the bridge.
//!
//! To come (issue 4): the append-only event log on sled (`log/`), pure state machines per kind
//! of call (`machines/`), the commands on `callbus.cmd.<verb>`, the notifications on
//! `callbus.call.<call_id>.<event>`, recovery and reconciliation, and the Call API door.
//! Nothing here is usable yet: `callbus engine` says so and exits non-zero.
