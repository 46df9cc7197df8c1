//! `pack --delta-from BASE.zip` (repeatable): which files a delta package ships, and how.
//! Per deployed file, judged against the file every base deploys at the same destination:
//! - every base holds it with the same blake3 → not shipped (the device already has it);
//! - each base holds other content, and a patch from each is smaller than the full entry
//!   (deflated) → the patches are shipped (`delta.rs`);
//! - otherwise (a base without the file, or a patch not worth it) → the full entry.

use crate::delta;
use crate::engine::Hash;
use crate::error::{Error, ErrorCode, Result};
use crate::manifest::{Manifest, ModuleSrc};
use crate::package::MANIFEST_NAME;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::ValidationError, msg)
}

/// A file of the new version, as `pack` found it.
pub struct NewFile {
    pub entry: String,
    pub path: PathBuf,
    /// The destination as the manifest writes it (directory modules: `dst/rel`).
    pub dst: String,
    pub hash: Hash,
    pub size: u64,
    pub mode: u32,
}

/// How one file is shipped.
pub enum Shipped {
    Whole,
    /// Built on the device from the listed bases (none: from its own content).
    Delta {
        patches: Vec<(Hash, Vec<u8>)>,
    },
}

/// A file of a base package.
struct BaseFile {
    entry: String,
    hash: Hash,
    size: u64,
}

/// One base package: its version and, by destination, the file it deploys there.
struct Base {
    path: PathBuf,
    version: String,
    by_dst: BTreeMap<String, BaseFile>,
    archive: zip::ZipArchive<File>,
}

fn open_base(path: &Path) -> Result<Base> {
    let file = File::open(path)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "open base package", path, &e))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| bad(format!("base {}: {e}", path.display())))?;
    let manifest = {
        let mut bytes = Vec::new();
        let entry = archive
            .by_name(MANIFEST_NAME)
            .map_err(|e| bad(format!("base {}: {MANIFEST_NAME}: {e}", path.display())))?;
        entry
            .take(crate::limits::MANIFEST_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("base {}: {e}", path.display())))?;
        Manifest::parse(&bytes)
            .map_err(|e| bad(format!("base {}: {}", path.display(), e.message)))?
    };
    if manifest.delta.is_some() {
        return Err(bad(format!(
            "base {} is a delta package; a base must be a full package",
            path.display()
        )));
    }
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("base {}: {e}", path.display())))?;
    let mut by_dst = BTreeMap::new();
    for m in &manifest.modules {
        let files: Vec<(String, String, Option<Hash>)> = match &m.src {
            ModuleSrc::File(src) => vec![(src.clone(), m.dst.clone(), m.blake3)],
            ModuleSrc::Dir(prefix) => names
                .iter()
                .filter(|n| n.starts_with(prefix.as_str()) && !n.ends_with('/'))
                .map(|n| {
                    let rel = &n[prefix.len()..];
                    (
                        n.clone(),
                        format!("{}/{rel}", m.dst.trim_end_matches('/')),
                        m.files.as_ref().and_then(|f| f.get(rel).copied()),
                    )
                })
                .collect(),
        };
        for (entry, dst, pinned) in files {
            let (hash, size) = {
                let mut e = archive
                    .by_name(&entry)
                    .map_err(|e| bad(format!("base {}: {entry:?}: {e}", path.display())))?;
                let size = e.size();
                match pinned {
                    Some(h) => (h, size),
                    None => crate::fsutil::copy_hashed(&mut e, std::io::sink())
                        .map_err(|e| bad(format!("base {}: {entry:?}: {e:?}", path.display())))?,
                }
            };
            by_dst.insert(dst, BaseFile { entry, hash, size });
        }
    }
    Ok(Base { path: path.to_path_buf(), version: manifest.version.to_string(), by_dst, archive })
}

/// The bytes a full package's deflated entry of `path` takes (stored when it does not
/// compress, as `pack` decides).
pub fn full_entry_bytes(path: &Path, size: u64) -> Result<u64> {
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut enc = flate2::write::DeflateEncoder::new(Count(0), flate2::Compression::fast());
    let f =
        File::open(path).map_err(|e| Error::io(ErrorCode::ValidationError, "open", path, &e))?;
    crate::fsutil::copy_hashed(f, &mut enc)
        .map_err(|e| bad(format!("{}: {e:?}", path.display())))?;
    let n = enc.finish().map_err(|e| bad(format!("{}: {e}", path.display())))?.0;
    Ok(n.min(size))
}

/// What a delta package against `bases` ships for each of `files` (same order), and the
/// base versions.
pub fn plan(files: &[NewFile], bases: &[PathBuf]) -> Result<(Vec<Shipped>, Vec<String>)> {
    let mut bases: Vec<Base> = bases.iter().map(|b| open_base(b)).collect::<Result<_>>()?;
    let versions = bases.iter().map(|b| b.version.clone()).collect();
    let scratch = scratch_dir()?;
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        out.push(ship_one(f, &mut bases, &scratch.0)?);
    }
    Ok((out, versions))
}

fn ship_one(f: &NewFile, bases: &mut [Base], scratch: &Path) -> Result<Shipped> {
    // The distinct contents the bases hold at this destination; a base without it means
    // the file is new for that base's devices.
    let mut contents: BTreeMap<Hash, usize> = BTreeMap::new();
    for (i, b) in bases.iter().enumerate() {
        match b.by_dst.get(&f.dst) {
            Some(bf) => {
                contents.entry(bf.hash).or_insert(i);
            }
            None => return Ok(Shipped::Whole),
        }
    }
    contents.remove(&f.hash);
    // A patch is shipped whenever it is smaller than the full entry: applying one costs
    // about what inflating the entry does (bench/delta.sh).
    let give_up_at = full_entry_bytes(&f.path, f.size)?;
    let target = File::open(&f.path)
        .map_err(|e| Error::io(ErrorCode::ValidationError, "open", &f.path, &e))?;
    let mut patches = Vec::new();
    for (hash, i) in contents {
        // `hash` names the base in the manifest; the patch itself holds none (delta.rs).
        let base = &mut bases[i];
        let bf = &base.by_dst[&f.dst];
        let (entry, size) = (bf.entry.clone(), bf.size);
        let tmp = scratch.join("base");
        {
            let mut e = base
                .archive
                .by_name(&entry)
                .map_err(|e| bad(format!("base {}: {entry:?}: {e}", base.path.display())))?;
            let mut w = File::create(&tmp)
                .map_err(|e| Error::io(ErrorCode::InternalError, "create", &tmp, &e))?;
            std::io::copy(&mut e, &mut w)
                .map_err(|e| bad(format!("base {}: {entry:?}: {e}", base.path.display())))?;
        }
        let base_file =
            File::open(&tmp).map_err(|e| Error::io(ErrorCode::InternalError, "open", &tmp, &e))?;
        match delta::make_patch(&base_file, size, &target, f.size, give_up_at)
            .map_err(|e| bad(format!("{}: {e}", f.path.display())))?
        {
            Some(p) => patches.push((hash, p)),
            None => return Ok(Shipped::Whole),
        }
    }
    Ok(Shipped::Delta { patches })
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir() -> Result<Scratch> {
    let dir = std::env::temp_dir().join(format!(
        "tope-pack-{}-{}",
        std::process::id(),
        crate::clock::now_unix_ms()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(ErrorCode::InternalError, "create", &dir, &e))?;
    Ok(Scratch(dir))
}
