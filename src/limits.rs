//! Every limit on input from outside, in one place (TigerBeetle style). Units last.

/// `manifest.json` larger than this is rejected before parsing (SPEC §2).
pub const MANIFEST_BYTES_MAX: u64 = 1024 * 1024;
/// Entries in one ZIP central directory.
pub const ZIP_ENTRIES_MAX: usize = 100_000;
/// Files deployed by one package (and targets in one plan).
pub const TARGETS_MAX: usize = 100_000;
/// Modules in one manifest.
pub const MODULES_MAX: usize = 10_000;
/// A path (zip entry name or destination), in bytes.
pub const PATH_BYTES_MAX: usize = 4096;
/// One path component, in bytes (NAME_MAX on Linux).
pub const PATH_COMPONENT_BYTES_MAX: usize = 255;
/// A version string such as `1.2.3`.
pub const VERSION_BYTES_MAX: usize = 64;
/// A module name, process name, or `compatible` string.
pub const NAME_BYTES_MAX: usize = 256;
/// post_cmds per module and bytes per command.
pub const POST_CMDS_MAX: usize = 64;
pub const POST_CMD_BYTES_MAX: usize = 4096;
/// A journal record other than a plan.
pub const RECORD_BYTES_MAX: usize = 1024 * 1024;
/// A plan or generation record (thousands of paths with two hashes each).
pub const PLAN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Finished transactions kept in the journal for `history`.
pub const HISTORY_TX_MAX: usize = 200;
/// Read/write buffer for streaming copies and hashing.
pub const IO_BUFFER_BYTES: usize = 256 * 1024;
/// Headroom kept free on every filesystem after the statvfs preflight.
pub const FREE_SPACE_RESERVE_BYTES: u64 = 1024 * 1024;
/// Config file size.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;
