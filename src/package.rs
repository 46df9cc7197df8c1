//! Opening a package: the ZIP container and the manifest, validated completely before
//! anything on disk is touched (SPEC §2). Never `ZipArchive::extract`: entries are read one
//! at a time, by name, with their declared size enforced.

use crate::config::Config;
use crate::engine::Hash;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::limits::{MANIFEST_BYTES_MAX, RATIO_EXEMPT_BYTES, TARGETS_MAX, ZIP_ENTRIES_MAX};
use crate::manifest::{Manifest, ModuleSrc, check_relative};
use crate::paths::AllowedRoots;
use crate::posreader::PosReader;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zip::ZipArchive;

/// The archive type every reader of a package uses: positional reads on the one descriptor
/// that was validated.
pub type Archive = ZipArchive<PosReader>;

pub const MANIFEST_NAME: &str = "manifest.json";

/// One file the package deploys.
#[derive(Debug, Clone)]
pub struct DeployFile {
    /// Index into `Manifest::modules`.
    pub module: u32,
    pub entry: String,
    /// Resolved, checked destination.
    pub dst: PathBuf,
    /// Declared uncompressed size; reading enforces it.
    pub size: u64,
    pub expected: Option<Hash>,
    /// Permission bits from the ZIP entry, if it carries Unix attributes (for a file a delta
    /// package builds on the device: the mode its manifest records).
    pub zip_mode: Option<u32>,
    pub content: Content,
}

/// Where a deployed file's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The ZIP entry `DeployFile::entry`, whole.
    Entry,
    /// Built on the device (a delta package): content found by the file's own hash, or one of
    /// these patches (with its entry's size) applied to content found by its base hash.
    Delta { patches: Vec<(crate::manifest::Patch, u64)> },
}

pub struct Package {
    pub path: PathBuf,
    pub size: u64,
    /// The identity of a package whose manifest pins every deployed file by hash.
    pinned: Option<Hash>,
    /// The blake3 of the whole file: the identity of any other package. Computed on a
    /// thread of its own, only when needed.
    blake3: PendingHash,
    /// The validated descriptor (never reopened by path, which could find another file).
    file: Arc<File>,
    pub manifest: Manifest,
    pub files: Vec<DeployFile>,
    archive: Archive,
}

/// The package hash, computed on a thread of its own.
enum PendingHash {
    NotStarted,
    Running(std::thread::JoinHandle<std::io::Result<(Hash, u64)>>),
    Done(Hash),
    Failed,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidPackage, msg)
}

struct EntryInfo {
    index: usize,
    size: u64,
    zip_mode: Option<u32>,
}

impl Package {
    pub fn open(path: &Path, cfg: &Config, roots: &AllowedRoots) -> Result<Package> {
        let file = File::open(path).map_err(|e| {
            Error::new(ErrorCode::ValidationError, format!("package {}: {e}", path.display()))
        })?;
        // Checked on the descriptor that is then read: the path could be replaced meanwhile.
        let meta = file
            .metadata()
            .map_err(|e| Error::io(ErrorCode::InvalidPackage, "fstat package", path, &e))?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorCode::ValidationError,
                format!("package {} is not a regular file", path.display()),
            ));
        }
        if meta.len() > cfg.max_package_bytes {
            return Err(invalid(format!(
                "package is {} bytes, more than max_package_bytes = {}",
                meta.len(),
                cfg.max_package_bytes
            )));
        }
        let file = Arc::new(file);
        let (archive, manifest, files, manifest_bytes) = validate(&file, cfg, roots)?;
        let pinned = pinned_identity(&manifest_bytes, &files);
        let mut pkg = Package {
            path: absolute_path(path),
            size: meta.len(),
            pinned,
            blake3: PendingHash::NotStarted,
            file,
            manifest,
            files,
            archive,
        };
        if pkg.pinned.is_none() {
            // Without pinned hashes the identity is the file's hash: computed on another core
            // while the caller observes the old files.
            pkg.start_file_hash();
        }
        Ok(pkg)
    }

    fn start_file_hash(&mut self) {
        if let PendingHash::NotStarted = self.blake3 {
            let file = self.file.clone();
            self.blake3 = PendingHash::Running(std::thread::spawn(move || hash_whole_file(&file)));
        }
    }

    /// What the journal remembers this package by (the no-loop rule, trials, recovery).
    /// A package whose manifest pins every deployed file by blake3 is identified by the
    /// manifest and the deployed entries (`pinned_identity`): its deployed bytes are fixed by
    /// them, since staging checks every byte against the pinned hashes, and no read of the
    /// package is needed. Any other package is identified by the blake3 of the whole file.
    pub fn identity(&mut self) -> Result<Hash> {
        match self.pinned {
            Some(h) => Ok(h),
            None => self.blake3(),
        }
    }

    /// Whether this is the package a journaled plan names by `recorded`: its identity, or
    /// (for a plan journaled by a build that named every package by its file hash) its
    /// file hash.
    pub fn is(&mut self, recorded: &Hash) -> Result<bool> {
        if self.identity()? == *recorded {
            return Ok(true);
        }
        Ok(self.pinned.is_some() && self.blake3()? == *recorded)
    }

    /// The blake3 of the package file (waits for the hashing thread the first time).
    pub fn blake3(&mut self) -> Result<Hash> {
        self.start_file_hash();
        if let PendingHash::Running(_) = self.blake3 {
            let PendingHash::Running(h) = std::mem::replace(&mut self.blake3, PendingHash::Failed)
            else {
                unreachable!()
            };
            let (hash, size) =
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)).map_err(|e| {
                    Error::io(ErrorCode::InvalidPackage, "read package", &self.path, &e)
                })?;
            if size != self.size {
                return Err(invalid(format!(
                    "package changed size while being read ({} then {size} bytes)",
                    self.size
                )));
            }
            self.blake3 = PendingHash::Done(hash);
        }
        match self.blake3 {
            PendingHash::Done(h) => Ok(h),
            PendingHash::NotStarted | PendingHash::Running(_) | PendingHash::Failed => {
                Err(invalid("package hash unavailable after a read error"))
            }
        }
    }

    /// For a stored (uncompressed) entry of `size` bytes: the package descriptor and the
    /// offset of the entry's bytes in it, so that pieces of it can be read in parallel.
    /// `None` for a compressed entry (it can only be read from its start).
    pub fn stored_entry(
        &self,
        archive: &mut Archive,
        name: &str,
        size: u64,
    ) -> Result<Option<(Arc<File>, u64)>> {
        let f = archive.by_name(name).map_err(|e| invalid(format!("entry {name:?}: {e}")))?;
        if f.compression() != zip::CompressionMethod::Stored
            || f.compressed_size() != size
            || f.size() != size
        {
            return Ok(None);
        }
        Ok(f.data_start().map(|start| (self.file.clone(), start)))
    }

    /// Another reader of the same archive, for a worker thread (shares the central directory
    /// and the descriptor, not the position).
    pub fn archive(&self) -> Archive {
        self.archive.clone()
    }
}

/// The package's path as the journal records it: absolute, so that `recover` (at boot, from
/// `/`) finds the package a relative `install` named. Not resolved through symlinks (that is
/// the path the operator gave).
fn absolute_path(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The blake3 of the whole package file, by pieces on every core (blake3 subtrees, the same
/// hash as one sequential pass: `treehash`): a legacy package's identity is on the critical
/// path of its install (planning waits for it), so it gets both cores.
fn hash_whole_file(file: &File) -> std::io::Result<(Hash, u64)> {
    let len = file.metadata()?.len();
    if len <= crate::treehash::PIECE_BYTES {
        return fsutil::hash_file_at(file);
    }
    let hashes = crate::treehash::hash_split(&[Some(len)], |_, off, n| {
        crate::treehash::hash_piece(file, len, off, n)
            .map_err(|e| Error::new(ErrorCode::InvalidPackage, e.to_string()))
    })
    .map_err(|e| std::io::Error::other(e.message))?;
    let hash = hashes
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| std::io::Error::other("no hash for the package"))?;
    Ok((hash, len))
}

/// A reader over one entry that fails unless exactly the declared size comes out (the zip
/// crate itself refuses more than declared, and checks the CRC at the end).
pub fn entry_reader<'a>(archive: &'a mut Archive, name: &str, size: u64) -> Result<impl Read + 'a> {
    let f = archive.by_name(name).map_err(|e| invalid(format!("entry {name:?}: {e}")))?;
    Ok(ExactReader { inner: f, remaining: size, name: name.to_string() })
}

/// The identity of a package whose manifest pins every deployed file, `None` otherwise: a
/// blake3 key derivation (its own domain, never equal to a file hash) over the exact manifest
/// bytes and, per deployed file in order, the entry name, size, ZIP mode and pinned hash.
/// Two packages with the same identity deploy the same bytes to the same paths with the same
/// modes, or one of them fails staging with `HASH_MISMATCH` before any target is touched.
fn pinned_identity(manifest_bytes: &[u8], files: &[DeployFile]) -> Option<Hash> {
    let mut h = blake3::Hasher::new_derive_key(
        "tope-updater package identity v1 (manifest and deployed entries)",
    );
    h.update(&(manifest_bytes.len() as u64).to_le_bytes());
    h.update(manifest_bytes);
    h.update(&(files.len() as u64).to_le_bytes());
    for f in files {
        let pinned = f.expected?;
        h.update(&(f.entry.len() as u64).to_le_bytes());
        h.update(f.entry.as_bytes());
        h.update(&f.size.to_le_bytes());
        h.update(&f.zip_mode.map_or(u64::MAX, u64::from).to_le_bytes());
        h.update(&pinned.0);
        // Only files a delta package builds add anything: every other identity stays what
        // earlier builds journaled.
        if let Content::Delta { patches } = &f.content {
            h.update(b"delta");
            h.update(&(patches.len() as u64).to_le_bytes());
            for (p, size) in patches {
                h.update(&p.base.0);
                h.update(&(p.entry.len() as u64).to_le_bytes());
                h.update(p.entry.as_bytes());
                h.update(&size.to_le_bytes());
            }
        }
    }
    Some(h.finalize().into())
}

/// Everything but the hash: container, entries, manifest (parsed and its exact bytes),
/// destinations.
fn validate(
    file: &Arc<File>,
    cfg: &Config,
    roots: &AllowedRoots,
) -> Result<(Archive, Manifest, Vec<DeployFile>, Vec<u8>)> {
    let mut archive = ZipArchive::new(PosReader::new(file.clone()))
        .map_err(|e| invalid(format!("not a readable ZIP archive: {e}")))?;
    if archive.len() > ZIP_ENTRIES_MAX {
        return Err(invalid(format!("{} entries, more than {ZIP_ENTRIES_MAX}", archive.len())));
    }
    // Duplicate names, overlapping entries (quoted zip bombs), local headers that disagree
    // with the central directory or are missing from it.
    archive.validate_header_consistency().map_err(|e| invalid(e.to_string()))?;
    let entries = scan_entries(&mut archive, cfg)?;
    let manifest_bytes = read_manifest_bytes(&mut archive, &entries)?;
    // Authenticate the manifest before parsing it.
    let signature = read_signature(&mut archive, &entries)?;
    let signed = crate::signing::check(cfg, &manifest_bytes, signature.as_deref())?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    let files = resolve_files(&manifest, &entries, roots)?;
    if manifest.delta.is_some() {
        // What a delta package builds on the device counts against the unpacked limit as if
        // it were shipped whole.
        let built: u64 = files
            .iter()
            .filter(|f| matches!(f.content, Content::Delta { .. }))
            .map(|f| f.size)
            .fold(0, u64::saturating_add);
        let shipped: u64 = entries.values().map(|e| e.size).sum();
        if built.saturating_add(shipped) > cfg.max_unpacked_bytes {
            return Err(invalid(format!(
                "the files a delta package builds exceed max_unpacked_bytes = {}",
                cfg.max_unpacked_bytes
            )));
        }
    }
    if signed && let Some(f) = files.iter().find(|f| f.expected.is_none()) {
        // Without a hash the signature would not cover that file's bytes.
        return Err(Error::new(
            ErrorCode::SignatureInvalid,
            format!(
                "the signed manifest has no blake3 for {} (entry {:?}): every deployed byte must \
                be signed",
                f.dst.display(),
                f.entry
            ),
        ));
    }
    Ok((archive, manifest, files, manifest_bytes))
}

/// `manifest.json.sig`, if the package has one (a signature is 64 bytes; more is refused
/// before reading).
fn read_signature(
    archive: &mut Archive,
    entries: &BTreeMap<String, EntryInfo>,
) -> Result<Option<Vec<u8>>> {
    let Some(info) = entries.get(crate::signing::SIGNATURE_NAME) else { return Ok(None) };
    if info.size > 1024 {
        return Err(Error::new(
            ErrorCode::SignatureInvalid,
            format!("{} is {} bytes", crate::signing::SIGNATURE_NAME, info.size),
        ));
    }
    let f = archive
        .by_index(info.index)
        .map_err(|e| invalid(format!("{}: {e}", crate::signing::SIGNATURE_NAME)))?;
    let mut bytes = Vec::with_capacity(info.size as usize);
    ExactReader { inner: f, remaining: info.size, name: crate::signing::SIGNATURE_NAME.into() }
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(format!("{}: {e}", crate::signing::SIGNATURE_NAME)))?;
    Ok(Some(bytes))
}

/// Checks every entry's name, type and size; returns the files by name.
fn scan_entries(archive: &mut Archive, cfg: &Config) -> Result<BTreeMap<String, EntryInfo>> {
    let mut out = BTreeMap::new();
    let mut total: u64 = 0;
    for index in 0..archive.len() {
        let e = archive.by_index_data(index).map_err(|e| invalid(format!("entry {index}: {e}")))?;
        let name = e
            .name()
            .map_err(|e| invalid(format!("entry {index}: name is not valid UTF-8: {e}")))?
            .to_string();
        if e.enclosed_name().is_none() {
            return Err(invalid(format!(
                "entry {name:?} escapes the archive (absolute, '..' or NUL)"
            )));
        }
        check_relative("entry", &name, true).map_err(|e| invalid(e.message))?;
        if e.is_symlink() {
            return Err(invalid(format!("entry {name:?} is a symlink")));
        }
        if e.encrypted() {
            return Err(invalid(format!("entry {name:?} is encrypted")));
        }
        if e.is_dir() {
            continue;
        }
        if !matches!(
            e.compression(),
            zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated
        ) {
            return Err(invalid(format!(
                "entry {name:?} uses {:?}; only stored and deflate are supported",
                e.compression()
            )));
        }
        let size = e.size();
        total = total.checked_add(size).ok_or_else(|| invalid("declared sizes overflow"))?;
        if total > cfg.max_unpacked_bytes {
            return Err(invalid(format!(
                "unpacked size exceeds max_unpacked_bytes = {}",
                cfg.max_unpacked_bytes
            )));
        }
        if size > RATIO_EXEMPT_BYTES
            && size / e.compressed_size().max(1) > cfg.max_compression_ratio
        {
            return Err(invalid(format!(
                "entry {name:?} expands {} bytes to {size} (ratio above \
                max_compression_ratio = {})",
                e.compressed_size(),
                cfg.max_compression_ratio
            )));
        }
        let zip_mode = e.unix_mode().map(|m| m & 0o7777).filter(|m| *m != 0);
        if out.insert(name.clone(), EntryInfo { index, size, zip_mode }).is_some() {
            return Err(invalid(format!("entry {name:?} appears twice")));
        }
    }
    Ok(out)
}

fn read_manifest_bytes(
    archive: &mut Archive,
    entries: &BTreeMap<String, EntryInfo>,
) -> Result<Vec<u8>> {
    let info = entries
        .get(MANIFEST_NAME)
        .ok_or_else(|| Error::new(ErrorCode::InvalidManifest, "package has no manifest.json"))?;
    if info.size > MANIFEST_BYTES_MAX {
        return Err(Error::new(
            ErrorCode::InvalidManifest,
            format!("manifest.json is larger than {MANIFEST_BYTES_MAX} bytes"),
        ));
    }
    let f = archive.by_index(info.index).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let mut bytes = Vec::with_capacity(info.size as usize);
    ExactReader { inner: f, remaining: info.size, name: MANIFEST_NAME.into() }
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(format!("manifest.json: {e}")))?;
    Ok(bytes)
}

/// Expands modules into deploy files, checking every destination.
fn resolve_files(
    manifest: &Manifest,
    entries: &BTreeMap<String, EntryInfo>,
    roots: &AllowedRoots,
) -> Result<Vec<DeployFile>> {
    let mut files = Vec::new();
    // Files of a directory module share their parents: resolve each directory once.
    let mut cache = crate::paths::ResolveCache::default();
    let delta = manifest.delta.as_ref();
    let mut used = BTreeSet::new();
    for (mi, m) in manifest.modules.iter().enumerate() {
        let module = mi as u32;
        match &m.src {
            ModuleSrc::File(src) => {
                let (size, zip_mode, content) = content_of(src, entries, delta, &mut used)?
                    .ok_or_else(|| {
                        Error::new(
                            ErrorCode::InvalidPackage,
                            format!(
                                "module {:?}: src {src:?} is not a file in the package",
                                m.name
                            ),
                        )
                    })?;
                let dst = roots.check(&m.dst)?;
                files.push(DeployFile {
                    module,
                    entry: src.clone(),
                    dst,
                    size,
                    expected: m.blake3,
                    zip_mode,
                    content,
                });
            }
            ModuleSrc::Dir(prefix) if delta.is_some() => {
                let dir = DirModule { module, m, prefix, entries };
                files.extend(dir.delta_files(delta, &mut used, roots, &mut cache)?);
            }
            ModuleSrc::Dir(prefix) => {
                files.extend(DirModule { module, m, prefix, entries }.files(roots, &mut cache)?);
            }
        }
        if files.len() > TARGETS_MAX {
            return Err(invalid(format!("more than {TARGETS_MAX} files")));
        }
    }
    check_resolved(&files, delta, &used)?;
    Ok(files)
}

/// What holds only across all modules: one file per destination; with a delta, every file
/// the delta names is deployed and no patch entry is deployed as a file.
fn check_resolved(
    files: &[DeployFile],
    delta: Option<&crate::manifest::Delta>,
    used: &BTreeSet<&str>,
) -> Result<()> {
    let mut seen_dst = BTreeSet::new();
    if let Some(f) = files.iter().find(|f| !seen_dst.insert(f.dst.clone())) {
        return Err(Error::new(
            ErrorCode::InvalidManifest,
            format!("two files deploy to {}", f.dst.display()),
        ));
    }
    if let Some(d) = delta {
        if let Some(unused) = d.files.keys().find(|k| !used.contains(k.as_str())) {
            return Err(Error::new(
                ErrorCode::InvalidManifest,
                format!("delta.files names {unused:?}, which no module deploys"),
            ));
        }
        // A patch is never deployed as a file.
        let patches: BTreeSet<&str> =
            d.files.values().flat_map(|f| f.patches.iter().map(|p| p.entry.as_str())).collect();
        if let Some(f) =
            files.iter().find(|f| f.content == Content::Entry && patches.contains(f.entry.as_str()))
        {
            return Err(Error::new(
                ErrorCode::InvalidManifest,
                format!("entry {:?} is both a patch and a deployed file", f.entry),
            ));
        }
    }
    Ok(())
}

/// A directory module (`src` ending in `/`) being expanded into its files.
struct DirModule<'a> {
    module: u32,
    m: &'a crate::manifest::Module,
    prefix: &'a str,
    entries: &'a BTreeMap<String, EntryInfo>,
}

impl<'a> DirModule<'a> {
    fn error(&self, code: ErrorCode, what: String) -> Error {
        Error::new(code, format!("module {:?}: {what}", self.m.name))
    }

    /// The archive's entries under the prefix.
    fn under_prefix(&self) -> impl Iterator<Item = (&'a String, &'a EntryInfo)> + '_ {
        self.entries
            .range::<String, _>(self.prefix.to_string()..)
            .take_while(|(n, _)| n.starts_with(self.prefix))
    }

    /// A full package's directory module: every entry under the prefix, each checked against
    /// `files` when the manifest gives it (and `files` names nothing else).
    fn files(
        &self,
        roots: &AllowedRoots,
        cache: &mut crate::paths::ResolveCache,
    ) -> Result<Vec<DeployFile>> {
        let dst_dir = crate::paths::check_absolute(&self.m.dst)?;
        let mut files = Vec::new();
        for (name, info) in self.under_prefix() {
            let rel = &name[self.prefix.len()..];
            let dst = roots.check_cached(&format!("{}/{rel}", dst_dir.display()), cache)?;
            let expected = match &self.m.files {
                Some(map) => Some(*map.get(rel).ok_or_else(|| {
                    self.error(ErrorCode::InvalidManifest, format!("files has no hash for {rel:?}"))
                })?),
                None => None,
            };
            let (size, zip_mode) = (info.size, info.zip_mode);
            files.push(DeployFile {
                module: self.module,
                entry: name.clone(),
                dst,
                size,
                expected,
                zip_mode,
                content: Content::Entry,
            });
        }
        if files.is_empty() {
            return Err(self.error(
                ErrorCode::InvalidPackage,
                format!("src {:?} holds no files", self.prefix),
            ));
        }
        if let Some(map) = &self.m.files
            && let Some(extra) =
                map.keys().find(|rel| !self.entries.contains_key(&format!("{}{rel}", self.prefix)))
        {
            return Err(self.error(
                ErrorCode::InvalidManifest,
                format!("files names {extra:?}, which is not in the package"),
            ));
        }
        Ok(files)
    }

    /// A delta package's directory module: it lists every file in `files` (some are not in
    /// the archive), and the archive holds nothing else under the prefix.
    fn delta_files(
        &self,
        delta: Option<&'a crate::manifest::Delta>,
        used: &mut BTreeSet<&'a str>,
        roots: &AllowedRoots,
        cache: &mut crate::paths::ResolveCache,
    ) -> Result<Vec<DeployFile>> {
        let dst_dir = crate::paths::check_absolute(&self.m.dst)?;
        let map = self
            .m
            .files
            .as_ref()
            .ok_or_else(|| self.error(ErrorCode::InvalidManifest, "no files".into()))?;
        if let Some((stray, _)) =
            self.under_prefix().find(|(n, _)| !map.contains_key(&n[self.prefix.len()..]))
        {
            return Err(self.error(
                ErrorCode::InvalidManifest,
                format!("entry {stray:?} is not in its files"),
            ));
        }
        let mut files = Vec::new();
        for (rel, hash) in map {
            let name = format!("{}{rel}", self.prefix);
            let (size, zip_mode, content) = content_of(&name, self.entries, delta, used)?
                .ok_or_else(|| {
                    self.error(
                        ErrorCode::InvalidManifest,
                        format!("{rel:?} is neither in the package nor in delta.files"),
                    )
                })?;
            let dst = roots.check_cached(&format!("{}/{rel}", dst_dir.display()), cache)?;
            files.push(DeployFile {
                module: self.module,
                entry: name,
                dst,
                size,
                expected: Some(*hash),
                zip_mode,
                content,
            });
        }
        if map.is_empty() {
            return Err(self.error(
                ErrorCode::InvalidPackage,
                format!("src {:?} holds no files", self.prefix),
            ));
        }
        Ok(files)
    }
}

/// Where the file a full package would hold as entry `name` comes from: the entry itself,
/// or (in a delta package) the device plus a patch. `None`: from nowhere.
fn content_of<'a>(
    name: &str,
    entries: &BTreeMap<String, EntryInfo>,
    delta: Option<&'a crate::manifest::Delta>,
    used: &mut BTreeSet<&'a str>,
) -> Result<Option<(u64, Option<u32>, Content)>> {
    match (entries.get(name), delta.and_then(|d| d.files.get_key_value(name))) {
        (Some(_), Some(_)) => Err(Error::new(
            ErrorCode::InvalidManifest,
            format!("{name:?} is both an entry of the package and in delta.files"),
        )),
        (Some(info), None) => Ok(Some((info.size, info.zip_mode, Content::Entry))),
        (None, Some((key, f))) => {
            used.insert(key.as_str());
            let mut patches = Vec::with_capacity(f.patches.len());
            for p in &f.patches {
                let info = entries.get(&p.entry).ok_or_else(|| {
                    invalid(format!("the patch {:?} for {name:?} is not in the package", p.entry))
                })?;
                patches.push((p.clone(), info.size));
            }
            Ok(Some((f.size, f.mode, Content::Delta { patches })))
        }
        (None, None) => Ok(None),
    }
}

/// Yields exactly `remaining` bytes or fails: a short entry is an error, not a short file.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
    name: String,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            // Anything left means the entry is longer than declared.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("entry {:?} is longer than declared", self.name),
                )),
            };
        }
        let want = buf.len().min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("entry {:?} is shorter than declared", self.name),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A package deploying `files` (name → content) to `root`, every file pinned when `pin`,
    /// written stored or deflated.
    fn package(
        dir: &Path,
        name: &str,
        root: &Path,
        files: &[(&str, &[u8])],
        pin: bool,
        method: zip::CompressionMethod,
    ) -> PathBuf {
        let mods: Vec<serde_json::Value> = files
            .iter()
            .map(|(n, c)| {
                let mut m =
                    serde_json::json!({"name": n, "src": n, "dst": root.join(n).to_str().unwrap()});
                if pin {
                    m["blake3"] = Hash::of(c).to_hex().into();
                }
                m
            })
            .collect();
        let manifest = serde_json::json!({"version": "1.0.0", "modules": mods}).to_string();
        let path = dir.join(name);
        let mut z = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .unix_permissions(0o644);
        z.start_file(MANIFEST_NAME, opts).unwrap();
        z.write_all(manifest.as_bytes()).unwrap();
        for (n, c) in files {
            z.start_file(*n, opts).unwrap();
            z.write_all(c).unwrap();
        }
        z.finish().unwrap();
        path
    }

    /// A temporary directory with the allowed root `root` inside it.
    fn device() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        (d, root)
    }

    fn open(path: &Path, root: &Path) -> Package {
        Package::open(path, &Config::default(), &AllowedRoots::new(&[root.to_path_buf()])).unwrap()
    }

    const FILES: &[(&str, &[u8])] = &[("a", b"alpha\n"), ("b", b"beta beta beta beta\n")];

    #[test]
    fn a_pinned_package_is_identified_by_its_manifest_and_entries_whatever_its_zip_bytes() {
        let (d, root) = device();
        let stored = package(d.path(), "s.zip", &root, FILES, true, zip::CompressionMethod::Stored);
        let deflated =
            package(d.path(), "d.zip", &root, FILES, true, zip::CompressionMethod::Deflated);
        assert_ne!(std::fs::read(&stored).unwrap(), std::fs::read(&deflated).unwrap());
        let (mut s, mut z) = (open(&stored, &root), open(&deflated, &root));
        let id = s.identity().unwrap();
        assert_eq!(id, z.identity().unwrap(), "same manifest and entries: same identity");
        assert_ne!(id, s.blake3().unwrap(), "the identity is not the file hash");
        assert_eq!(s.blake3().unwrap(), Hash::of(&std::fs::read(&stored).unwrap()));
        // Another manifest (another pinned content) is another package.
        let other = package(
            d.path(),
            "o.zip",
            &root,
            &[("a", b"alpha\n"), ("b", b"BETA\n")],
            true,
            zip::CompressionMethod::Stored,
        );
        assert_ne!(open(&other, &root).identity().unwrap(), id);
    }

    #[test]
    fn an_unpinned_package_is_identified_by_the_hash_of_its_bytes() {
        let (d, root) = device();
        let path =
            package(d.path(), "u.zip", &root, FILES, false, zip::CompressionMethod::Deflated);
        assert_eq!(
            open(&path, &root).identity().unwrap(),
            Hash::of(&std::fs::read(&path).unwrap())
        );
    }

    #[test]
    fn a_large_unpinned_package_is_hashed_by_pieces_to_the_hash_of_its_bytes() {
        let (d, root) = device();
        let big: Vec<u8> = (0..9 * 1024 * 1024 + 12345u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let path = package(
            d.path(),
            "big.zip",
            &root,
            &[("a", &big)],
            false,
            zip::CompressionMethod::Stored,
        );
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() as u64 > 2 * crate::treehash::PIECE_BYTES, "split into pieces");
        assert_eq!(open(&path, &root).identity().unwrap(), Hash::of(&bytes));
    }

    #[test]
    fn a_plan_naming_a_pinned_package_by_its_file_hash_still_finds_it() {
        // Plans journaled before package identities named every package by its file hash;
        // recovery must still accept the same package, and nothing else.
        let (d, root) = device();
        let path = package(d.path(), "p.zip", &root, FILES, true, zip::CompressionMethod::Stored);
        let mut p = open(&path, &root);
        let id = p.identity().unwrap();
        assert!(p.is(&id).unwrap());
        assert!(p.is(&Hash::of(&std::fs::read(&path).unwrap())).unwrap());
        assert!(!p.is(&Hash::of(b"another package")).unwrap());
    }
}
