//! Asking a running daemon: while it runs it holds the journal open (redb allows one process
//! per file), so the reporting commands fall back to its API on `api.listen`.

use crate::config::Config;
use crate::error::{Error, ErrorCode, Result};

/// Where to reach a daemon listening on `listen`: a daemon bound to all interfaces is asked on
/// loopback (its guard admits a loopback `Host`, not `0.0.0.0`).
fn reachable(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(std::net::SocketAddr::V4(a)) if a.ip().is_unspecified() => {
            format!("127.0.0.1:{}", a.port())
        }
        Ok(std::net::SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        _ => listen.to_string(),
    }
}

pub(super) fn from_daemon<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T> {
    let listen = std::fs::read_to_string(crate::daemon::addr_file(&cfg.state_dir))
        .unwrap_or_else(|_| cfg.api.listen.clone());
    let url = format!("http://{}{path}", reachable(listen.trim()));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .proxy(None)
        .build()
        .into();
    let text = agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))?;
    let body: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))?;
    if body["code"] != 200 {
        return Err(Error::new(ErrorCode::InternalError, format!("GET {url}: {}", body["msg"])));
    }
    serde_json::from_value(body["data"].clone())
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_daemon_on_all_interfaces_is_asked_on_loopback() {
        assert_eq!(super::reachable("0.0.0.0:12315"), "127.0.0.1:12315");
        assert_eq!(super::reachable("[::]:12315"), "[::1]:12315");
        assert_eq!(super::reachable("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(super::reachable("192.168.1.5:12315"), "192.168.1.5:12315");
        assert_eq!(super::reachable("localhost:12315"), "localhost:12315");
    }
}
