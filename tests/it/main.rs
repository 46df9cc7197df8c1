//! One integration-test binary; each module owns one area.

mod support;

mod crash;
mod hostile;
mod transactions;
