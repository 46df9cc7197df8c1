//! One integration-test binary; each module owns one area.

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
