//! The hawkBit DDI wire format (`../shared/contracts/hawkbit-ddi-openapi.json`): what the
//! client reads from a server and what it sends back. Parsing is strict where a wrong value
//! would make the device act (ids, hashes, sizes, download/update modes) and lenient where
//! servers differ (unknown fields, optional links): gooseBit sends a subset of hawkBit's fields.

use crate::limits::{
    DDI_ARTIFACTS_MAX, DDI_DETAIL_BYTES_MAX, DDI_DETAILS_MAX, DDI_ID_BYTES_MAX, DDI_SLEEP_S_MAX,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A `_links` entry: only `href` matters to a device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Link {
    pub href: String,
}

/// `GET /{tenant}/controller/v1/{controllerId}`: the poll answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct ControllerBase {
    #[serde(default)]
    pub config: Option<ControllerConfig>,
    #[serde(default, rename = "_links")]
    pub links: BTreeMap<String, Link>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct ControllerConfig {
    #[serde(default)]
    pub polling: Option<Polling>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct Polling {
    pub sleep: Option<String>,
}

impl ControllerBase {
    /// The server's suggested sleep, if it gave a valid one.
    pub fn sleep(&self) -> Option<Duration> {
        parse_sleep(self.config.as_ref()?.polling.as_ref()?.sleep.as_deref()?)
    }

    pub fn link(&self, name: &str) -> Option<&str> {
        self.links.get(name).map(|l| l.href.as_str())
    }
}

/// `HH:MM:SS` (hours may exceed 23) → a duration, at most `DDI_SLEEP_S_MAX`; anything else
/// is `None` (the caller keeps its own interval rather than trusting a malformed one).
pub fn parse_sleep(s: &str) -> Option<Duration> {
    let mut parts = s.split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let num = |p: &str, max: u64| -> Option<u64> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u64>().ok().filter(|v| *v <= max)
    };
    let total = num(h, 99_999)? * 3600 + num(m, 59)? * 60 + num(sec, 59)?;
    (total <= DDI_SLEEP_S_MAX).then(|| Duration::from_secs(total))
}

/// `skip`, `attempt` or `forced`, for a deployment's download and update parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Handling {
    Skip,
    Attempt,
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceWindow {
    Available,
    Unavailable,
}

/// `GET .../deploymentBase/{actionId}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeploymentBase {
    pub id: String,
    pub deployment: Deployment,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// Absent means `forced` (hawkBit always sends both; gooseBit too).
    #[serde(default = "forced")]
    pub download: Handling,
    #[serde(default = "forced")]
    pub update: Handling,
    #[serde(default)]
    pub maintenance_window: Option<MaintenanceWindow>,
    pub chunks: Vec<Chunk>,
}

fn forced() -> Handling {
    Handling::Forced
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Chunk {
    pub part: String,
    pub version: String,
    pub name: String,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Artifact {
    pub filename: String,
    #[serde(default)]
    pub hashes: Hashes,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default, rename = "_links")]
    pub links: BTreeMap<String, Link>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct Hashes {
    pub sha1: Option<String>,
    pub md5: Option<String>,
    pub sha256: Option<String>,
}

/// The strongest hash a deployment gives for an artifact (issue 15: sha256 where given,
/// else sha1, else md5), lower-case hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactHash {
    Sha256(String),
    Sha1(String),
    Md5(String),
}

impl Hashes {
    pub fn strongest(&self) -> Option<ArtifactHash> {
        let hex = |h: &Option<String>, len: usize| {
            h.as_ref()
                .map(|s| s.to_ascii_lowercase())
                .filter(|s| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        hex(&self.sha256, 64)
            .map(ArtifactHash::Sha256)
            .or_else(|| hex(&self.sha1, 40).map(ArtifactHash::Sha1))
            .or_else(|| hex(&self.md5, 32).map(ArtifactHash::Md5))
    }
}

impl Artifact {
    /// `download` (https on hawkBit) before `download-http`: the caller still applies
    /// `allow_http` to whichever it gets.
    pub fn download_url(&self) -> Option<&str> {
        self.links
            .get("download")
            .or_else(|| self.links.get("download-http"))
            .map(|l| l.href.as_str())
    }
}

/// `GET .../cancelAction/{actionId}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cancel {
    pub id: String,
    pub cancel_action: CancelActionToStop,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelActionToStop {
    pub stop_id: String,
}

/// `status.execution` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloaded,
    Download,
}

/// `status.result.finished`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finished {
    Success,
    Failure,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub cnt: u32,
    pub of: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackResult {
    pub finished: Finished,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub execution: Execution,
    pub result: FeedbackResult,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub details: Vec<String>,
}

/// `POST .../deploymentBase/{actionId}/feedback` and `.../cancelAction/{actionId}/feedback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// When the status changed on the device, in ms since the epoch.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timestamp: Option<u64>,
    pub status: Status,
}

impl Feedback {
    /// A feedback with its details bounded (`DDI_DETAILS_MAX` lines of at most
    /// `DDI_DETAIL_BYTES_MAX` bytes, cut on a character boundary): a server keeps a limited
    /// number of status entries per action, and an error message can be long.
    pub fn new(
        execution: Execution,
        finished: Finished,
        progress: Option<Progress>,
        details: Vec<String>,
        timestamp: Option<u64>,
    ) -> Feedback {
        let details = details
            .into_iter()
            .take(DDI_DETAILS_MAX)
            .map(|d| truncate(d, DDI_DETAIL_BYTES_MAX))
            .collect();
        Feedback {
            timestamp,
            status: Status {
                execution,
                result: FeedbackResult { finished, progress },
                code: None,
                details,
            },
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `PUT .../configData`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigData {
    pub mode: &'static str,
    pub data: BTreeMap<String, String>,
}

/// Why a server's answer is not acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An action id as it appears in paths: a short string of ASCII letters, digits, `-` or `_`
/// (hawkBit: decimal; the id goes back into URLs and the journal, so nothing else is accepted).
pub fn check_action_id(id: &str) -> Result<(), ProtocolError> {
    let ok = !id.is_empty()
        && id.len() <= DDI_ID_BYTES_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ProtocolError(format!(
            "action id {:?} is not a short alphanumeric id",
            truncate(id.to_string(), 64)
        )))
    }
}

impl DeploymentBase {
    /// Parses and checks a deploymentBase answer: the id, and every artifact has a name, a
    /// download link and a usable hash, and there are at most `DDI_ARTIFACTS_MAX`.
    pub fn parse(body: &[u8]) -> Result<DeploymentBase, ProtocolError> {
        let d: DeploymentBase = serde_json::from_slice(body)
            .map_err(|e| ProtocolError(format!("deploymentBase: {e}")))?;
        check_action_id(&d.id)?;
        let artifacts: Vec<&Artifact> =
            d.deployment.chunks.iter().flat_map(|c| &c.artifacts).collect();
        if artifacts.is_empty() {
            return Err(ProtocolError(format!("action {}: the deployment has no artifact", d.id)));
        }
        if artifacts.len() > DDI_ARTIFACTS_MAX {
            return Err(ProtocolError(format!(
                "action {}: {} artifacts, at most {DDI_ARTIFACTS_MAX}",
                d.id,
                artifacts.len()
            )));
        }
        for a in artifacts {
            if a.download_url().is_none() {
                return Err(ProtocolError(format!(
                    "action {}: artifact {:?} has no download link",
                    d.id, a.filename
                )));
            }
            if a.hashes.strongest().is_none() {
                return Err(ProtocolError(format!(
                    "action {}: artifact {:?} has no sha256, sha1 or md5 in hex",
                    d.id, a.filename
                )));
            }
        }
        Ok(d)
    }

    pub fn artifacts(&self) -> impl Iterator<Item = (&Chunk, &Artifact)> {
        self.deployment.chunks.iter().flat_map(|c| c.artifacts.iter().map(move |a| (c, a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_is_hh_mm_ss_and_anything_else_is_ignored() {
        assert_eq!(parse_sleep("00:01:00"), Some(Duration::from_secs(60)));
        assert_eq!(parse_sleep("12:00:05"), Some(Duration::from_secs(12 * 3600 + 5)));
        assert_eq!(parse_sleep("00:00:00"), Some(Duration::ZERO));
        for bad in [
            "",
            "60",
            "00:60:00",
            "00:00:60",
            "-1:00:00",
            "1:2",
            "00:00:01:00",
            "aa:bb:cc",
            "+1:00:00",
            " 1:00:00",
        ] {
            assert_eq!(parse_sleep(bad), None, "{bad:?}");
        }
        // Past the bound: a server cannot park a device for a year.
        assert_eq!(parse_sleep("99999:00:00"), None);
    }

    #[test]
    fn the_strongest_well_formed_hash_is_chosen() {
        let h = |sha1: Option<&str>, md5: Option<&str>, sha256: Option<&str>| Hashes {
            sha1: sha1.map(Into::into),
            md5: md5.map(Into::into),
            sha256: sha256.map(Into::into),
        };
        let s1 = "2D86C2A659E364E9ABBA49EA6FFCD53DD5559F05";
        let m5 = "0d1b08c34858921bc7c662b228acb7ba";
        let s256 = "a03b221c6c6eae7122ca51695d456d5222e524889136394944b2f9763b483615";
        assert_eq!(
            h(Some(s1), Some(m5), Some(s256)).strongest(),
            Some(ArtifactHash::Sha256(s256.into()))
        );
        assert_eq!(
            h(Some(s1), Some(m5), None).strongest(),
            Some(ArtifactHash::Sha1(s1.to_ascii_lowercase()))
        );
        assert_eq!(h(None, Some(m5), None).strongest(), Some(ArtifactHash::Md5(m5.into())));
        // A malformed stronger hash does not hide a good weaker one, and is never used.
        assert_eq!(
            h(Some(s1), None, Some("abc")).strongest(),
            Some(ArtifactHash::Sha1(s1.to_ascii_lowercase()))
        );
        assert_eq!(h(None, None, None).strongest(), None);
        assert_eq!(h(Some(&s1[..39]), Some("zz"), None).strongest(), None);
    }

    #[test]
    fn a_hawkbit_deployment_parses_with_both_links_and_all_hashes() {
        let body = br#"{"id":"8","deployment":{"download":"forced","update":"attempt",
          "maintenanceWindow":"unavailable",
          "chunks":[{"part":"os","version":"2.0.0","name":"app","artifacts":[{
          "filename":"app-2.0.0.zip",
          "hashes":{"sha1":"986a1ade8b8a2f758ce951340cc5e21335cc2a00",
          "md5":"d04440e6533863247655ac5fd4345bcc",
          "sha256":"b3a04740a19e36057ccf25870192e3e2d0cd5b9a6e1d7b3e9ef9b32b6d4bd1a6"},"size":3,
          "_links":{"download":{"href":"https://h/x"},"download-http":{"href":"http://h/x"},
          "md5sum":{"href":"https://h/x.MD5SUM"}}}]}]},
          "actionHistory":{"status":"RUNNING","messages":["x"]},"_links":{}}"#;
        let d = DeploymentBase::parse(body).unwrap();
        assert_eq!(d.id, "8");
        assert_eq!(d.deployment.update, Handling::Attempt);
        assert_eq!(d.deployment.maintenance_window, Some(MaintenanceWindow::Unavailable));
        let (chunk, a) = d.artifacts().next().unwrap();
        assert_eq!(chunk.version, "2.0.0");
        assert_eq!(a.download_url(), Some("https://h/x"));
        assert!(matches!(a.hashes.strongest(), Some(ArtifactHash::Sha256(_))));
    }

    #[test]
    fn deployments_a_device_cannot_act_on_safely_are_refused() {
        let art = |links: &str, hashes: &str| {
            format!(
                concat!(
                    r#"{{"id":"7","deployment":{{"chunks":[{{"part":"os","version":"1","name":"n","#,
                    r#""artifacts":[{{"filename":"a.zip","hashes":{hashes},"_links":{links}}}]}}]}}}}"#
                ),
                hashes = hashes,
                links = links
            )
        };
        let good_links = r#"{"download-http":{"href":"http://h/a"}}"#;
        let good_hashes = r#"{"sha1":"986a1ade8b8a2f758ce951340cc5e21335cc2a00"}"#;
        let d = DeploymentBase::parse(art(good_links, good_hashes).as_bytes()).unwrap();
        // Absent modes are forced (the spec's default behaviour of servers that omit them).
        assert_eq!(
            (d.deployment.download, d.deployment.update),
            (Handling::Forced, Handling::Forced)
        );
        let refused = |body: String, why: &str| {
            let e = DeploymentBase::parse(body.as_bytes()).unwrap_err();
            assert!(e.0.contains(why), "{e} should say {why}");
        };
        refused(art("{}", good_hashes), "no download link");
        refused(art(good_links, "{}"), "no sha256, sha1 or md5");
        refused(art(good_links, r#"{"sha256":"not hex"}"#), "no sha256, sha1 or md5");
        refused(r#"{"id":"7","deployment":{"chunks":[]}}"#.into(), "no artifact");
        refused(
            art(good_links, good_hashes).replace(r#""id":"7""#, r#""id":"../7""#),
            "not a short alphanumeric id",
        );
        refused(
            art(good_links, good_hashes).replace(r#""id":"7""#, r#""id":"""#),
            "not a short alphanumeric id",
        );
        refused(
            art(good_links, good_hashes)
                .replace(r#""chunks""#, r#""download":"sometimes","chunks""#),
            "deploymentBase",
        );
        let many: Vec<String> = (0..=DDI_ARTIFACTS_MAX)
            .map(|i| {
                format!(r#"{{"filename":"a{i}.zip","hashes":{good_hashes},"_links":{good_links}}}"#)
            })
            .collect();
        refused(
            format!(
                concat!(
                    r#"{{"id":"7","deployment":{{"#,
                    r#""chunks":[{{"part":"os","version":"1","name":"n","artifacts":[{}]}}]}}}}"#
                ),
                many.join(",")
            ),
            "artifacts, at most",
        );
    }

    #[test]
    fn feedback_serialises_as_the_spec_names_it_with_bounded_details() {
        let long = "é".repeat(DDI_DETAIL_BYTES_MAX);
        let details = std::iter::once(long)
            .chain((0..DDI_DETAILS_MAX + 5).map(|i| format!("line {i}")))
            .collect();
        let f = Feedback::new(
            Execution::Proceeding,
            Finished::None,
            Some(Progress { cnt: 2, of: 5 }),
            details,
            Some(1_627_997_501_890),
        );
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["status"]["execution"], "proceeding");
        assert_eq!(v["status"]["result"]["finished"], "none");
        assert_eq!(v["status"]["result"]["progress"], serde_json::json!({"cnt": 2, "of": 5}));
        assert_eq!(v["timestamp"], 1_627_997_501_890_u64);
        let d = v["status"]["details"].as_array().unwrap();
        assert_eq!(d.len(), DDI_DETAILS_MAX);
        assert!(d[0].as_str().unwrap().len() <= DDI_DETAIL_BYTES_MAX);
        assert!(v["status"].get("code").is_none());
        let closed = serde_json::to_value(Feedback::new(
            Execution::Closed,
            Finished::Success,
            None,
            vec![],
            None,
        ))
        .unwrap();
        assert_eq!(
            closed,
            serde_json::json!({
                "status": {"execution": "closed", "result": {"finished": "success"}}
            })
        );
    }

    #[test]
    fn a_poll_answer_gives_its_links_and_sleep() {
        let p: ControllerBase = serde_json::from_str(
            r#"{"config":{"polling":{"sleep":"00:00:10"}},
                "_links":{"configData":{
                    "href":"http://h/DEFAULT/controller/v1/dev1/configData"}}}"#,
        )
        .unwrap();
        assert_eq!(p.sleep(), Some(Duration::from_secs(10)));
        assert_eq!(p.link("configData"), Some("http://h/DEFAULT/controller/v1/dev1/configData"));
        assert_eq!(p.link("deploymentBase"), None);
        let bare: ControllerBase = serde_json::from_str("{}").unwrap();
        assert_eq!(bare.sleep(), None);
    }
}
