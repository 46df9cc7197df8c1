//! Package signatures (SPEC §2): ed25519 over the exact bytes of `manifest.json`, stored as
//! `manifest.json.sig` (64 raw bytes) in the package. The manifest of a signed package must
//! carry a blake3 hash for every file it deploys, and staging checks every byte against it,
//! so the signature authenticates the whole payload.
//!
//! Key files are one line of text: `tope-updater-secret-key-v1 <64 hex>` (the 32-byte
//! seed, file mode 0600) and `tope-updater-public-key-v1 <64 hex>`.

use crate::config::Config;
use crate::error::{Error, ErrorCode, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const SIGNATURE_NAME: &str = "manifest.json.sig";
const SECRET_TAG: &str = "tope-updater-secret-key-v1";
const PUBLIC_TAG: &str = "tope-updater-public-key-v1";

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::SignatureInvalid, msg)
}

#[derive(Debug, serde::Serialize)]
pub struct KeygenReport {
    pub secret_key: String,
    pub public_key: String,
}

/// Writes `PREFIX.key` (secret, mode 0600) and `PREFIX.pub`; never overwrites either.
pub fn keygen(prefix: &Path) -> Result<KeygenReport> {
    let mut seed = [0u8; 32];
    let urandom = Path::new("/dev/urandom");
    std::fs::File::open(urandom)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|e| Error::io(ErrorCode::InternalError, "read", urandom, &e))?;
    let key = SigningKey::from_bytes(&seed);
    let secret = with_suffix(prefix, "key");
    let public = with_suffix(prefix, "pub");
    for p in [&secret, &public] {
        if p.exists() {
            return Err(Error::new(
                ErrorCode::ValidationError,
                format!("{} exists; not overwriting a key", p.display()),
            ));
        }
    }
    write_new(&secret, 0o600, &format!("{SECRET_TAG} {}\n", hex(&seed)))?;
    write_new(&public, 0o644, &format!("{PUBLIC_TAG} {}\n", hex(key.verifying_key().as_bytes())))?;
    Ok(KeygenReport {
        secret_key: secret.display().to_string(),
        public_key: public.display().to_string(),
    })
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<()> {
    let io = |e: std::io::Error| Error::io(ErrorCode::InternalError, "write", path, &e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `<tag> <64 hex>`.
fn read_key_file(path: &Path, tag: &str) -> std::result::Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let rest = text.trim().strip_prefix(tag).ok_or_else(|| format!("not a {tag} file"))?.trim();
    if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the key is not 64 hex digits".into());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&rest[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    read_key_file(path, SECRET_TAG).map(|seed| SigningKey::from_bytes(&seed)).map_err(|why| {
        Error::new(ErrorCode::ValidationError, format!("secret key {}: {why}", path.display()))
    })
}

/// Signs the exact manifest bytes.
pub fn sign(key: &SigningKey, manifest: &[u8]) -> [u8; 64] {
    key.sign(manifest).to_bytes()
}

/// The configured `trusted_keys`. An unreadable or malformed key file is a configuration
/// error, never a silently smaller set of keys.
pub fn trusted_keys(cfg: &Config) -> Result<Vec<VerifyingKey>> {
    cfg.trusted_keys
        .iter()
        .map(|p| {
            read_key_file(p, PUBLIC_TAG)
                .and_then(|b| VerifyingKey::from_bytes(&b).map_err(|e| e.to_string()))
                .map_err(|why| {
                    Error::new(
                        ErrorCode::ValidationError,
                        format!("trusted key {}: {why}", p.display()),
                    )
                })
        })
        .collect()
}

/// Whether the package is authenticated. A signature present must verify (strictly) under
/// one trusted key; a missing one is refused when `require_signature` is set. `Ok(true)`
/// means the manifest is authentic, and the caller must then insist on a hash per file.
pub fn check(cfg: &Config, manifest: &[u8], signature: Option<&[u8]>) -> Result<bool> {
    let Some(sig) = signature else {
        return if cfg.require_signature {
            Err(invalid(format!(
                "the package is not signed (no {SIGNATURE_NAME}) and require_signature = true"
            )))
        } else {
            Ok(false)
        };
    };
    let keys = trusted_keys(cfg)?;
    if keys.is_empty() {
        tracing::warn!(
            "the package is signed but no trusted_keys are configured: the signature is not checked"
        );
        return Ok(false);
    }
    let bytes: [u8; 64] = sig.try_into().map_err(|_| {
        invalid(format!("{SIGNATURE_NAME} is {} bytes; an ed25519 signature is 64", sig.len()))
    })?;
    let sig = Signature::from_bytes(&bytes);
    if keys.iter().any(|k| k.verify_strict(manifest, &sig).is_ok()) {
        Ok(true)
    } else {
        Err(invalid(format!(
            "{SIGNATURE_NAME} does not verify under any of the {} trusted key(s)",
            keys.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_over_the_exact_bytes_and_only_under_a_trusted_key() {
        let dir = tempfile::tempdir().unwrap();
        let r = keygen(&dir.path().join("k")).unwrap();
        let other = keygen(&dir.path().join("other")).unwrap();
        let key = load_signing_key(Path::new(&r.secret_key)).unwrap();
        let sig = sign(&key, b"{\"version\":\"1.0.0\"}");
        let mut cfg =
            Config { trusted_keys: vec![PathBuf::from(&r.public_key)], ..Config::default() };
        assert!(check(&cfg, b"{\"version\":\"1.0.0\"}", Some(&sig)).unwrap());
        assert_eq!(
            check(&cfg, b"{\"version\":\"1.0.1\"}", Some(&sig)).unwrap_err().code,
            ErrorCode::SignatureInvalid
        );
        assert_eq!(
            check(&cfg, b"x", Some(&sig[..63])).unwrap_err().code,
            ErrorCode::SignatureInvalid
        );
        cfg.trusted_keys = vec![PathBuf::from(&other.public_key)];
        assert_eq!(
            check(&cfg, b"{\"version\":\"1.0.0\"}", Some(&sig)).unwrap_err().code,
            ErrorCode::SignatureInvalid
        );
        cfg.require_signature = true;
        assert_eq!(check(&cfg, b"{}", None).unwrap_err().code, ErrorCode::SignatureInvalid);
    }

    #[test]
    fn keygen_never_overwrites_and_keeps_the_secret_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let r = keygen(&dir.path().join("k")).unwrap();
        assert_eq!(std::fs::metadata(&r.secret_key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(keygen(&dir.path().join("k")).unwrap_err().code, ErrorCode::ValidationError);
    }
}
