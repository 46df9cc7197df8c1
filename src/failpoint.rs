//! Named crash points (SPEC §8). With the `failpoints` feature, `hit("name")` consults the
//! `FAILPOINTS` environment variable (the `fail` crate's syntax, e.g.
//! `FAILPOINTS='swap.file=2*off->return'` for the third hit) and, when armed, kills the
//! process with SIGKILL: no destructor, no flush, no cleanup, like a crash. The fail crate's
//! `sleep(ms)` action pauses the process at the point instead (tests use it to change the
//! world mid-transaction, e.g. fill the disk after the preflight). Without the feature, `hit`
//! compiles to nothing.

/// Every crash point this build can reach. The crash test arms each in turn and fails if one
/// is never reached.
pub const CRASH_POINTS: &[&str] = &[
    "plan.copy_written",
    "enter.Planned",
    "enter.Staged",
    "stage.file",
    "stage.synced",
    "enter.BackedUp",
    "backup.file",
    "backup.synced",
    "enter.Swapped",
    "swap.file",
    "swap.synced",
    "enter.Verified",
    "verify.file",
    "enter.Committed",
    "commit.cleaned",
    "enter.RollingBack",
    "rollback.file",
    "rollback.synced",
    "enter.RolledBack",
    "recover.attempt",
];

/// Crash points inside the automatic collection of backup blobs after a transaction's end
/// (`driver::gc`); the long-life tests arm each in turn and fail if one is never reached.
pub const GC_CRASH_POINTS: &[&str] = &["gc.before_unlink", "gc.unlinked_one"];

/// Crash points in the report outbox's delivery (the reporter thread): a report device-api
/// answered but still in the outbox (delivered again after the restart: at least once), and
/// one removed from it (never delivered again).
pub const OUTBOX_CRASH_POINTS: &[&str] = &["outbox.delivered", "outbox.acked"];

/// Crash points inside service control and post commands; the service tests arm each in turn
/// and fail if one is never reached.
pub const SERVICE_CRASH_POINTS: &[&str] = &[
    "enter.ServicesStopped",
    "services.stopped_one",
    "enter.PostCommands",
    "post_cmd.ran",
    "post_cmd.recorded",
    "enter.ServicesStarted",
    "services.started_one",
    "rollback.services_started",
    "trial.boot_counted",
];

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    debug_assert!(
        CRASH_POINTS.contains(&name)
            || SERVICE_CRASH_POINTS.contains(&name)
            || GC_CRASH_POINTS.contains(&name)
            || OUTBOX_CRASH_POINTS.contains(&name)
            || name.starts_with("enter."),
        "unregistered crash point {name}"
    );
    // With TOPE_FAILPOINT_MARK set (tests/it/pause.rs), each point reached is written there
    // before it is evaluated: a test waiting for an armed point's sleep tells it from any
    // other sleep of the engine (the clock-tick waits of observe.rs).
    if let Some(mark) = std::env::var_os("TOPE_FAILPOINT_MARK") {
        let _ = std::fs::write(mark, name);
    }
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("crash point {name}: SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; this only waits for it to land.
        loop {
            std::thread::park();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Reads `FAILPOINTS` once at start-up (no-op without the feature).
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}
