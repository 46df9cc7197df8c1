//! The hawkBit DDI client (issue 15): a device polls a fleet server (hawkBit, gooseBit),
//! installs what the server deploys as one transaction, and reports exactly what happened.
//!
//! - `config`: the `[ddi]` table and the token;
//! - `protocol`: the wire format (serde types from `hawkbit-ddi-openapi.json`), strict where a
//!   value makes the device act;
//! - `client`: the HTTP requests, to the configured server only (URLs built, not followed);
//! - `decide`: the pure decisions (what a poll asks for, what a deployment allows now, poll
//!   timing, the feedback of each step, coalescing);
//! - `sender`: delivery of the journaled feedback outbox (`journal::ddi`).
//!
//! The poller that runs them in `serve`, the deployment jobs and `reconcile` (the result of an
//! install learnt after the fact: a crash, `confirm`, a trial rolled back at boot) live in
//! `daemon/fleet.rs`; the actions and their feedback outbox in `journal/ddi.rs`.

pub mod client;
pub mod decide;
pub mod protocol;
pub mod sender;
