//! `tope-updater pack DIR -o PKG`: builds a package from a directory holding a manifest
//! template and the module sources, filling in every blake3 so each deployed byte is checked.

use crate::engine::Hash;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::manifest::Manifest;
use crate::package::MANIFEST_NAME;
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zip::write::SimpleFileOptions;

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::ValidationError, msg)
}

#[derive(Debug, serde::Serialize)]
pub struct PackReport {
    pub output: String,
    pub version: String,
    pub files: usize,
    pub bytes: u64,
    pub signed: bool,
}

/// Builds the package; with `sign`, also `manifest.json.sig` over the exact manifest bytes.
pub fn pack(dir: &Path, output: &Path, version: Option<&str>, sign: Option<&Path>) -> Result<PackReport> {
    let key = sign.map(crate::signing::load_signing_key).transpose()?;
    let template_path = dir.join(MANIFEST_NAME);
    let text = std::fs::read_to_string(&template_path).map_err(|e| Error::io(ErrorCode::ValidationError, "read", &template_path, &e))?;
    let mut doc: Value = serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", template_path.display())))?;
    let root = doc.as_object_mut().ok_or_else(|| bad("manifest template is not a JSON object"))?;
    if let Some(v) = version {
        root.insert("version".into(), Value::String(v.to_string()));
    }
    let modules = root.get_mut("modules").and_then(Value::as_array_mut).ok_or_else(|| bad("manifest template has no modules array"))?;
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    for m in modules.iter_mut() {
        let m = m.as_object_mut().ok_or_else(|| bad("a module is not an object"))?;
        let src = m.get("src").and_then(Value::as_str).ok_or_else(|| bad("a module has no src"))?.to_string();
        if let Some(prefix) = src.strip_suffix('/') {
            let base = dir.join(prefix);
            let mut files = Map::new();
            for rel in walk_files(&base)? {
                let (hash, _) =
                    fsutil::hash_file(&base.join(&rel)).map_err(|e| Error::io(ErrorCode::ValidationError, "read", &base.join(&rel), &e))?;
                files.insert(rel.clone(), Value::String(hash.to_hex()));
                entries.push((format!("{src}{rel}"), base.join(&rel)));
            }
            m.insert("files".into(), Value::Object(files));
        } else {
            let p = dir.join(&src);
            let (hash, _) = fsutil::hash_file(&p).map_err(|e| Error::io(ErrorCode::ValidationError, "read", &p, &e))?;
            m.insert("blake3".into(), Value::String(hash.to_hex()));
            entries.push((src, p));
        }
    }
    let manifest_bytes = serde_json::to_vec_pretty(&doc).map_err(|e| Error::internal(e.to_string()))?;
    // Validate what we produce with the same parser the installer uses.
    let manifest = Manifest::parse(&manifest_bytes)?;
    let tmp = output.with_extension("zip.part");
    let out = File::create(&tmp).map_err(|e| Error::io(ErrorCode::ValidationError, "create", &tmp, &e))?;
    let mut zip = zip::ZipWriter::new(BufWriter::new(out));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).compression_level(Some(1));
    let zerr = |e: zip::result::ZipError| Error::internal(format!("write {}: {e}", output.display()));
    zip.start_file(MANIFEST_NAME, opts.unix_permissions(0o644)).map_err(zerr)?;
    zip.write_all(&manifest_bytes).map_err(|e| Error::io(ErrorCode::InternalError, "write", &tmp, &e))?;
    if let Some(key) = &key {
        zip.start_file(
            crate::signing::SIGNATURE_NAME,
            opts.compression_method(zip::CompressionMethod::Stored).compression_level(None).unix_permissions(0o644),
        )
        .map_err(zerr)?;
        zip.write_all(&crate::signing::sign(key, &manifest_bytes)).map_err(|e| Error::io(ErrorCode::InternalError, "write", &tmp, &e))?;
    }
    // Two modules may deploy the same source: the archive holds it once.
    let mut seen = std::collections::BTreeSet::new();
    entries.retain(|(name, _)| seen.insert(name.clone()));
    let mut bytes = 0u64;
    for (name, path) in &entries {
        let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        let entry_opts =
            if compresses(path)? { opts } else { opts.compression_method(zip::CompressionMethod::Stored).compression_level(None) };
        zip.start_file(name.as_str(), entry_opts.unix_permissions(mode).large_file(true)).map_err(zerr)?;
        let f = File::open(path).map_err(|e| Error::io(ErrorCode::ValidationError, "open", path, &e))?;
        let (_, n) = fsutil::copy_hashed(f, &mut zip).map_err(|e| Error::internal(format!("pack {}: {e:?}", path.display())))?;
        bytes += n;
    }
    let writer = zip.finish().map_err(zerr)?;
    writer
        .into_inner()
        .map_err(|e| Error::internal(format!("flush {}: {e}", tmp.display())))?
        .sync_all()
        .map_err(|e| Error::io(ErrorCode::InternalError, "fsync", &tmp, &e))?;
    std::fs::rename(&tmp, output).map_err(|e| Error::io(ErrorCode::InternalError, "rename", output, &e))?;
    Ok(PackReport {
        output: output.display().to_string(),
        version: manifest.version.to_string(),
        files: entries.len(),
        bytes,
        signed: key.is_some(),
    })
}

/// Whether deflate is worth it for this file, judged on its first MiB: already-compressed or
/// random content is stored, so installing it costs no inflate and reads it straight through.
fn compresses(path: &Path) -> Result<bool> {
    use std::io::Read;
    const SAMPLE_BYTES: u64 = 1024 * 1024;
    let mut sample = Vec::new();
    File::open(path)
        .and_then(|f| f.take(SAMPLE_BYTES).read_to_end(&mut sample))
        .map_err(|e| Error::io(ErrorCode::ValidationError, "read", path, &e))?;
    if sample.len() < 256 {
        return Ok(false);
    }
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&sample)
        .and_then(|_| enc.finish())
        .map(|out| out.len() * 10 < sample.len() * 9)
        .map_err(|e| Error::internal(format!("deflate sample: {e}")))
}

/// Regular files under `base`, as sorted relative `/`-separated paths.
fn walk_files(base: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = base.join(&rel);
        let rd = std::fs::read_dir(&abs).map_err(|e| Error::io(ErrorCode::ValidationError, "read dir", &abs, &e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(ErrorCode::ValidationError, "read dir", &abs, &e))?;
            let child = rel.join(entry.file_name());
            let ft = entry.file_type().map_err(|e| Error::io(ErrorCode::ValidationError, "stat", &entry.path(), &e))?;
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                out.push(child.to_str().ok_or_else(|| bad(format!("{} is not UTF-8", child.display())))?.to_string());
            } else {
                return Err(bad(format!("{} is neither a file nor a directory", entry.path().display())));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// blake3 of a file as hex, for callers that print it.
pub fn file_hash(path: &Path) -> Result<Hash> {
    fsutil::hash_file(path).map(|(h, _)| h).map_err(|e| Error::io(ErrorCode::ValidationError, "read", path, &e))
}
