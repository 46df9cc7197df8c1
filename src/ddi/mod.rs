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

pub mod client;
pub mod decide;
pub mod protocol;
pub mod sender;

// Still to build (issue 15), in this order; the decisions above are what it calls:
//
// 1. (done: journal/ddi.rs) Journal: a `ddi_actions` table (action id → the artifact, the download record, the tx
//    that installed it, the course so far, whether the final feedback is queued) and a
//    `ddi_feedback` outbox (seq → action, cancel flag, `Feedback`), each push one durable
//    commit, in journal-format.md in the same change. `Known` is read from them.
// 2. (done: download::fetch) download.rs: an expected hash that is sha256, sha1 or md5 (today: the legacy MD5 only),
//    so an artifact is checked with the strongest hash its deployment gives.
// 3. A poller thread in `serve` when `[ddi]` is set: poll → `decide::on_poll` → configData,
//    cancel, deploymentBase → `decide::allowed` → the daemon's existing download and install
//    jobs (one job slot: the legacy API and the DDI client never run two transactions); the
//    jobs' course pushed into `ddi_feedback` beside device-api's outbox.
// 4. (sender.rs: one round; the thread and its tests remain) A sender thread: `ddi_feedback` in seq order, `decide::coalesce`d, backoff on transient
//    errors, a 4xx for a gone action drops its rows (logged).
// 5. The truth after the fact: `confirm` (CLI or API) pushes the final success of a trial;
//    a trial rolled back by `recover --at-boot`, or any later rollback, pushes `closed/failure`
//    (once per action) and a configData naming the version now installed.
// 6. Cancel: while downloading, the download job stops; while installing, the driver checks a
//    cancel flag before `BackedUp` (nothing swapped yet) and rolls back; later, `rejected`
//    feedback on the cancel action with the reason from `decide::on_cancel`.
// 7. Delta-aware: two artifacts where one is a delta package for the installed version → try
//    it first, the full one on DELTA_BASE_MISSING without a failure feedback.
