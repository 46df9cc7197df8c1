//! `tope-updater pack DIR -o PKG`: builds a package from a directory holding a manifest
//! template and the module sources, filling in every blake3 so each deployed byte is checked.

use crate::engine::Hash;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::manifest::Manifest;
use crate::pack_delta::{NewFile, Shipped, full_entry_bytes};
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
    /// Bytes of the package written.
    pub package_bytes: u64,
    /// For a delta package: what it ships against a full one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaReport>,
}

#[derive(Debug, serde::Serialize)]
pub struct DeltaReport {
    pub from_versions: Vec<String>,
    /// Files shipped whole, as patches, and not at all (the device already has them).
    pub whole: usize,
    pub patched: usize,
    pub on_device: usize,
    /// The entries a full package would hold (deflated where that pays), in bytes.
    pub full_entries_bytes: u64,
    /// The entries this package holds instead.
    pub entries_bytes: u64,
}

/// Where a patch entry lives in a delta package (never under a module's `src`).
const PATCH_PREFIX: &str = ".tope-delta/";

/// Builds the package; with `sign`, also `manifest.json.sig` over the exact manifest bytes;
/// with `delta_from`, a delta package against those full packages (`pack_delta.rs`).
pub fn pack(
    dir: &Path,
    output: &Path,
    version: Option<&str>,
    sign: Option<&Path>,
    delta_from: &[PathBuf],
) -> Result<PackReport> {
    let key = sign.map(crate::signing::load_signing_key).transpose()?;
    let (mut doc, found) = fill_template(dir, version)?;
    // Two modules may deploy the same source: the archive holds it once.
    let mut seen = std::collections::BTreeSet::new();
    let mut shipped: Vec<&NewFile> =
        found.iter().filter(|f| seen.insert(f.entry.clone())).collect();
    let mut patches: Vec<(String, Vec<u8>)> = Vec::new();
    let mut delta_report = None;
    if !delta_from.is_empty() {
        let (whole, report) = make_delta(&mut doc, &found, delta_from, &mut patches)?;
        shipped.retain(|f| whole.contains(&f.entry));
        delta_report = Some(report);
    }
    let manifest_bytes =
        serde_json::to_vec_pretty(&doc).map_err(|e| Error::internal(e.to_string()))?;
    // Validate what we produce with the same parser the installer uses.
    let manifest = Manifest::parse(&manifest_bytes)?;
    let signature = key.as_ref().map(|k| crate::signing::sign(k, &manifest_bytes));
    let bytes = write_package(
        output,
        &manifest_bytes,
        signature.as_ref().map(<[u8; 64]>::as_slice),
        &shipped,
        &patches,
    )?;
    let package_bytes = std::fs::metadata(output).map_or(0, |m| m.len());
    if let Some(r) = delta_report.as_mut() {
        measure_delta(r, &found, output)?;
    }
    Ok(PackReport {
        output: output.display().to_string(),
        version: manifest.version.to_string(),
        files: found.len(),
        bytes,
        signed: key.is_some(),
        package_bytes,
        delta: delta_report,
    })
}

/// The manifest template of `dir` with the version set and every module's hashes filled in
/// (`blake3`, or `files` for a directory module), and the files it ships.
fn fill_template(dir: &Path, version: Option<&str>) -> Result<(Value, Vec<NewFile>)> {
    let template_path = dir.join(MANIFEST_NAME);
    let text = std::fs::read_to_string(&template_path)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "read", &template_path, &e))?;
    let mut doc: Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{}: {e}", template_path.display())))?;
    let root = doc.as_object_mut().ok_or_else(|| bad("manifest template is not a JSON object"))?;
    if let Some(v) = version {
        root.insert("version".into(), Value::String(v.to_string()));
    }
    let modules = root
        .get_mut("modules")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("manifest template has no modules array"))?;
    let mut found: Vec<NewFile> = Vec::new();
    for m in modules.iter_mut() {
        let m = m.as_object_mut().ok_or_else(|| bad("a module is not an object"))?;
        let src = m
            .get("src")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a module has no src"))?
            .to_string();
        let dst = m
            .get("dst")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a module has no dst"))?
            .to_string();
        if src.starts_with(PATCH_PREFIX) {
            return Err(bad(format!(
                "src {src:?}: {PATCH_PREFIX} is where delta packages keep their patches"
            )));
        }
        if let Some(prefix) = src.strip_suffix('/') {
            let base = dir.join(prefix);
            let mut files = Map::new();
            for rel in walk_files(&base)? {
                let f = new_file(
                    format!("{src}{rel}"),
                    base.join(&rel),
                    format!("{}/{rel}", dst.trim_end_matches('/')),
                )?;
                files.insert(rel.clone(), Value::String(f.hash.to_hex()));
                found.push(f);
            }
            m.insert("files".into(), Value::Object(files));
        } else {
            let f = new_file(src.clone(), dir.join(&src), dst)?;
            m.insert("blake3".into(), Value::String(f.hash.to_hex()));
            found.push(f);
        }
    }
    Ok((doc, found))
}

/// Turns the filled manifest into a delta manifest against the base packages: per file, not
/// shipped, patches (appended to `patches`), or whole. Returns the entries shipped whole.
fn make_delta(
    doc: &mut Value,
    found: &[NewFile],
    delta_from: &[PathBuf],
    patches: &mut Vec<(String, Vec<u8>)>,
) -> Result<(std::collections::BTreeSet<String>, DeltaReport)> {
    let (how, from_versions) = crate::pack_delta::plan(found, delta_from)?;
    let mut files = Map::new();
    let mut report = DeltaReport {
        from_versions: from_versions.clone(),
        whole: 0,
        patched: 0,
        on_device: 0,
        full_entries_bytes: 0,
        entries_bytes: 0,
    };
    let mut whole = std::collections::BTreeSet::new();
    for (f, shipped) in found.iter().zip(how) {
        match shipped {
            Shipped::Whole => {
                whole.insert(f.entry.clone());
                report.whole += 1;
            }
            Shipped::Delta { patches: ps } => {
                let mut list = Vec::new();
                for (base, bytes) in ps {
                    let entry = format!("{PATCH_PREFIX}{}", patches.len());
                    list.push(serde_json::json!({"base": base.to_hex(), "entry": entry}));
                    patches.push((entry, bytes));
                }
                if list.is_empty() {
                    report.on_device += 1;
                } else {
                    report.patched += 1;
                }
                let mode = format!("{:04o}", f.mode);
                let file = serde_json::json!({"size": f.size, "mode": mode, "patches": list});
                files.insert(f.entry.clone(), file);
            }
        }
    }
    // The modules move under `delta`, and the top-level list stays empty: an engine that
    // does not know deltas refuses the package whole (manifest.rs, RawDelta).
    let root = doc.as_object_mut().ok_or_else(|| bad("manifest template is not a JSON object"))?;
    let mods = root
        .get_mut("modules")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    root.insert(
        "delta".into(),
        serde_json::json!({
            "format": crate::manifest::DELTA_FORMAT,
            "from_versions": from_versions,
            "modules": mods,
            "files": files
        }),
    );
    Ok((whole, report))
}

/// Writes the package: manifest, signature, the files shipped whole, the patches; fsync'd
/// under a temporary name, then renamed over `output` (a reader never sees half a package).
/// Returns the bytes of the files shipped whole.
fn write_package(
    output: &Path,
    manifest_bytes: &[u8],
    signature: Option<&[u8]>,
    shipped: &[&NewFile],
    patches: &[(String, Vec<u8>)],
) -> Result<u64> {
    let tmp = output.with_extension("zip.part");
    let out = File::create(&tmp)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "create", &tmp, &e))?;
    let mut zip = zip::ZipWriter::new(BufWriter::new(out));
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1));
    let stored = opts.compression_method(zip::CompressionMethod::Stored).compression_level(None);
    let zerr =
        |e: zip::result::ZipError| Error::internal(format!("write {}: {e}", output.display()));
    let werr = |e: std::io::Error| Error::io(ErrorCode::InternalError, "write", &tmp, &e);
    zip.start_file(MANIFEST_NAME, opts.unix_permissions(0o644)).map_err(zerr)?;
    zip.write_all(manifest_bytes).map_err(werr)?;
    if let Some(signature) = signature {
        zip.start_file(crate::signing::SIGNATURE_NAME, stored.unix_permissions(0o644))
            .map_err(zerr)?;
        zip.write_all(signature).map_err(werr)?;
    }
    let mut bytes = 0u64;
    for f in shipped {
        let entry_opts = if compresses(&f.path)? { opts } else { stored };
        zip.start_file(f.entry.as_str(), entry_opts.unix_permissions(f.mode).large_file(true))
            .map_err(zerr)?;
        let file = File::open(&f.path)
            .map_err(|e| Error::io(ErrorCode::ValidationError, "open", &f.path, &e))?;
        let (_, n) = fsutil::copy_hashed(file, &mut zip)
            .map_err(|e| Error::internal(format!("pack {}: {e:?}", f.path.display())))?;
        bytes += n;
    }
    // Patches are zstd already: stored.
    for (name, patch) in patches {
        zip.start_file(name.as_str(), stored.unix_permissions(0o644).large_file(true))
            .map_err(zerr)?;
        zip.write_all(patch).map_err(werr)?;
    }
    let writer = zip.finish().map_err(zerr)?;
    writer
        .into_inner()
        .map_err(|e| Error::internal(format!("flush {}: {e}", tmp.display())))?
        .sync_all()
        .map_err(|e| Error::io(ErrorCode::InternalError, "fsync", &tmp, &e))?;
    std::fs::rename(&tmp, output)
        .map_err(|e| Error::io(ErrorCode::InternalError, "rename", output, &e))?;
    Ok(bytes)
}

/// The delta report's sizes: the entries of the full package these files would make, and
/// the entries of the delta package as written (read back from `output`).
fn measure_delta(r: &mut DeltaReport, found: &[NewFile], output: &Path) -> Result<()> {
    let mut counted = std::collections::BTreeSet::new();
    for f in found.iter().filter(|f| counted.insert(f.entry.as_str())) {
        r.full_entries_bytes += full_entry_bytes(&f.path, f.size)?;
    }
    let read_back =
        |e: zip::result::ZipError| Error::internal(format!("read back {}: {e}", output.display()));
    let file =
        File::open(output).map_err(|e| Error::io(ErrorCode::InternalError, "open", output, &e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(read_back)?;
    for i in 0..archive.len() {
        let e = archive.by_index_raw(i).map_err(read_back)?;
        let name = e
            .name()
            .map_err(|e| Error::internal(format!("read back {}: {e}", output.display())))?;
        if name != MANIFEST_NAME && name != crate::signing::SIGNATURE_NAME {
            r.entries_bytes += e.compressed_size();
        }
    }
    Ok(())
}

fn new_file(entry: String, path: PathBuf, dst: String) -> Result<NewFile> {
    let meta = std::fs::metadata(&path)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "stat", &path, &e))?;
    let (hash, size) = fsutil::hash_file(&path)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "read", &path, &e))?;
    Ok(NewFile { entry, path, dst, hash, size, mode: meta.permissions().mode() & 0o7777 })
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
        .and_then(|()| enc.finish())
        .map(|out| out.len() * 10 < sample.len() * 9)
        .map_err(|e| Error::internal(format!("deflate sample: {e}")))
}

/// Regular files under `base`, as sorted relative `/`-separated paths.
fn walk_files(base: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = base.join(&rel);
        let rd = std::fs::read_dir(&abs)
            .map_err(|e| Error::io(ErrorCode::ValidationError, "read dir", &abs, &e))?;
        for entry in rd {
            let entry =
                entry.map_err(|e| Error::io(ErrorCode::ValidationError, "read dir", &abs, &e))?;
            let child = rel.join(entry.file_name());
            let ft = entry
                .file_type()
                .map_err(|e| Error::io(ErrorCode::ValidationError, "stat", &entry.path(), &e))?;
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                out.push(
                    child
                        .to_str()
                        .ok_or_else(|| bad(format!("{} is not UTF-8", child.display())))?
                        .to_string(),
                );
            } else {
                return Err(bad(format!(
                    "{} is neither a file nor a directory",
                    entry.path().display()
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// blake3 of a file as hex, for callers that print it.
pub fn file_hash(path: &Path) -> Result<Hash> {
    fsutil::hash_file(path)
        .map(|(h, _)| h)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "read", path, &e))
}
