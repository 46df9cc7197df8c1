//! tope-updater: a transactional over-the-air update engine for embedded Linux devices.
//! See ARCHITECTURE.md for the map and journal-format.md for the on-disk format.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod ddi;
pub mod delta;
pub mod download;
pub mod driver;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod gui;
pub mod journal;
pub mod limits;
pub mod logging;
pub mod manifest;
pub mod observe;
pub mod pack;
pub mod pack_delta;
pub mod package;
pub mod parallel;
pub mod paths;
pub mod plancopy;
pub mod posreader;
pub mod reporter;
pub mod services;
pub mod signing;
pub mod steplog;
pub mod store;
#[cfg(test)]
mod testdata;
pub mod treehash;
pub mod version;
pub mod wakeup;
