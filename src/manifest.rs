//! `manifest.json`: parsed leniently where the legacy service was lenient (unknown fields are
//! ignored with a warning), strictly everywhere else. Destinations are checked against the
//! allowed roots by `package`, which knows the configuration.

use crate::engine::Hash;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{
    DELTA_BASES_MAX, MANIFEST_BYTES_MAX, MODULES_MAX, NAME_BYTES_MAX, PATH_BYTES_MAX,
    PATH_COMPONENT_BYTES_MAX, POST_CMD_BYTES_MAX, POST_CMDS_MAX,
};
use crate::version::Version;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct RawManifest {
    version: String,
    modules: Vec<RawModule>,
    #[serde(default)]
    compatible: Option<String>,
    #[serde(default)]
    min_from_version: Option<String>,
    #[serde(default)]
    reboot: Option<bool>,
    #[serde(default)]
    delta: Option<RawDelta>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

/// The `delta` object of a delta package. Its modules live here, and the top-level `modules`
/// is empty: an engine that does not know deltas (the Python service, whose schema needs at
/// least one module, and tope-updater before 0.2) refuses the package before touching
/// anything, instead of deploying patch bytes as files.
#[derive(Deserialize)]
struct RawDelta {
    format: u32,
    #[serde(default)]
    from_versions: Vec<String>,
    modules: Vec<RawModule>,
    #[serde(default)]
    files: BTreeMap<String, RawDeltaFile>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

/// A deployed file the delta package does not hold whole (keyed by the entry name a full
/// package would hold it under).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeltaFile {
    size: u64,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    patches: Vec<RawPatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatch {
    base: String,
    entry: String,
}

#[derive(Deserialize)]
struct RawModule {
    name: String,
    src: String,
    dst: String,
    #[serde(default)]
    process_name: Option<String>,
    #[serde(default)]
    restart_order: Option<i64>,
    #[serde(default)]
    post_cmds: Option<Vec<String>>,
    #[serde(default)]
    blake3: Option<String>,
    #[serde(default)]
    files: Option<BTreeMap<String, String>>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

/// Where a module's content is in the ZIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSrc {
    /// One entry, deployed at `dst`.
    File(String),
    /// Every file entry under this prefix (ends with `/`), deployed under `dst`.
    Dir(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub src: ModuleSrc,
    /// As written; `package` normalises and checks it.
    pub dst: String,
    pub process_name: Option<String>,
    pub restart_order: Option<i64>,
    pub post_cmds: Vec<String>,
    /// File modules: hash of the content.
    pub blake3: Option<Hash>,
    /// Directory modules: relative path → hash.
    pub files: Option<BTreeMap<String, Hash>>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The delta format this engine reads (`delta.format`).
pub const DELTA_FORMAT: u32 = 1;

/// A patch entry and the content it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub base: Hash,
    pub entry: String,
}

/// A file of a delta package that is built on the device: from content found by its own
/// hash (the device already has it), or by applying one of `patches` to content found by
/// the patch's base hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaFile {
    pub size: u64,
    /// Permission bits, as a full package's ZIP entry would carry them.
    pub mode: Option<u32>,
    pub patches: Vec<Patch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The versions whose content the patches apply to (for messages).
    pub from_versions: Vec<String>,
    /// Entry name (as in a full package) → how the file is built.
    pub files: BTreeMap<String, DeltaFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: Version,
    pub modules: Vec<Module>,
    pub compatible: Option<String>,
    pub min_from_version: Option<Version>,
    pub reboot: bool,
    /// Present for a delta package (its modules are in `modules` all the same).
    pub delta: Option<Delta>,
    /// Unknown fields seen (`modules[3].foo`), already logged as warnings.
    pub unknown_fields: Vec<String>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidManifest, msg)
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(invalid(format!(
                "manifest.json is larger than {MANIFEST_BYTES_MAX} bytes"
            )));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| invalid(format!("manifest.json is not UTF-8: {e}")))?;
        // serde_json stops at 128 levels of nesting, so a nesting bomb is an error, not a
        // stack overflow.
        let raw: RawManifest =
            serde_json::from_str(text).map_err(|e| invalid(format!("manifest.json: {e}")))?;
        Manifest::validate(raw)
    }

    fn validate(mut raw: RawManifest) -> Result<Manifest> {
        let version = Version::parse(&raw.version)?;
        let mut unknown_fields: Vec<String> = raw.unknown.keys().cloned().collect();
        let (raw_modules, at, delta) = match raw.delta.take() {
            None => (std::mem::take(&mut raw.modules), "modules", None),
            Some(d) => {
                if !raw.modules.is_empty() {
                    return Err(invalid(
                        "a delta package keeps its modules in delta.modules; the top-level \
                        modules must be empty",
                    ));
                }
                if d.format != DELTA_FORMAT {
                    return Err(invalid(format!(
                        "delta format {} is not supported by this engine (it reads format \
                        {DELTA_FORMAT}); install the full package",
                        d.format
                    )));
                }
                unknown_fields.extend(d.unknown.keys().map(|k| format!("delta.{k}")));
                let delta = validate_delta(d.from_versions, d.files)?;
                (d.modules, "delta.modules", Some(delta))
            }
        };
        if raw_modules.is_empty() {
            return Err(invalid(format!("{at} is empty")));
        }
        if raw_modules.len() > MODULES_MAX {
            return Err(invalid(format!("more than {MODULES_MAX} modules")));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut modules = Vec::with_capacity(raw_modules.len());
        for (i, m) in raw_modules.into_iter().enumerate() {
            unknown_fields.extend(m.unknown.keys().map(|k| format!("{at}[{i}].{k}")));
            let module =
                validate_module(m).map_err(|e| invalid(format!("{at}[{i}]: {}", e.message)))?;
            if delta.is_some() && module.blake3.is_none() && module.files.is_none() {
                // The content is built on the device: only a pinned hash can check it.
                return Err(invalid(format!(
                    "{at}[{i}]: a delta package must pin every file (blake3 or files)"
                )));
            }
            if !names.insert(module.name.clone()) {
                return Err(invalid(format!("module name {:?} is used twice", module.name)));
            }
            modules.push(module);
        }
        if let Some(c) = &raw.compatible {
            check_name("compatible", c)?;
        }
        let min_from_version = raw.min_from_version.as_deref().map(Version::parse).transpose()?;
        for f in &unknown_fields {
            tracing::warn!(field = %f, "manifest.json: unknown field ignored");
        }
        Ok(Manifest {
            version,
            modules,
            compatible: raw.compatible,
            min_from_version,
            reboot: raw.reboot.unwrap_or(false),
            delta,
            unknown_fields,
        })
    }
}

fn validate_delta(
    from_versions: Vec<String>,
    files: BTreeMap<String, RawDeltaFile>,
) -> Result<Delta> {
    if from_versions.len() > DELTA_BASES_MAX {
        return Err(invalid(format!(
            "delta.from_versions has more than {DELTA_BASES_MAX} versions"
        )));
    }
    for v in &from_versions {
        Version::parse(v).map_err(|e| invalid(format!("delta.from_versions: {}", e.message)))?;
    }
    let mut out = BTreeMap::new();
    for (name, f) in files {
        check_relative("delta.files key", &name, false)?;
        if f.patches.len() > DELTA_BASES_MAX {
            return Err(invalid(format!(
                "delta.files[{name:?}] has more than {DELTA_BASES_MAX} patches"
            )));
        }
        let mut patches = Vec::with_capacity(f.patches.len());
        for p in f.patches {
            check_relative("delta patch entry", &p.entry, false)?;
            patches.push(Patch { base: parse_hash("delta patch base", &p.base)?, entry: p.entry });
        }
        let mode = f.mode.as_deref().map(parse_mode).transpose()?;
        out.insert(name, DeltaFile { size: f.size, mode, patches });
    }
    Ok(Delta { from_versions, files: out })
}

fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > NAME_BYTES_MAX || s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} {s:?} must be 1..{NAME_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

fn parse_hash(what: &str, s: &str) -> Result<Hash> {
    Hash::from_hex(&s.to_ascii_lowercase())
        .ok_or_else(|| invalid(format!("{what} {s:?} is not 64 hex digits")))
}

/// A relative path inside the package: no leading `/`, no `.`/`..`/empty components, no NUL or
/// backslash, bounded length. Used for `src`, for `files` keys, and for ZIP entry names.
pub fn check_relative(what: &str, s: &str, allow_trailing_slash: bool) -> Result<()> {
    let body = if allow_trailing_slash { s.strip_suffix('/').unwrap_or(s) } else { s };
    let bad = |why: &str| Err(invalid(format!("{what} {s:?} {why}")));
    if body.is_empty() || s.len() > PATH_BYTES_MAX {
        return bad("must be a non-empty relative path of bounded length");
    }
    if s.contains('\0') || s.contains('\\') {
        return bad("contains NUL or a backslash");
    }
    if body.starts_with('/') {
        return bad("must be relative");
    }
    for c in body.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return bad("has an empty, '.' or '..' component");
        }
        if c.len() > PATH_COMPONENT_BYTES_MAX {
            return bad("has a component longer than 255 bytes");
        }
    }
    Ok(())
}

fn validate_module(m: RawModule) -> Result<Module> {
    check_name("name", &m.name)?;
    check_relative("src", &m.src, true)?;
    let src = if m.src.ends_with('/') {
        ModuleSrc::Dir(m.src.clone())
    } else {
        ModuleSrc::File(m.src.clone())
    };
    if let Some(p) = &m.process_name {
        check_name("process_name", p)?;
    }
    let post_cmds = m.post_cmds.unwrap_or_default();
    if post_cmds.len() > POST_CMDS_MAX {
        return Err(invalid(format!("more than {POST_CMDS_MAX} post_cmds")));
    }
    for c in &post_cmds {
        if c.trim().is_empty() || c.len() > POST_CMD_BYTES_MAX || c.contains('\0') {
            return Err(invalid(format!("post_cmd {c:?} is empty, too long or contains NUL")));
        }
    }
    let blake3 = m.blake3.as_deref().map(|h| parse_hash("blake3", h)).transpose()?;
    let files = match m.files {
        None => None,
        Some(map) => {
            let mut out = BTreeMap::new();
            for (rel, h) in map {
                check_relative("files key", &rel, false)?;
                out.insert(rel, parse_hash("files value", &h)?);
            }
            Some(out)
        }
    };
    match (&src, &blake3, &files) {
        (ModuleSrc::Dir(_), Some(_), _) => {
            return Err(invalid("blake3 is for file modules; directory modules use files"));
        }
        (ModuleSrc::File(_), _, Some(_)) => {
            return Err(invalid("files is for directory modules (src ending in '/')"));
        }
        _ => {}
    }
    let mode = m.mode.as_deref().map(parse_mode).transpose()?;
    Ok(Module {
        name: m.name,
        src,
        dst: m.dst,
        process_name: m.process_name,
        restart_order: m.restart_order,
        post_cmds,
        blake3,
        files,
        mode,
        uid: m.uid,
        gid: m.gid,
    })
}

fn parse_mode(s: &str) -> Result<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(invalid(format!("mode {s:?} is not an octal string")));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| invalid(format!("mode {s:?}")))?;
    if mode > 0o7777 {
        return Err(invalid(format!("mode {s:?} has bits beyond 07777")));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Manifest> {
        Manifest::parse(s.as_bytes())
    }

    #[test]
    fn legacy_manifest_is_accepted_unchanged() {
        let m = parse(
            r#"{ "version": "1.2.3", "modules": [ { "name": "device-api",
            "src": "modules/device-api/device-api", "dst": "/opt/tope/device-api/device-api",
            "process_name": "device-api", "restart_order": 1,
            "post_cmds": ["systemctl daemon-reload"] } ] }"#,
        )
        .unwrap();
        assert_eq!(m.version.to_string(), "1.2.3");
        assert_eq!(m.modules[0].post_cmds, vec!["systemctl daemon-reload"]);
        assert_eq!(m.modules[0].restart_order, Some(1));
    }

    #[test]
    fn unknown_fields_are_reported_not_rejected() {
        let m = parse(
            r#"{"version":"1.0.0","builder":"ci",
                "modules":[{"name":"a","src":"a","dst":"/opt/tope/a","x":1}]}"#,
        )
        .unwrap();
        assert_eq!(m.unknown_fields, vec!["builder".to_string(), "modules[0].x".to_string()]);
    }

    #[test]
    fn rejections_are_invalid_manifest() {
        let cases = [
            r#"{"version":"1.0","modules":[{"name":"a","src":"a","dst":"/opt/tope/a"}]}"#,
            r#"{"version":"1.0.0","modules":[]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"a","dst":"/x"},
                {"name":"a","src":"b","dst":"/y"}]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"../a","dst":"/x"}]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"/a","dst":"/x"}]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"a","dst":"/x","mode":"999"}]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"a","dst":"/x","blake3":"00"}]}"#,
            r#"{"version":"1.0.0","modules":[{"name":"a","src":"d/","dst":"/x",
                "blake3":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
            r#"{"version":"1.0.0"}"#,
            "not json",
        ];
        for c in cases {
            assert_eq!(parse(c).unwrap_err().code, ErrorCode::InvalidManifest, "{c}");
        }
    }

    #[test]
    fn nesting_bomb_is_an_error_not_a_crash() {
        let bomb = format!(
            "{{\"version\":\"1.0.0\",\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse(&bomb).unwrap_err().code, ErrorCode::InvalidManifest);
    }

    #[test]
    fn non_utf8_and_oversized_manifests_are_rejected() {
        assert_eq!(
            Manifest::parse(&[0xff, 0xfe, b'{']).unwrap_err().code,
            ErrorCode::InvalidManifest
        );
        let big = vec![b' '; MANIFEST_BYTES_MAX as usize + 1];
        assert_eq!(Manifest::parse(&big).unwrap_err().code, ErrorCode::InvalidManifest);
    }

    #[test]
    fn modes_are_octal_strings() {
        assert_eq!(parse_mode("0755").unwrap(), 0o755);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        assert!(parse_mode("rwx").is_err());
    }
}
