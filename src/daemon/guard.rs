//! Who may call the API (SPEC §5 "Who may call", SECURITY.md): the decision, taken before any
//! handler (or the router) sees a request. Pure: request headers and the peer's uid in, a
//! verdict out; `conns.rs` applies it to every request of every connection.
//!
//! The threats: any web page in a browser on the device can send "simple" cross-origin
//! requests (text/plain, form or multipart bodies, no preflight) to 127.0.0.1, and a
//! DNS-rebinding page can also read the answers. A browser always names the page's origin
//! (`Origin`) on a cross-origin request and on every POST, and always names the host it
//! thinks it talks to (`Host`); a legacy client (device-api, the GUI, curl) sends no `Origin`
//! and a loopback `Host`. So: a foreign `Origin` is refused, a `Host` that is not this device
//! is refused, and a POST must say `application/json` (which a page cannot send cross-origin
//! without a preflight that we never answer).

use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, Method, Uri};
use std::net::IpAddr;

/// The configured allow-lists, normalised once (ASCII-lowercase).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    origins: Vec<String>,
    hosts: Vec<String>,
    uids: Vec<u32>,
}

/// The uid of the process at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerUid {
    /// `api.allowed_uids` is empty: nobody looked.
    NotChecked,
    Known(u32),
    /// No local socket matches the connection (a remote peer, or one already gone).
    Unknown,
}

/// Why a request was refused: the header at fault and what it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Uid(PeerUid),
    /// The `Host` header (or an absolute-form request target's authority): missing,
    /// repeated, unparsable, or not this device.
    Host(Option<String>),
    Origin(String),
    /// A POST whose `Content-Type` is not `application/json` (missing: only with an `Origin`).
    ContentType(Option<String>),
}

impl Refusal {
    /// The header named in the log line.
    pub fn header(&self) -> &'static str {
        match self {
            Refusal::Uid(_) => "peer uid",
            Refusal::Host(_) => "host",
            Refusal::Origin(_) => "origin",
            Refusal::ContentType(_) => "content-type",
        }
    }

    /// The offending value, quoted and shortened (it is attacker-controlled: never trusted in
    /// a log line or an answer unescaped).
    pub fn value(&self) -> String {
        match self {
            Refusal::Uid(PeerUid::Known(u)) => u.to_string(),
            Refusal::Uid(_) => "unknown".into(),
            Refusal::Host(v) | Refusal::ContentType(v) => {
                v.as_deref().map_or_else(|| "(none)".into(), quote)
            }
            Refusal::Origin(v) => quote(v),
        }
    }

    /// The message after `REQUEST_REFUSED: `.
    pub fn message(&self) -> String {
        let v = self.value();
        match self {
            Refusal::Uid(_) => format!("the caller's uid {v} is not in api.allowed_uids"),
            Refusal::Host(_) => {
                format!("Host {v} is not a loopback address, localhost or in api.allowed_hosts")
            }
            Refusal::Origin(_) => format!("Origin {v} is not in api.allowed_origins"),
            Refusal::ContentType(_) => {
                format!("Content-Type {v}: a request body must be application/json")
            }
        }
    }
}

/// `v` as a quoted, escaped string of at most `API_QUOTED_HEADER_BYTES_MAX` characters.
fn quote(v: &str) -> String {
    let max = crate::limits::API_QUOTED_HEADER_BYTES_MAX;
    let short: String = v.chars().take(max).collect();
    let q = format!("{short:?}");
    if v.chars().count() > max { format!("{q}...") } else { q }
}

/// A header's single value as text; `Err` when it is repeated or not visible ASCII.
fn single<'a>(headers: &'a HeaderMap, name: &http::HeaderName) -> Result<Option<&'a str>, String> {
    let mut all = headers.get_all(name).iter();
    let Some(first) = all.next() else { return Ok(None) };
    let text = String::from_utf8_lossy(first.as_bytes()).into_owned();
    if all.next().is_some() {
        return Err(format!("{text} (repeated)"));
    }
    first.to_str().map(Some).map_err(|_| text)
}

impl Policy {
    pub fn new(api: &crate::config::ApiConfig) -> Policy {
        let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect();
        let hosts = api
            .allowed_hosts
            .iter()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
            .collect();
        Policy { origins: lower(&api.allowed_origins), hosts, uids: api.allowed_uids.clone() }
    }

    /// Whether connections need their peer's uid (`PeerUid::NotChecked` otherwise).
    pub fn checks_uids(&self) -> bool {
        !self.uids.is_empty()
    }

    /// Admits or refuses one request. The order is the cheapest proof first; every check runs
    /// before routing, so even an unknown path is not answered to a refused caller.
    pub fn admit(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        peer: PeerUid,
    ) -> Result<(), Refusal> {
        if self.checks_uids() && !matches!(peer, PeerUid::Known(u) if self.uids.contains(&u)) {
            return Err(Refusal::Uid(peer));
        }
        // An absolute-form target (`POST http://evil.example/...`) names the host that
        // counts (RFC 9112 §3.2.2); both it and the Host header must be this device.
        if let Some(authority) = uri.authority()
            && !self.is_local_authority(authority.as_str())
        {
            return Err(Refusal::Host(Some(authority.to_string())));
        }
        match single(headers, &HOST) {
            Ok(Some(h)) if self.is_local_authority(h) => {}
            Ok(h) => return Err(Refusal::Host(h.map(str::to_string))),
            Err(v) => return Err(Refusal::Host(Some(v))),
        }
        let origin = match single(headers, &ORIGIN) {
            Ok(o) => o,
            Err(v) => return Err(Refusal::Origin(v)),
        };
        if let Some(o) = origin
            && !self.origins.iter().any(|a| a.eq_ignore_ascii_case(o))
        {
            return Err(Refusal::Origin(o.to_string()));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            match single(headers, &CONTENT_TYPE) {
                Ok(Some(ct)) if is_json(ct) => {}
                // Legacy callers may POST without a content type; a browser page never can
                // (it always sends Origin with a POST).
                Ok(None) if origin.is_none() => {}
                Ok(ct) => return Err(Refusal::ContentType(ct.map(str::to_string))),
                Err(v) => return Err(Refusal::ContentType(Some(v))),
            }
        }
        Ok(())
    }

    /// `host[:port]` names this device: a loopback address, `localhost`, or an allowed host.
    fn is_local_authority(&self, authority: &str) -> bool {
        let Ok(a) = authority.parse::<http::uri::Authority>() else { return false };
        if a.as_str().contains('@') {
            return false;
        }
        let host = a.host();
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return ip.to_canonical().is_loopback()
                || self.hosts.iter().any(|h| h.parse::<IpAddr>() == Ok(ip));
        }
        bare.eq_ignore_ascii_case("localhost")
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(bare))
    }
}

/// `application/json`, parameters (such as `charset`) allowed.
fn is_json(content_type: &str) -> bool {
    content_type.parse::<mime::Mime>().is_ok_and(|m| {
        m.type_() == mime::APPLICATION && m.subtype() == mime::JSON && m.suffix().is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiConfig;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn policy(origins: &[&str], hosts: &[&str], uids: &[u32]) -> Policy {
        Policy::new(&ApiConfig {
            allowed_origins: origins.iter().map(std::string::ToString::to_string).collect(),
            allowed_hosts: hosts.iter().map(std::string::ToString::to_string).collect(),
            allowed_uids: uids.to_vec(),
            ..ApiConfig::default()
        })
    }

    fn post(p: &Policy, pairs: &[(&str, &str)]) -> Result<(), Refusal> {
        p.admit(
            &Method::POST,
            &"/api/v1.0/update".parse().unwrap(),
            &headers(pairs),
            PeerUid::NotChecked,
        )
    }

    fn get(p: &Policy, target: &str, pairs: &[(&str, &str)]) -> Result<(), Refusal> {
        p.admit(&Method::GET, &target.parse().unwrap(), &headers(pairs), PeerUid::NotChecked)
    }

    const JSON: (&str, &str) = ("content-type", "application/json");
    const LOCAL: (&str, &str) = ("host", "127.0.0.1:12315");

    #[test]
    fn legacy_callers_are_admitted() {
        let p = Policy::default();
        assert_eq!(post(&p, &[LOCAL, JSON]), Ok(()));
        assert_eq!(post(&p, &[LOCAL, ("content-type", "application/json; charset=utf-8")]), Ok(()));
        assert_eq!(post(&p, &[LOCAL, ("content-type", "Application/JSON")]), Ok(()));
        assert_eq!(post(&p, &[LOCAL]), Ok(()), "no content type and no Origin: a legacy POST");
        for host in [
            "localhost",
            "localhost:12315",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:12315",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(get(&p, "/api/v1.0/progress", &[("host", host)]), Ok(()), "{host}");
        }
    }

    #[test]
    fn browser_borne_bodies_are_refused() {
        let p = Policy::default();
        for ct in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "application/ld+json",
            "json",
            "",
        ] {
            assert_eq!(
                post(&p, &[LOCAL, ("content-type", ct)]),
                Err(Refusal::ContentType(Some(ct.into()))),
                "{ct:?}"
            );
        }
        let two = post(&p, &[LOCAL, JSON, JSON]);
        assert!(
            matches!(two, Err(Refusal::ContentType(Some(ref v))) if v.contains("repeated")),
            "{two:?}"
        );
    }

    #[test]
    fn any_origin_not_listed_is_refused_even_with_json() {
        let p = Policy::default();
        for o in ["http://evil.example", "null", "http://127.0.0.1:12315", "http://localhost"] {
            assert_eq!(
                post(&p, &[LOCAL, JSON, ("origin", o)]),
                Err(Refusal::Origin(o.into())),
                "{o}"
            );
            assert_eq!(
                get(&p, "/api/v1.0/progress", &[LOCAL, ("origin", o)]),
                Err(Refusal::Origin(o.into())),
                "{o}"
            );
        }
    }

    #[test]
    fn a_listed_origin_is_admitted_but_must_send_json() {
        let p = policy(&["http://Kiosk.local:8080"], &[], &[]);
        assert_eq!(post(&p, &[LOCAL, JSON, ("origin", "http://kiosk.local:8080")]), Ok(()));
        assert_eq!(
            post(&p, &[LOCAL, ("origin", "http://kiosk.local:8080")]),
            Err(Refusal::ContentType(None))
        );
        assert_eq!(
            post(&p, &[LOCAL, JSON, ("origin", "http://kiosk.local:8081")]),
            Err(Refusal::Origin("http://kiosk.local:8081".into()))
        );
    }

    #[test]
    fn a_host_that_is_not_this_device_is_refused() {
        let p = Policy::default();
        for host in [
            "evil.example:12315",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:12315",
            "[::2]:1",
            "0.0.0.0",
            "user@127.0.0.1",
            "localhost.",
            "",
        ] {
            assert_eq!(
                get(&p, "/api/v1.0/progress", &[("host", host)]),
                Err(Refusal::Host(Some(host.into()))),
                "{host}"
            );
        }
        assert_eq!(get(&p, "/api/v1.0/progress", &[]), Err(Refusal::Host(None)));
        let two = get(&p, "/api/v1.0/progress", &[LOCAL, ("host", "evil.example")]);
        assert!(
            matches!(two, Err(Refusal::Host(Some(ref v))) if v.contains("repeated")),
            "{two:?}"
        );
    }

    #[test]
    fn an_absolute_form_target_must_name_this_device_too() {
        let p = Policy::default();
        assert_eq!(
            get(&p, "http://evil.example/api/v1.0/progress", &[LOCAL]),
            Err(Refusal::Host(Some("evil.example".into()))),
            "the target's authority is what counts"
        );
        assert_eq!(get(&p, "http://127.0.0.1:12315/api/v1.0/progress", &[LOCAL]), Ok(()));
    }

    #[test]
    fn allowed_hosts_admit_names_and_addresses() {
        let p = policy(&[], &["Printer.lan", "192.168.1.5", "[fe80::1]"], &[]);
        for host in ["printer.lan:12315", "192.168.1.5:12315", "[fe80::1]:12315", "localhost"] {
            assert_eq!(get(&p, "/", &[("host", host)]), Ok(()), "{host}");
        }
        assert!(get(&p, "/", &[("host", "printer.lan.evil.example")]).is_err());
    }

    #[test]
    fn uids_are_checked_first_when_configured() {
        let p = policy(&[], &[], &[0, 1000]);
        let at = |uid| p.admit(&Method::GET, &"/".parse().unwrap(), &headers(&[LOCAL]), uid);
        assert_eq!(at(PeerUid::Known(1000)), Ok(()));
        assert_eq!(at(PeerUid::Known(65534)), Err(Refusal::Uid(PeerUid::Known(65534))));
        assert_eq!(at(PeerUid::Unknown), Err(Refusal::Uid(PeerUid::Unknown)));
        assert_eq!(
            at(PeerUid::NotChecked),
            Err(Refusal::Uid(PeerUid::NotChecked)),
            "a policy with uids never admits an unchecked peer"
        );
        assert_eq!(
            Policy::default().admit(
                &Method::GET,
                &"/".parse().unwrap(),
                &headers(&[LOCAL]),
                PeerUid::Known(65534)
            ),
            Ok(())
        );
    }

    #[test]
    fn config_entries_are_checked_for_shape() {
        for o in ["http://kiosk.local", "https://a.example:8443", "http://[::1]:80"] {
            assert!(crate::config::is_origin(o), "{o}");
        }
        for o in [
            "null",
            "http://a.example/",
            "http://a.example/path",
            "ftp://a.example",
            "a.example",
            "http://u@a.example",
            "",
        ] {
            assert!(!crate::config::is_origin(o), "{o}");
        }
        for h in ["printer.lan", "192.168.1.5", "[fe80::1]", "fe80::1"] {
            assert!(crate::config::is_host_name(h), "{h}");
        }
        for h in ["", "a.example:80", "a/b", "a b"] {
            assert!(!crate::config::is_host_name(h), "{h}");
        }
    }

    #[test]
    fn refused_values_are_quoted_and_bounded() {
        let long = "x".repeat(5000);
        let r = Refusal::Origin(format!("http://e\n{long}"));
        let v = r.value();
        assert!(v.starts_with("\"http://e\\n") && v.ends_with("...") && v.len() < 300, "{v}");
        assert!(!r.message().contains('\n'));
    }
}
