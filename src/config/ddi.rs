//! The `[ddi]` table: present → `serve` also runs the DDI client; absent → off.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::{DDI_ID_BYTES_MAX, DDI_TOKEN_BYTES_MAX};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdiConfig {
    /// The server's base URL, e.g. `https://hawkbit.example.com` (no path beyond the
    /// server's own prefix, no query).
    pub server_url: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    pub controller_id: String,
    /// A file holding this device's target token (`Authorization: TargetToken ...`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Or a file holding the tenant's gateway token (`Authorization: GatewayToken ...`).
    #[serde(default)]
    pub gateway_token_file: Option<PathBuf>,
    /// Allow `http://` for the server and its artifact links (tests, a LAN server).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_tenant() -> String {
    "DEFAULT".into()
}

/// How the client authenticates, with the secret read from its file.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    Target(String),
    Gateway(String),
}

impl std::fmt::Debug for Auth {
    // Never print a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Auth::Target(_) => "TargetToken(..)",
            Auth::Gateway(_) => "GatewayToken(..)",
        })
    }
}

impl Auth {
    pub fn header(&self) -> String {
        match self {
            Auth::Target(t) => format!("TargetToken {t}"),
            Auth::Gateway(t) => format!("GatewayToken {t}"),
        }
    }
}

/// An id that goes into the server's paths: letters, digits, `-`, `_`, `.` (not only dots).
fn is_path_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DDI_ID_BYTES_MAX
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.bytes().all(|b| b == b'.')
}

impl DdiConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorCode::ValidationError, format!("[ddi] {m}")));
        let url = &self.server_url;
        let scheme_ok =
            url.starts_with("https://") || (self.allow_http && url.starts_with("http://"));
        if !scheme_ok {
            return bad(format!(
                "server_url {url:?} must be https://{}",
                if self.allow_http {
                    " or http://"
                } else {
                    " (allow_http = true permits http://)"
                }
            ));
        }
        if url.contains(['?', '#'])
            || url.len() > crate::limits::URL_BYTES_MAX
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return bad(format!(
                "server_url {url:?}: no query, fragment or spaces, at most {} bytes",
                crate::limits::URL_BYTES_MAX
            ));
        }
        if !is_path_id(&self.tenant) {
            return bad(format!(
                "tenant {:?}: letters, digits, '-', '_' or '.', at most {DDI_ID_BYTES_MAX} bytes",
                self.tenant
            ));
        }
        if !is_path_id(&self.controller_id) {
            return bad(format!(
                "controller_id {:?}: letters, digits, '-', '_' or '.', at most {DDI_ID_BYTES_MAX} \
                bytes",
                self.controller_id
            ));
        }
        match (&self.token_file, &self.gateway_token_file) {
            (Some(_), Some(_)) => bad("set token_file or gateway_token_file, not both".into()),
            (Some(p), None) | (None, Some(p)) if !p.is_absolute() => {
                bad(format!("{}: the token file must be an absolute path", p.display()))
            }
            _ => Ok(()),
        }
    }

    /// `{server_url}/{tenant}/controller/v1/{controller_id}`: the poll resource, and the
    /// prefix of every other resource the client calls.
    pub fn controller_url(&self) -> String {
        format!(
            "{}/{}/controller/v1/{}",
            self.server_url.trim_end_matches('/'),
            self.tenant,
            self.controller_id
        )
    }

    /// Reads the token from its file: at most `DDI_TOKEN_BYTES_MAX` bytes, trimmed, printable
    /// ASCII (it goes into a header). No token file: no `Authorization` header (servers such
    /// as gooseBit in its default setup accept any device).
    pub fn auth(&self) -> Result<Option<Auth>> {
        let read = |p: &Path| -> Result<String> {
            let bad = |m: String| {
                Error::new(
                    ErrorCode::ValidationError,
                    format!("[ddi] token file {}: {m}", p.display()),
                )
            };
            let meta = std::fs::metadata(p).map_err(|e| bad(e.to_string()))?;
            if meta.len() > DDI_TOKEN_BYTES_MAX as u64 {
                return Err(bad(format!("larger than {DDI_TOKEN_BYTES_MAX} bytes")));
            }
            let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
            let token = text.trim();
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("expected one token of printable ASCII characters".into()));
            }
            Ok(token.to_string())
        };
        Ok(match (&self.token_file, &self.gateway_token_file) {
            (Some(p), _) => Some(Auth::Target(read(p)?)),
            (None, Some(p)) => Some(Auth::Gateway(read(p)?)),
            (None, None) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DdiConfig {
        DdiConfig {
            server_url: "https://h.example/".into(),
            tenant: default_tenant(),
            controller_id: "printer-0042".into(),
            token_file: None,
            gateway_token_file: None,
            allow_http: false,
        }
    }

    #[test]
    fn the_controller_url_is_built_from_validated_parts() {
        assert!(cfg().validate().is_ok());
        assert_eq!(cfg().controller_url(), "https://h.example/DEFAULT/controller/v1/printer-0042");
    }

    #[test]
    fn settings_that_would_leak_a_token_or_escape_a_path_are_refused() {
        let refused = |c: DdiConfig, why: &str| {
            let e = c.validate().unwrap_err();
            assert_eq!(e.code, ErrorCode::ValidationError);
            assert!(e.message.contains(why), "{} should say {why}", e.message);
        };
        refused(DdiConfig { server_url: "http://h".into(), ..cfg() }, "allow_http = true permits");
        assert!(
            DdiConfig { server_url: "http://h".into(), allow_http: true, ..cfg() }
                .validate()
                .is_ok()
        );
        refused(
            DdiConfig { server_url: "ftp://h".into(), allow_http: true, ..cfg() },
            "must be https://",
        );
        refused(DdiConfig { server_url: "https://h/?x=1".into(), ..cfg() }, "no query");
        for id in ["", "..", "a/b", "a b", "ü", &"x".repeat(DDI_ID_BYTES_MAX + 1)] {
            refused(DdiConfig { controller_id: id.into(), ..cfg() }, "controller_id");
            refused(DdiConfig { tenant: id.into(), ..cfg() }, "tenant");
        }
        refused(
            DdiConfig {
                token_file: Some("/a".into()),
                gateway_token_file: Some("/b".into()),
                ..cfg()
            },
            "not both",
        );
        refused(DdiConfig { token_file: Some("token".into()), ..cfg() }, "absolute path");
    }

    #[test]
    fn tokens_are_read_trimmed_and_never_printed() {
        let dir = std::env::temp_dir().join(format!("tope-ddi-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cr3t-token\n").unwrap();
        let c = DdiConfig { token_file: Some(file.clone()), ..cfg() };
        let auth = c.auth().unwrap().unwrap();
        assert_eq!(auth.header(), "TargetToken s3cr3t-token");
        assert!(!format!("{auth:?}").contains("s3cr3t"));
        let g = DdiConfig { gateway_token_file: Some(file.clone()), ..cfg() };
        assert_eq!(g.auth().unwrap().unwrap().header(), "GatewayToken s3cr3t-token");
        for bad in ["", "two words", "tab\there"] {
            std::fs::write(&file, bad).unwrap();
            assert!(c.auth().is_err(), "{bad:?}");
        }
        std::fs::write(&file, "x".repeat(DDI_TOKEN_BYTES_MAX + 1)).unwrap();
        assert!(c.auth().unwrap_err().message.contains("larger than"));
        assert!(DdiConfig { token_file: Some(dir.join("missing")), ..cfg() }.auth().is_err());
        assert_eq!(cfg().auth().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
