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
/// One path component, in bytes (`NAME_MAX` on Linux).
pub const PATH_COMPONENT_BYTES_MAX: usize = 255;
/// A version string such as `1.2.3`.
pub const VERSION_BYTES_MAX: usize = 64;
/// A module name, process name, or `compatible` string.
pub const NAME_BYTES_MAX: usize = 256;
/// `post_cmds` per module and bytes per command.
pub const POST_CMDS_MAX: usize = 64;
pub const POST_CMD_BYTES_MAX: usize = 4096;
/// A journal record other than a plan.
pub const RECORD_BYTES_MAX: usize = 1024 * 1024;
/// A plan or generation record (thousands of paths with two hashes each).
pub const PLAN_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Finished transactions kept in the journal for `history`.
pub const HISTORY_TX_MAX: usize = 200;
/// ZIP entries this small are exempt from `max_compression_ratio`: a few KiB of zeros
/// legitimately compress 1000:1 and cannot hurt.
pub const RATIO_EXEMPT_BYTES: u64 = 64 * 1024;
/// Read/write buffer for streaming copies and hashing.
pub const IO_BUFFER_BYTES: usize = 256 * 1024;
// Delta patches (src/delta.rs): what applying one holds in memory is bounded by these, whatever
// the size of the file: one window at a time per process, so at most
// DELTA_REF_BYTES_MAX + DELTA_PAYLOAD_BYTES_MAX + DELTA_BSDIFF_STREAM_BYTES_MAX +
// DELTA_WINDOW_BYTES = 24 MiB of buffers.

/// Versions a delta package names as its bases, and patches per file (one per base).
pub const DELTA_BASES_MAX: usize = 16;
/// Target bytes one patch window produces.
pub const DELTA_WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// Base bytes a window may refer to on either side of its own span (content that moved).
pub const DELTA_REF_MARGIN_BYTES: u64 = 2 * 1024 * 1024;
/// Base bytes one window refers to, at most: its span and both margins.
pub const DELTA_REF_BYTES_MAX: u64 = DELTA_WINDOW_BYTES + 2 * DELTA_REF_MARGIN_BYTES;
/// zstd window (log2) a patch frame may ask for: the reference and the output together.
pub const DELTA_ZSTD_WINDOW_LOG_MAX: u32 = 24;
/// The compressed payload of one window (a window that does not compress still fits).
pub const DELTA_PAYLOAD_BYTES_MAX: u64 = DELTA_WINDOW_BYTES + 64 * 1024;
/// One window's bsdiff stream once decompressed (the window's bytes plus 24 bytes of control
/// per instruction).
pub const DELTA_BSDIFF_STREAM_BYTES_MAX: u64 = 2 * DELTA_WINDOW_BYTES;
/// A patch's header and each window's header (bincode).
pub const DELTA_HEADER_BYTES_MAX: usize = 1024;

/// Headroom kept free on every filesystem after the statvfs preflight.
pub const FREE_SPACE_RESERVE_BYTES: u64 = 1024 * 1024;
/// Config file size.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;

// The daemon's HTTP API (SPEC §5, SECURITY.md): no local process or web page can exhaust it.

/// A request body (the API's bodies are small JSON objects).
pub const API_BODY_BYTES_MAX: usize = 64 * 1024;
/// Time to receive a whole request body once its head has arrived.
pub const API_BODY_READ_TIMEOUT_MS: u64 = 10_000;
/// Time to receive a whole request head. The clock starts when the connection waits for a
/// request, so it is also the idle keep-alive timeout (the GUI polls every 500 ms).
pub const API_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// A connection's read buffer, and so the largest request head (hyper's minimum is 8 KiB).
pub const API_HEADER_BYTES_MAX: usize = 16 * 1024;
/// Headers in one request.
pub const API_HEADERS_MAX: usize = 64;
/// Open API connections. At the cap, a new connection closes the one idle the longest, so a
/// new `/progress` poll is always served; far below the unit's `LimitNOFILE=1024`.
pub const API_CONNECTIONS_MAX: usize = 256;
/// A connection with no handler running whose socket moved no byte for this long is closed
/// (a client that never reads its response).
pub const API_STALL_TIMEOUT_MS: u64 = 15_000;
/// At SIGTERM, requests being handled get this long to finish; idle connections close at once.
pub const API_SHUTDOWN_GRACE_MS: u64 = 2_000;
/// Entries in `api.allowed_origins`, `api.allowed_hosts`, `api.allowed_uids`.
pub const API_ALLOW_LIST_MAX: usize = 64;
/// A header value quoted in a refusal's message and log line.
pub const API_QUOTED_HEADER_BYTES_MAX: usize = 200;

// Downloads, reports, post commands and the log file: what outside input or a long life can grow.

/// Longest accepted `package_url`, in bytes (presigned S3 URLs run to a couple of KiB).
pub const URL_BYTES_MAX: usize = 8192;
/// Redirects followed per download request.
pub const REDIRECTS_MAX: u32 = 5;
/// At most this many reports wait in the outbox; beyond it the oldest non-final report is
/// dropped (final reports never are).
pub const OUTBOX_REPORTS_MAX: u64 = 10_000;
/// A report's `message` and `error` are cut to this many bytes (at a char boundary) when
/// pushed, so a record stays far below the journal's record limit.
pub const REPORT_TEXT_BYTES_MAX: usize = 4096;
/// device-api's answers to reports are read up to this size; a longer body counts as empty.
pub const REPORT_RESPONSE_BYTES_MAX: u64 = 64 * 1024;
/// A post command's output kept per stream; the rest is read and dropped (a chatty command
/// cannot fill memory).
pub const OUTPUT_KEPT_BYTES: usize = 64 * 1024;
/// The log file (`[log] file`) is rotated before a line would take it past this size.
pub const LOG_FILE_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated log files kept beside the live one: `FILE.1` .. `FILE.3`.
pub const LOG_FILES_KEPT: usize = 3;

// The hawkBit DDI client (src/ddi): what a fleet server can make a device do or keep.

/// The longest poll interval a server can ask for (`config.polling.sleep`): one week.
pub const DDI_SLEEP_S_MAX: u64 = 7 * 24 * 3600;
/// The shortest poll interval, whatever the server asks (a `00:00:00` must not make a device spin).
pub const DDI_POLL_S_MIN: u64 = 5;
/// The poll interval when a server names none.
pub const DDI_POLL_S_DEFAULT: u64 = 300;
/// After a failed poll, the first retry waits this long, doubling per failure...
pub const DDI_BACKOFF_S_MIN: u64 = 5;
/// ...up to this (and never past the normal interval).
pub const DDI_BACKOFF_S_MAX: u64 = 3600;
/// An action id (hawkBit: a decimal number), in bytes.
pub const DDI_ID_BYTES_MAX: usize = 64;
/// Artifacts in one deployment.
pub const DDI_ARTIFACTS_MAX: usize = 16;
/// Detail lines in one feedback, and bytes per line.
pub const DDI_DETAILS_MAX: usize = 8;
pub const DDI_DETAIL_BYTES_MAX: usize = 512;
/// A DDI token file.
pub const DDI_TOKEN_BYTES_MAX: usize = 1024;
/// A DDI server's answer (poll, deploymentBase, cancelAction).
pub const DDI_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Finished DDI actions remembered (so the server offering one again is not obeyed); the
/// oldest go first. Actions in progress are never dropped.
pub const DDI_ACTIONS_KEPT: usize = 64;
/// DDI feedbacks waiting for delivery; past it, the oldest progress feedback is dropped.
pub const DDI_FEEDBACK_MAX: u64 = 1000;
/// One request to the DDI server, connect to last byte.
pub const DDI_REQUEST_TIMEOUT_S: u64 = 30;
/// The longest wait between two attempts to deliver a DDI feedback: the result reaches the
/// server within a minute of its return (polls back off up to the server's interval).
pub const DDI_FEEDBACK_BACKOFF_S_MAX: u64 = 60;
/// DDI feedbacks read from the journal per delivery round.
pub const DDI_FEEDBACK_BATCH: usize = 64;
/// With nothing to deliver, the DDI feedback sender looks again this often even unnotified.
pub const DDI_FEEDBACK_IDLE_POLL_S: u64 = 30;
/// One DDI feedback body (details are bounded by `DDI_DETAILS_MAX` x `DDI_DETAIL_BYTES_MAX`).
pub const DDI_FEEDBACK_BODY_BYTES_MAX: usize = 16 * 1024;
