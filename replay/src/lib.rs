//! Reading a callbus log: timelines, determinism checks, export and republishing.
//!
//! To come (issue 6), once the engine writes a log. Nothing here is usable yet:
//! `callbus replay` says so and exits non-zero.
