//! The DDI client's decisions, pure (no I/O, no clock, no randomness: the caller passes them
//! in): what a poll answer asks for, what a deployment allows now, when to poll next, which
//! feedback a transaction's course sends, and which queued feedback can be coalesced.

use super::protocol::{
    ControllerBase, DeploymentBase, Execution, Feedback, Finished, Handling, MaintenanceWindow,
    Progress, check_action_id,
};
use crate::journal::ddi::DdiActionState;
use crate::limits::{DDI_BACKOFF_S_MAX, DDI_BACKOFF_S_MIN, DDI_POLL_S_DEFAULT, DDI_POLL_S_MIN};
use std::time::Duration;

/// What the device remembers about the server's actions (from the journal).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// Actions whose final feedback (closed or canceled) is queued or delivered: never acted on
    /// again, whatever the server still offers (rauc-hawkbit-updater #158: no retry loop).
    pub finished_actions: Vec<String>,
    /// The action being worked on, if any.
    pub current: Option<String>,
    /// The version the configData last sent named; `None` before the first one.
    pub config_sent_for: Option<String>,
    /// The version installed now.
    pub installed_version: String,
}

/// What one poll answer asks the client to do, in this order. Links name the action; the
/// client builds every URL from its configured controller URL (`client.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// PUT configData: the server links it, or the installed version is not the one the last
    /// configData named (the first poll, an install, a rollback done locally or at boot: the
    /// server's view is brought back in line without waiting to be asked).
    PutConfigData,
    /// GET the cancelAction resource of this action.
    FetchCancel { action: String },
    /// GET the deploymentBase of a new action.
    FetchDeployment { action: String },
    /// The server still lists an action this device already finished: its final feedback is
    /// in the outbox (or delivered and not yet seen by the server); nothing to do.
    AlreadyFinished { action: String },
}

/// The action id of a `deploymentBase` or `cancelAction` link: the path segment right after
/// that resource's name (hawkBit appends `?c=...` to deploymentBase links; the query is not
/// part of the id).
pub fn action_of(href: &str) -> Option<&str> {
    let path = href.split(['?', '#']).next()?;
    let mut segments = path.rsplit('/');
    let id = segments.next()?;
    let resource = segments.next()?;
    if resource != "deploymentBase" && resource != "cancelAction" {
        return None;
    }
    check_action_id(id).ok().map(|()| id)
}

/// The steps a poll answer asks for. A link whose action id is malformed is ignored (and
/// logged by the caller): it would go into URLs and the journal.
pub fn on_poll(poll: &ControllerBase, known: &Known) -> Vec<Step> {
    let mut steps = Vec::new();
    let version_changed =
        known.config_sent_for.as_deref() != Some(known.installed_version.as_str());
    if poll.link("configData").is_some() || version_changed {
        steps.push(Step::PutConfigData);
    }
    if let Some(action) = poll.link("cancelAction").and_then(action_of) {
        steps.push(Step::FetchCancel { action: action.to_string() });
    }
    if let Some(href) = poll.link("deploymentBase")
        && let Some(action) = action_of(href)
    {
        if known.finished_actions.iter().any(|a| a == action) {
            steps.push(Step::AlreadyFinished { action: action.to_string() });
        } else {
            steps.push(Step::FetchDeployment { action: action.to_string() });
        }
    }
    steps
}

/// What a deployment allows the device to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// `download: skip`: nothing yet, not even a feedback.
    Wait,
    /// Download and validate, then wait: `update: skip`, or a maintenance window that is
    /// unavailable (issue 15: download now, install when it opens).
    DownloadOnly,
    /// Download, validate and install as one transaction.
    Install,
    /// Refused as a whole before anything is downloaded: `rejected` feedback with the reason.
    Reject(String),
}

/// The decision for a parsed deployment. The action carries one package, or two: a delta
/// package and its full twin (issue 15: the delta is tried first, the full one only when the
/// device lacks the delta's base). One transaction installs one package, so any other set of
/// artifacts is refused whole rather than installed in parts; whether the smaller of two is
/// really a delta for the same version is checked once it is downloaded (`pair_check`).
pub fn allowed(d: &DeploymentBase) -> Allowed {
    let packages: Vec<&str> = d.artifacts().map(|(_, a)| a.filename.as_str()).collect();
    if packages.is_empty() || packages.len() > 2 {
        return Allowed::Reject(format!(
            "action {}: {} artifacts ({}); tope-updater installs one package per action (or a \
            delta package and its full twin), all or nothing",
            d.id,
            packages.len(),
            packages.join(", ")
        ));
    }
    match (d.deployment.download, d.deployment.update, d.deployment.maintenance_window) {
        (Handling::Skip, _, _) => Allowed::Wait,
        (_, Handling::Skip, _) | (_, _, Some(MaintenanceWindow::Unavailable)) => {
            Allowed::DownloadOnly
        }
        _ => Allowed::Install,
    }
}

/// What a downloaded package of a two-artifact action is, from its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageKind {
    pub delta: bool,
    pub version: String,
}

/// Checks a package of a two-artifact action, in the order tried (0: the smaller one): the
/// first must be a delta package and the second a full package, both of the deployment's
/// version; anything else is not a delta and its twin, and the action is refused.
pub fn pair_check(index: usize, kind: &PackageKind, version: &str) -> Result<(), String> {
    if kind.version != version {
        return Err(format!(
            "a package of version {:?} in a deployment of version {version:?}",
            kind.version
        ));
    }
    match (index, kind.delta) {
        (0, true) | (1, false) => Ok(()),
        (0, false) => {
            Err("of two artifacts the smaller is not a delta package: two full packages \
            are not one transaction"
                .into())
        }
        _ => {
            Err("of two artifacts both are delta packages: no full package to fall back on".into())
        }
    }
}

/// When to poll next: the server's sleep (bounded below by `DDI_POLL_S_MIN`, our default
/// without one), or after errors an exponential backoff from `DDI_BACKOFF_S_MIN` up to the
/// smaller of the normal interval and `DDI_BACKOFF_S_MAX`; then a jitter of up to ±10 %
/// (`jitter` in [-1, 1], drawn by the caller) so that a fleet does not poll in lockstep.
pub fn next_poll(server_sleep: Option<Duration>, consecutive_errors: u32, jitter: f64) -> Duration {
    let normal = server_sleep
        .unwrap_or(Duration::from_secs(DDI_POLL_S_DEFAULT))
        .max(Duration::from_secs(DDI_POLL_S_MIN));
    let base = if consecutive_errors == 0 {
        normal
    } else {
        let backoff = DDI_BACKOFF_S_MIN.saturating_mul(1u64 << (consecutive_errors - 1).min(20));
        Duration::from_secs(backoff.min(DDI_BACKOFF_S_MAX))
            .min(normal.max(Duration::from_secs(DDI_BACKOFF_S_MIN)))
    };
    let j = jitter.clamp(-1.0, 1.0) * 0.1;
    base.mul_f64(1.0 + j)
}

/// The course of an action as the engine reports it, each step mapped to one feedback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Course {
    /// The package is being downloaded: bytes so far and in all (progress in whole percent,
    /// so that a server's status entries stay few).
    Downloading { done: u64, total: u64 },
    /// Downloaded and validated; installing waits for the update permission or the window.
    Downloaded,
    /// The install transaction reached phase `index` of `count` (its name in `what`).
    Phase { index: u32, count: u32, what: String },
    /// Installed, waiting for `confirm` (`confirm_required`): not final yet.
    AwaitingConfirm,
    /// Final: committed (and confirmed, when that is required).
    Succeeded { version: String },
    /// Final: the action failed or was rolled back, at any time (also a trial rolled back
    /// at boot, long after the install reported its progress).
    Failed { code: String, message: String },
    /// Final: canceled before anything was swapped. Sent to the `cancelAction` resource,
    /// where `closed` + `success` confirms the cancel (hawkBit; `rejected` refuses it).
    Canceled,
    /// Final: refused before anything was downloaded.
    Rejected { reason: String },
}

impl Course {
    /// Whether this ends the action: the client never acts on it again.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Course::Succeeded { .. }
                | Course::Failed { .. }
                | Course::Canceled
                | Course::Rejected { .. }
        )
    }
}

/// The feedback a step of the course sends (`now_ms`: the device's clock, for `timestamp`).
pub fn feedback(c: &Course, now_ms: u64) -> Feedback {
    let ts = Some(now_ms);
    match c {
        Course::Downloading { done, total } => {
            let pct =
                if *total == 0 { 0 } else { (done.saturating_mul(100) / total).min(100) as u32 };
            Feedback::new(
                Execution::Proceeding,
                Finished::None,
                Some(Progress { cnt: pct, of: 100 }),
                // "Downloaded N%" is the line gooseBit reads progress from (it ignores cnt/of).
                vec![format!("Downloaded {pct}%"), format!("{done} of {total} bytes")],
                ts,
            )
        }
        Course::Downloaded => Feedback::new(
            Execution::Downloaded,
            Finished::None,
            None,
            vec!["downloaded and validated; waiting to install".into()],
            ts,
        ),
        Course::Phase { index, count, what } => Feedback::new(
            Execution::Proceeding,
            Finished::None,
            Some(Progress { cnt: *index, of: *count }),
            vec![format!("installing: {what}")],
            ts,
        ),
        Course::AwaitingConfirm => Feedback::new(
            Execution::Proceeding,
            Finished::None,
            None,
            vec!["installed; the result is final once the device confirms it".into()],
            ts,
        ),
        Course::Succeeded { version } => Feedback::new(
            Execution::Closed,
            Finished::Success,
            None,
            vec![format!("installed {version}")],
            ts,
        ),
        Course::Failed { code, message } => Feedback::new(
            Execution::Closed,
            Finished::Failure,
            None,
            vec![format!("{code}: {message}")],
            ts,
        ),
        Course::Canceled => Feedback::new(
            Execution::Closed,
            Finished::Success,
            None,
            vec!["canceled before anything was changed".into()],
            ts,
        ),
        Course::Rejected { reason } => {
            Feedback::new(Execution::Rejected, Finished::Failure, None, vec![reason.clone()], ts)
        }
    }
}

/// What a cancel of an action asks the device to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelStep {
    /// Canceled already: its confirmation stands (sent or queued).
    Nothing,
    /// Nothing of it runs or was installed: confirm the cancel now.
    CancelNow,
    /// Its download runs: stop it; the job confirms the cancel.
    StopDownload,
    /// Its install runs and has not begun its swap: the install rolls back (`CANCELED`) at
    /// the swap's threshold, and the job confirms; if the swap began meanwhile, the job refuses.
    AbortInstall,
    /// Refused with the reason (`rejected` on the cancelAction).
    Refuse(&'static str),
}

pub const SWAP_BEGUN: &str =
    "the swap has begun: the update finishes or rolls back as one transaction";

/// The step for a cancel (issue 15: accepted while nothing has been swapped): `state` is the
/// action's on this device (`None`: never taken on), `job_running` whether its job holds
/// the slot, `swap_begun` whether the transaction in flight has entered `Swapped`.
pub fn on_cancel(state: Option<DdiActionState>, job_running: bool, swap_begun: bool) -> CancelStep {
    use DdiActionState as S;
    match state {
        Some(S::Canceled) => CancelStep::Nothing,
        Some(s) if s.is_final() => CancelStep::Refuse("the update has ended; its result stands"),
        Some(S::Downloading) if job_running => CancelStep::StopDownload,
        None | Some(S::Downloading | S::Downloaded) => CancelStep::CancelNow,
        Some(S::Installing) if job_running && !swap_begun => CancelStep::AbortInstall,
        Some(_) => CancelStep::Refuse(SWAP_BEGUN),
    }
}

/// Which queued feedbacks (oldest first; each its action and whether it is a `proceeding`
/// with progress) to send: a progress feedback that another progress feedback of the same
/// action directly follows is dropped (servers rate-limit and keep a bounded number of status
/// entries per action: hawkbit #1249); every other feedback is sent, in order. Returns the
/// indices to send.
pub fn coalesce(queue: &[(&str, bool)]) -> Vec<usize> {
    (0..queue.len())
        .filter(|&i| {
            let (action, progress) = queue[i];
            !(progress
                && queue
                    .get(i + 1)
                    .is_some_and(|&(next, next_progress)| next == action && next_progress))
        })
        .collect()
}

/// Whether a feedback is progress (coalescible, dropped first when the outbox is full).
pub fn is_progress(f: &Feedback) -> bool {
    f.status.execution == Execution::Proceeding && f.status.result.progress.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddi::protocol::DeploymentBase;

    fn poll(links: &[(&str, &str)]) -> ControllerBase {
        let links: serde_json::Map<String, serde_json::Value> =
            links.iter().map(|(k, v)| (k.to_string(), serde_json::json!({"href": v}))).collect();
        serde_json::from_value(
            serde_json::json!({"config": {"polling": {"sleep": "00:01:00"}}, "_links": links}),
        )
        .unwrap()
    }

    fn known() -> Known {
        Known {
            installed_version: "1.0.0".into(),
            config_sent_for: Some("1.0.0".into()),
            ..Known::default()
        }
    }

    #[test]
    fn config_data_goes_when_asked_for_or_when_the_installed_version_changed() {
        assert_eq!(
            on_poll(&poll(&[]), &Known { config_sent_for: None, ..known() }),
            vec![Step::PutConfigData]
        );
        // After a rollback (local, or a trial at boot) the server hears of 1.0.0 unasked.
        assert_eq!(
            on_poll(&poll(&[]), &Known { config_sent_for: Some("2.0.0".into()), ..known() }),
            vec![Step::PutConfigData]
        );
        assert_eq!(on_poll(&poll(&[]), &known()), vec![]);
    }

    #[test]
    fn action_ids_come_from_the_last_path_segment_and_must_be_plain() {
        assert_eq!(
            action_of("http://h/DEFAULT/controller/v1/dev/deploymentBase/8?c=-2129030598"),
            Some("8")
        );
        assert_eq!(action_of("http://h/DEFAULT/controller/v1/dev/cancelAction/11"), Some("11"));
        assert_eq!(action_of("http://h/x/deploymentBase/8/"), None);
        assert_eq!(action_of("http://h/x/installedBase/8"), None);
        assert_eq!(action_of("http://h/x/deploymentBase/%2e%2e"), None);
        assert_eq!(action_of("http://h/x/deploymentBase/"), None);
    }

    #[test]
    fn a_poll_asks_for_config_cancel_and_deployment_in_that_order() {
        let p = poll(&[
            ("deploymentBase", "http://h/t/controller/v1/d/deploymentBase/9?c=1"),
            ("configData", "http://h/t/controller/v1/d/configData"),
            ("cancelAction", "http://h/t/controller/v1/d/cancelAction/8"),
        ]);
        assert_eq!(
            on_poll(&p, &known()),
            vec![
                Step::PutConfigData,
                Step::FetchCancel { action: "8".into() },
                Step::FetchDeployment { action: "9".into() }
            ]
        );
        assert_eq!(on_poll(&poll(&[]), &known()), vec![]);
    }

    #[test]
    fn a_finished_action_offered_again_is_not_acted_on() {
        let p = poll(&[("deploymentBase", "http://h/t/controller/v1/d/deploymentBase/9")]);
        let k = Known { finished_actions: vec!["9".into()], ..known() };
        assert_eq!(on_poll(&p, &k), vec![Step::AlreadyFinished { action: "9".into() }]);
        // A new action of the same server is taken.
        let p = poll(&[("deploymentBase", "http://h/t/controller/v1/d/deploymentBase/10")]);
        assert!(
            matches!(&on_poll(&p, &k)[..], [Step::FetchDeployment { action, .. }] if action == "10")
        );
    }

    fn deployment(
        download: &str,
        update: &str,
        window: Option<&str>,
        artifacts: usize,
    ) -> DeploymentBase {
        let arts: Vec<serde_json::Value> = (0..artifacts)
            .map(|i| {
                serde_json::json!({
                    "filename": format!("p{i}.zip"),
                    "hashes": {"sha1": "986a1ade8b8a2f758ce951340cc5e21335cc2a00"},
                    "_links": {"download": {"href": "https://h/p"}}
                })
            })
            .collect();
        let chunk =
            serde_json::json!({"part": "os", "version": "2.0.0", "name": "app", "artifacts": arts});
        let mut d = serde_json::json!({
            "id": "5",
            "deployment": {"download": download, "update": update, "chunks": [chunk]}
        });
        if let Some(w) = window {
            d["deployment"]["maintenanceWindow"] = w.into();
        }
        DeploymentBase::parse(d.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn download_and_update_modes_and_the_maintenance_window_decide_what_happens_now() {
        assert_eq!(allowed(&deployment("forced", "forced", None, 1)), Allowed::Install);
        assert_eq!(
            allowed(&deployment("attempt", "attempt", Some("available"), 1)),
            Allowed::Install
        );
        assert_eq!(allowed(&deployment("skip", "forced", None, 1)), Allowed::Wait);
        assert_eq!(allowed(&deployment("forced", "skip", None, 1)), Allowed::DownloadOnly);
        assert_eq!(
            allowed(&deployment("attempt", "forced", Some("unavailable"), 1)),
            Allowed::DownloadOnly
        );
        assert_eq!(
            allowed(&deployment("forced", "forced", None, 2)),
            Allowed::Install,
            "a delta and its full twin"
        );
        match allowed(&deployment("forced", "forced", None, 3)) {
            Allowed::Reject(why) => {
                assert!(why.contains("3 artifacts (p0.zip, p1.zip, p2.zip)"), "{why}");
            }
            other => panic!("three packages must be refused whole, got {other:?}"),
        }
    }

    #[test]
    fn of_two_artifacts_the_first_tried_must_be_a_delta_and_the_second_its_full_twin() {
        let kind = |delta: bool, v: &str| PackageKind { delta, version: v.into() };
        assert_eq!(pair_check(0, &kind(true, "2.0.0"), "2.0.0"), Ok(()));
        assert_eq!(pair_check(1, &kind(false, "2.0.0"), "2.0.0"), Ok(()));
        assert!(pair_check(0, &kind(false, "2.0.0"), "2.0.0").unwrap_err().contains("not a delta"));
        assert!(
            pair_check(1, &kind(true, "2.0.0"), "2.0.0").unwrap_err().contains("both are delta")
        );
        assert!(
            pair_check(1, &kind(false, "1.9.0"), "2.0.0")
                .unwrap_err()
                .contains("version \"1.9.0\"")
        );
    }

    #[test]
    fn polls_follow_the_server_with_backoff_and_jitter_within_bounds() {
        let min = Duration::from_secs(DDI_POLL_S_MIN);
        assert_eq!(next_poll(Some(Duration::from_secs(600)), 0, 0.0), Duration::from_secs(600));
        assert_eq!(next_poll(None, 0, 0.0), Duration::from_secs(DDI_POLL_S_DEFAULT));
        // A server asking for 0 s does not make the device spin.
        assert_eq!(next_poll(Some(Duration::ZERO), 0, 0.0), min);
        // Errors: doubling from the minimum, never past the normal interval or the cap.
        let s = Some(Duration::from_secs(3600));
        let waits: Vec<u64> = (1..=12).map(|e| next_poll(s, e, 0.0).as_secs()).collect();
        assert_eq!(waits[0], DDI_BACKOFF_S_MIN);
        assert_eq!(waits[1], DDI_BACKOFF_S_MIN * 2);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), DDI_BACKOFF_S_MAX.min(3600));
        assert_eq!(next_poll(Some(Duration::from_secs(60)), 30, 0.0), Duration::from_secs(60));
        assert_eq!(next_poll(s, u32::MAX, 0.0), Duration::from_secs(DDI_BACKOFF_S_MAX.min(3600)));
        // Jitter: ±10 %, clamped.
        assert_eq!(next_poll(s, 0, 1.0), Duration::from_secs(3960));
        assert_eq!(next_poll(s, 0, -5.0), Duration::from_secs(3240));
    }

    #[test]
    fn each_step_of_the_course_maps_to_the_feedback_the_spec_names() {
        let f = |c: Course| {
            let fb = feedback(&c, 7);
            assert_eq!(fb.timestamp, Some(7));
            (
                fb.status.execution,
                fb.status.result.finished,
                fb.status.result.progress,
                fb.status.details.join("|"),
            )
        };
        let d = f(Course::Downloading { done: 50, total: 200 });
        assert_eq!(
            (d.2, d.3.as_str()),
            (Some(Progress { cnt: 25, of: 100 }), "Downloaded 25%|50 of 200 bytes")
        );
        assert_eq!(
            f(Course::Downloading { done: 1, total: 0 }).2,
            Some(Progress { cnt: 0, of: 100 })
        );
        assert_eq!(f(Course::Downloaded).0, Execution::Downloaded);
        let p = f(Course::Phase { index: 3, count: 9, what: "BackedUp".into() });
        assert_eq!(
            (p.0, p.1, p.2),
            (Execution::Proceeding, Finished::None, Some(Progress { cnt: 3, of: 9 }))
        );
        assert_eq!(
            f(Course::AwaitingConfirm).1,
            Finished::None,
            "not final before confirm (rauc-hawkbit-updater #161)"
        );
        assert_eq!(f(Course::Succeeded { version: "2.0.0".into() }).0, Execution::Closed);
        let failed = f(Course::Failed { code: "HASH_MISMATCH".into(), message: "x".into() });
        assert_eq!(
            (failed.0, failed.1, failed.3.as_str()),
            (Execution::Closed, Finished::Failure, "HASH_MISMATCH: x")
        );
        assert_eq!(
            f(Course::Canceled).0,
            Execution::Closed,
            "closed/success on the cancelAction confirms the cancel"
        );
        assert_eq!(f(Course::Rejected { reason: "r".into() }).1, Finished::Failure);
        assert!(Course::Failed { code: String::new(), message: String::new() }.is_final());
        assert!(!Course::AwaitingConfirm.is_final());
        assert!(!Course::Downloaded.is_final());
    }

    #[test]
    fn a_cancel_is_accepted_only_before_the_swap() {
        use DdiActionState as S;
        assert_eq!(on_cancel(None, false, false), CancelStep::CancelNow, "never taken on");
        assert_eq!(on_cancel(Some(S::Downloaded), false, false), CancelStep::CancelNow);
        assert_eq!(on_cancel(Some(S::Downloading), true, false), CancelStep::StopDownload);
        assert_eq!(
            on_cancel(Some(S::Downloading), false, false),
            CancelStep::CancelNow,
            "a download a restart left"
        );
        assert_eq!(on_cancel(Some(S::Installing), true, false), CancelStep::AbortInstall);
        assert_eq!(on_cancel(Some(S::Installing), true, true), CancelStep::Refuse(SWAP_BEGUN));
        assert_eq!(
            on_cancel(Some(S::Installing), false, false),
            CancelStep::Refuse(SWAP_BEGUN),
            "recovery owns it now"
        );
        assert_eq!(
            on_cancel(Some(S::AwaitingConfirm), false, false),
            CancelStep::Refuse(SWAP_BEGUN)
        );
        assert_eq!(on_cancel(Some(S::Canceled), false, false), CancelStep::Nothing);
        for s in [S::Succeeded, S::Failed, S::Rejected] {
            assert!(
                matches!(
                    on_cancel(Some(s), false, false),
                    CancelStep::Refuse(r) if r.contains("has ended")
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn only_progress_followed_by_progress_of_the_same_action_is_coalesced() {
        let prog = |n: u32| feedback(&Course::Phase { index: n, count: 9, what: String::new() }, 0);
        assert!(is_progress(&prog(1)));
        assert!(!is_progress(&feedback(&Course::AwaitingConfirm, 0)));
        assert!(!is_progress(&feedback(
            &Course::Failed { code: "C".into(), message: "m".into() },
            0
        )));
        let q = [
            ("1", true),
            ("1", true),
            ("1", true),
            ("1", false),
            ("2", true),
            ("3", true),
            ("3", true),
            ("3", false),
        ];
        assert_eq!(coalesce(&q), vec![2, 3, 4, 6, 7]);
        assert_eq!(coalesce(&[]), Vec::<usize>::new());
    }

    /// Answers recorded from a real gooseBit 0.2.12 and from the spec-driven server
    /// (tests/ddi/smoke.sh): the decisions on what real servers send.
    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ddi/fixtures").join(name),
        )
        .unwrap()
    }

    #[test]
    fn real_server_answers_lead_to_the_right_steps() {
        let k = known();
        let unregistered: ControllerBase =
            serde_json::from_slice(&fixture("goosebit-poll-unregistered.json")).unwrap();
        assert_eq!(on_poll(&unregistered, &k), vec![Step::PutConfigData]);
        let offered: ControllerBase =
            serde_json::from_slice(&fixture("goosebit-poll-deployment.json")).unwrap();
        assert_eq!(offered.sleep(), Some(Duration::from_secs(60)));
        assert!(matches!(
            &on_poll(&offered, &k)[..],
            [Step::FetchDeployment { action, .. }] if action == "1"
        ));
        let idle: ControllerBase =
            serde_json::from_slice(&fixture("goosebit-poll-after-success.json")).unwrap();
        assert_eq!(on_poll(&idle, &k), vec![]);
        let goose = DeploymentBase::parse(&fixture("goosebit-deploymentbase.json")).unwrap();
        assert_eq!(allowed(&goose), Allowed::Install);
        assert!(matches!(
            goose.artifacts().next().unwrap().1.hashes.strongest(),
            Some(crate::ddi::protocol::ArtifactHash::Sha1(_))
        ));
        let later =
            DeploymentBase::parse(&fixture("spec-deploymentbase-window-unavailable.json")).unwrap();
        assert_eq!(allowed(&later), Allowed::DownloadOnly);
        let now =
            DeploymentBase::parse(&fixture("spec-deploymentbase-window-available.json")).unwrap();
        assert!(matches!(
            now.artifacts().next().unwrap().1.hashes.strongest(),
            Some(crate::ddi::protocol::ArtifactHash::Sha256(_))
        ));
        let cancel: ControllerBase =
            serde_json::from_slice(&fixture("spec-poll-cancel.json")).unwrap();
        assert!(on_poll(&cancel, &k).iter().any(|s| matches!(s, Step::FetchCancel { .. })));
        let c: crate::ddi::protocol::Cancel =
            serde_json::from_slice(&fixture("spec-cancelaction.json")).unwrap();
        assert_eq!(c.cancel_action.stop_id, "8");
        // gooseBit answers `null` for a deploymentBase with nothing behind it: an error, not an
        // action.
        assert!(DeploymentBase::parse(b"null").is_err());
    }
}
