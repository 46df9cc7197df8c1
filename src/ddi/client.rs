//! The DDI client's HTTP side: one ureq agent, requests to the configured server only.
//!
//! Every URL the client calls on the server is built from the configured controller URL and
//! the action id (checked by `protocol::check_action_id`), never taken from the server's
//! `_links`: a server answer cannot send the device's token, or its feedback, elsewhere. The
//! `Authorization` header goes only to the configured server's origin; an artifact link on
//! another host (a CDN) is fetched without it.

use super::protocol::{
    Cancel, ConfigData, ControllerBase, DeploymentBase, Feedback, ProtocolError, check_action_id,
};
use crate::config::ddi::{Auth, DdiConfig};
use crate::limits::DDI_RESPONSE_BYTES_MAX;
use std::time::Duration;

pub struct Client {
    agent: ureq::Agent,
    controller: String,
    origin: String,
    auth: Option<Auth>,
    /// One request at a time (the poller and the feedback sender share the client): a server
    /// sees a device's requests in the order they were made. gooseBit 0.2.12 loses an update
    /// otherwise: a configData handled beside a `closed` feedback saves the device's state as
    /// it read it before the feedback (tests/it/ddi.rs, the trial rolled back at boot).
    one_at_a_time: std::sync::Mutex<()>,
}

/// Why a request did not give a usable answer.
#[derive(Debug)]
pub enum ClientError {
    /// Connection, timeout, or a 5xx/429: try again later, with backoff.
    Transient(String),
    /// The server answered, but not with what the protocol allows (4xx, bad JSON, bad ids):
    /// trying the same again will not help.
    Refused(String),
    /// The resource is gone (`404`, `410`; for a deploymentBase also gooseBit's `null` when the
    /// assignment changed between the poll and the fetch): an offered deployment is then not
    /// the device's to refuse (the next poll says what is offered now), and a feedback to a
    /// vanished action is dropped like a refused one.
    Withdrawn(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Transient(m) | ClientError::Refused(m) | ClientError::Withdrawn(m) => {
                f.write_str(m)
            }
        }
    }
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        ClientError::Refused(e.0)
    }
}

/// `scheme://host[:port]` of a URL (lower-cased), for the same-origin rule.
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some(format!("{}://{}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase()))
}

impl Client {
    pub fn new(cfg: &DdiConfig, auth: Option<Auth>, timeout: Duration) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(!cfg.allow_http)
            // A redirect could carry the token to another host.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_global(Some(timeout))
            .user_agent(concat!("tope-updater/", env!("CARGO_PKG_VERSION")))
            .build();
        let controller = cfg.controller_url();
        let origin = origin_of(&controller).unwrap_or_default();
        Client {
            agent: ureq::Agent::new_with_config(config),
            controller,
            origin,
            auth,
            one_at_a_time: std::sync::Mutex::new(()),
        }
    }

    /// The `Authorization` header for `url`: only on the configured server's origin.
    pub fn auth_for(&self, url: &str) -> Option<String> {
        self.auth
            .as_ref()
            .filter(|_| origin_of(url).as_deref() == Some(self.origin.as_str()))
            .map(Auth::header)
    }

    pub fn controller_url(&self) -> &str {
        &self.controller
    }

    fn action_url(&self, resource: &str, action: &str, tail: &str) -> Result<String, ClientError> {
        check_action_id(action)?;
        Ok(format!("{}/{resource}/{action}{tail}", self.controller))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        let body = self.request("GET", url, None)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Refused(format!("GET {url}: {e}")))
    }

    /// One request; the answer's body (at most `DDI_RESPONSE_BYTES_MAX`) on 2xx.
    fn request(
        &self,
        method: &str,
        url: &str,
        json: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let auth = self.auth_for(url);
        let sent = match (method, json) {
            ("GET", _) => {
                let mut r =
                    self.agent.get(url).header("Accept", "application/hal+json, application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (m, body) => {
                let mut r = if m == "PUT" { self.agent.put(url) } else { self.agent.post(url) };
                r = r
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or(b"{}"))
            }
        };
        let mut resp = sent.map_err(|e| ClientError::Transient(format!("{method} {url}: {e}")))?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().with_config().limit(DDI_RESPONSE_BYTES_MAX as u64).read_to_vec();
        match status {
            200..=299 => body.map_err(|e| {
                ClientError::Transient(format!(
                    "{method} {url}: HTTP {status}, body unreadable: {e}"
                ))
            }),
            429 | 500..=599 => {
                Err(ClientError::Transient(format!("{method} {url}: HTTP {status}")))
            }
            404 | 410 => Err(ClientError::Withdrawn(format!("{method} {url}: HTTP {status}"))),
            _ => Err(ClientError::Refused(format!("{method} {url}: HTTP {status}"))),
        }
    }

    pub fn poll(&self) -> Result<ControllerBase, ClientError> {
        self.get_json(&self.controller)
    }

    pub fn deployment(&self, action: &str) -> Result<DeploymentBase, ClientError> {
        let url = self.action_url("deploymentBase", action, "")?;
        let body = self.request("GET", &url, None)?;
        if body.trim_ascii() == b"null" {
            return Err(ClientError::Withdrawn(format!("GET {url}: null")));
        }
        let d = DeploymentBase::parse(&body)?;
        if d.id != action {
            return Err(ClientError::Refused(format!(
                "GET {url}: the answer is about action {:?}",
                d.id
            )));
        }
        Ok(d)
    }

    pub fn cancel(&self, action: &str) -> Result<Cancel, ClientError> {
        let url = self.action_url("cancelAction", action, "")?;
        let c: Cancel = self.get_json(&url)?;
        check_action_id(&c.cancel_action.stop_id)?;
        Ok(c)
    }

    pub fn put_config(&self, data: &ConfigData) -> Result<(), ClientError> {
        let body = serde_json::to_vec(data).map_err(|e| ClientError::Refused(e.to_string()))?;
        self.request("PUT", &format!("{}/configData", self.controller), Some(&body)).map(|_| ())
    }

    /// Feedback on a deployment (`cancel` false) or on a cancel action.
    pub fn feedback(&self, action: &str, cancel: bool, f: &Feedback) -> Result<(), ClientError> {
        let body = serde_json::to_vec(f).map_err(|e| ClientError::Refused(e.to_string()))?;
        self.feedback_body(action, cancel, &body)
    }

    /// The same with the JSON body as queued in the journal.
    pub fn feedback_body(
        &self,
        action: &str,
        cancel: bool,
        body: &[u8],
    ) -> Result<(), ClientError> {
        let url = self.action_url(
            if cancel { "cancelAction" } else { "deploymentBase" },
            action,
            "/feedback",
        )?;
        self.request("POST", &url, Some(body)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            origin_of("https://H.example:8443/DEFAULT/x?y").as_deref(),
            Some("https://h.example:8443")
        );
        assert_eq!(origin_of("http://127.0.0.1:8060").as_deref(), Some("http://127.0.0.1:8060"));
        assert_eq!(origin_of("https://user@h/x"), None);
        assert_eq!(origin_of("nonsense"), None);
    }

    #[test]
    fn the_token_goes_only_to_the_configured_server() {
        let cfg = DdiConfig {
            server_url: "https://fleet.example".into(),
            tenant: "DEFAULT".into(),
            controller_id: "dev1".into(),
            token_file: None,
            gateway_token_file: None,
            allow_http: false,
        };
        let c = Client::new(&cfg, Some(Auth::Target("t0k".into())), Duration::from_secs(5));
        assert_eq!(
            c.auth_for("https://fleet.example/DEFAULT/controller/v1/dev1").as_deref(),
            Some("TargetToken t0k")
        );
        assert_eq!(c.auth_for("https://FLEET.example/a/b").as_deref(), Some("TargetToken t0k"));
        for other in [
            "https://cdn.example/a.zip",
            "http://fleet.example/a",
            "https://fleet.example:444/a",
            "https://fleet.example.evil/a",
        ] {
            assert_eq!(c.auth_for(other), None, "{other}");
        }
        assert!(matches!(c.action_url("deploymentBase", "../x", ""), Err(ClientError::Refused(_))));
        assert_eq!(
            c.action_url("deploymentBase", "8", "/feedback").unwrap(),
            "https://fleet.example/DEFAULT/controller/v1/dev1/deploymentBase/8/feedback"
        );
    }
}
