//! One integration-test binary; each module owns one area.

// A test tells one scripted story (set up, act, assert each effect) and reads best whole.
#![allow(clippy::too_many_lines)]
// Process ids from std (u32) become nix's pid_t: a pid is below pid_max, at most 2^22.
#![allow(clippy::cast_possible_wrap)]
// A rig's helpers are its methods (found by `rig.`) even when they need no state; a test's
// helper item sits beside its one use; a case table keeps one arm per case, in order.
#![allow(clippy::unused_self, clippy::items_after_statements, clippy::match_same_arms)]
// `map(f).unwrap_or(x)` reads in the order things happen, as the tests' checks do.
#![allow(clippy::map_unwrap_or)]

#[cfg(feature = "failpoints")]
mod pause;
mod support;

mod api_guard;
mod api_load;
mod crash;
mod daemon;
mod ddi;
mod delta;
mod delta_process;
mod diskfull;
mod dropin;
mod fastpath;
mod hostile;
mod journal_loss;
mod layers;
mod longlife;
mod operator;
mod services;
mod signing;
mod transactions;
mod verification;
