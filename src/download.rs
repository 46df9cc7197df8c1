//! Resumable package download (SPEC §5, `POST /api/v1.0/download`).
//!
//! One download at a time, streamed with constant memory to `<state_dir>/downloads/<name>`
//! and described by one journal record (`downloads.current`, journal-format.md §5.7):
//!
//! - **Write-ahead offset.** The record's `offset` counts bytes made durable by `fdatasync`
//!   *before* the offset was journaled; nothing past it is trusted. A resume (after a dropped
//!   connection, a SIGTERM or a power cut) truncates the file to the journaled offset, hashes
//!   that prefix into the expected hash's state (MD5, SHA-1 or SHA-256), and asks for
//!   `Range: bytes=OFFSET-`. The offset is journaled
//!   at least every 5 % of the package, before every retry, and on cancellation.
//! - **Range answers.** A `206` must carry `Content-Range: bytes OFFSET-(size-1)/size` (or
//!   `/*`), else the attempt fails and nothing is appended. A `200` to a Range request means
//!   the server ignored it: the download starts over from byte 0 (offset 0 journaled first).
//!   A `416` starts over too (the server's resource is not what the offset assumed).
//! - **Retries.** A failed attempt (connection error, timeout, short body, 408, 429, 5xx, a
//!   bad `Content-Range`) is retried after 1 s, 2 s, 4 s, ... (`download.retries` retries
//!   after the first attempt), then `DOWNLOAD_FAILED`. An attempt that got the durable
//!   offset past its previous high-water mark resets the count, so a flaky link that keeps
//!   making progress finishes a large package. Other HTTP statuses (404, 403, ...) fail at
//!   once: waiting does not fix them.
//! - **Disk.** A statvfs preflight needs the remaining bytes (rounded up to blocks) plus
//!   `FREE_SPACE_RESERVE_BYTES` free, else `DISK_FULL`; `ENOSPC`/`EDQUOT` while writing is
//!   `DISK_FULL` too.
//! - **Verification.** The [`ExpectedHash`] (the legacy request's MD5, or the strongest hash a
//!   DDI deployment gives: SHA-256, SHA-1 or MD5) is computed while writing; a mismatch deletes
//!   the file, clears the record and is `MD5_MISMATCH` (MD5) or `HASH_MISMATCH` (SHA-1,
//!   SHA-256). A match journals `verified_at_unix_ms` (the start of the trust window checked
//!   by [`check_installable`]).
//! - **Requests.** A request identical to the journaled one (same URL, name, size, expected
//!   hash and version) resumes it; an already verified identical download within the trust
//!   window is returned as is, without network. Any other request replaces the record and
//!   deletes the old file (also a verified one past its trust window: "please re-download").
//!
//! Two entry points: [`run`] for the legacy `POST /download` body ([`DownloadRequest`], MD5),
//! and [`fetch`] for any [`DownloadSpec`] (the DDI client's artifacts). `run` is `fetch` of the
//! request's spec after the legacy validation.
//!
//! Errors and the legacy API's `code` (the daemon maps them; the HTTP status is always 200):
//!
//! - `VALIDATION_ERROR`, 400: [`validate`] (`POST /download`), [`check_installable`]
//!   (`POST /update`: bad version, or not the downloaded one).
//! - `DOWNLOAD_INCOMPLETE`, 409: [`check_installable`]; also [`run`] interrupted by `cancel`
//!   (resumable, not a failure).
//! - `MD5_NOT_VERIFIED`, 409: [`check_installable`].
//! - `PACKAGE_EXPIRED`, 410: [`check_installable`].
//! - `DOWNLOAD_FAILED`, `MD5_MISMATCH`, `DISK_FULL`, `INTERNAL_ERROR`, `JOURNAL_CORRUPT`, 500:
//!   [`run`] (reported through `/progress` with stage `failed`).
//! - `HASH_MISMATCH`, 500: [`fetch`] of a SHA-1 or SHA-256 [`ExpectedHash`] (never from the
//!   legacy [`run`]).
//! - `PACKAGE_SIZE_MISMATCH`, 500: [`run`]: a `Content-Length` (200), `Content-Range` total
//!   (206) or body that is not `package_size`; at once, no retry, file and record removed.

use crate::config::Config;
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::journal::Journal;
use crate::limits::{FREE_SPACE_RESERVE_BYTES, IO_BUFFER_BYTES, PATH_COMPONENT_BYTES_MAX};
use crate::limits::{REDIRECTS_MAX, URL_BYTES_MAX};
use crate::version::Version;
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Directory of downloaded packages, inside `state_dir`.
pub const DOWNLOADS_DIR: &str = "downloads";
/// The offset is journaled at least every 1/20 of the package (5 %).
const CHECKPOINTS_PER_PACKAGE: u64 = 20;
/// Backoff doubles per consecutive failure up to base × 2^6.
const BACKOFF_DOUBLINGS_MAX: u32 = 6;
/// How often a backoff sleep looks at `cancel`.
const CANCEL_POLL: Duration = Duration::from_millis(50);
const MS_PER_HOUR: u64 = 3_600_000;

pub use crate::journal::downloads::{DownloadRecord, DownloadRequest, DownloadSpec, ExpectedHash};

impl ExpectedHash {
    pub fn md5(hex: &str) -> Result<Self> {
        Self::checked(ExpectedHash::Md5(hex.to_string()))
    }

    pub fn sha1(hex: &str) -> Result<Self> {
        Self::checked(ExpectedHash::Sha1(hex.to_string()))
    }

    pub fn sha256(hex: &str) -> Result<Self> {
        Self::checked(ExpectedHash::Sha256(hex.to_string()))
    }

    fn checked(h: ExpectedHash) -> Result<Self> {
        h.check().map_err(validation)?;
        Ok(h)
    }

    /// The error for a download that hashed to `got`: `MD5_MISMATCH` with the legacy message
    /// for MD5, `HASH_MISMATCH` naming the algorithm otherwise.
    fn mismatch(&self, got: &str) -> Error {
        let expected = self.hex();
        match self {
            ExpectedHash::Md5(_) => {
                Error::new(ErrorCode::Md5Mismatch, format!("expected {expected}, got {got}"))
            }
            _ => Error::new(
                ErrorCode::HashMismatch,
                format!("{} mismatch: expected {expected}, got {got}", self.algorithm()),
            ),
        }
    }
}

fn validation(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::ValidationError, message)
}

fn validate_version(version: &str) -> Result<Version> {
    Version::parse(version)
        .map_err(|_| validation("version must match semantic versioning pattern"))
}

/// Validates a `POST /download` body as the contract says (messages follow its examples):
/// `version` is `MAJOR.MINOR.PATCH`; `package_url` is `https://` (or `http://` with
/// `download.allow_http`), parses, has a host and is at most `URL_BYTES_MAX` bytes;
/// `package_name` is a plain file name (1 to 255 bytes, no `/`, NUL or control character,
/// not `.` or `..`); `1 <= package_size <= max_package_bytes`; `package_md5` is 32
/// lowercase hex digits. Errors are `VALIDATION_ERROR`.
pub fn validate(req: &DownloadRequest, cfg: &Config) -> Result<()> {
    validate_fields(&req.version, &req.package_url, &req.package_name, req.package_size, cfg)?;
    if req.package_md5.len() != 32
        || !req.package_md5.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(validation("package_md5 must be 32-character hexadecimal string"));
    }
    Ok(())
}

/// Validates a [`DownloadSpec`]: its fields as [`validate`] does a request's, then its
/// [`ExpectedHash`] (lower-case hex of the algorithm's length). Errors are `VALIDATION_ERROR`.
pub fn validate_spec(spec: &DownloadSpec, cfg: &Config) -> Result<()> {
    validate_fields(&spec.version, &spec.package_url, &spec.package_name, spec.package_size, cfg)?;
    spec.expected.check().map_err(validation)
}

fn validate_fields(version: &str, url: &str, name: &str, size: u64, cfg: &Config) -> Result<()> {
    validate_version(version)?;
    validate_url(url, cfg.download.allow_http)?;
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > PATH_COMPONENT_BYTES_MAX
        || name.chars().any(|c| c == '/' || c.is_control())
    {
        return Err(validation(format!(
            "package_name must be a plain file name (1 to {PATH_COMPONENT_BYTES_MAX} bytes, no \
            '/', not '.' or '..')"
        )));
    }
    if size == 0 {
        return Err(validation("package_size must be at least 1"));
    }
    if size > cfg.max_package_bytes {
        return Err(validation(format!(
            "package_size {size} exceeds max_package_bytes {}",
            cfg.max_package_bytes
        )));
    }
    Ok(())
}

fn validate_url(url: &str, allow_http: bool) -> Result<()> {
    if url.len() > URL_BYTES_MAX {
        return Err(validation(format!("package_url is longer than {URL_BYTES_MAX} bytes")));
    }
    let scheme_ok = url.starts_with("https://") || (allow_http && url.starts_with("http://"));
    if !scheme_ok {
        return Err(validation(if allow_http {
            "package_url must use HTTP or HTTPS protocol"
        } else {
            "package_url must use HTTPS protocol"
        }));
    }
    let uri: ureq::http::Uri =
        url.parse().map_err(|_| validation("package_url is not a valid URL"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(validation("package_url has no host"));
    }
    Ok(())
}

/// The `POST /update {version}` preconditions (contract FR-001b), as a pure decision: the
/// package path to install, or the refusal. Check order: `version` malformed →
/// `VALIDATION_ERROR` (400); no download → `DOWNLOAD_INCOMPLETE` (409); `version` is not the
/// downloaded package's → `VALIDATION_ERROR` (400); bytes missing → `DOWNLOAD_INCOMPLETE`
/// (409); MD5 not verified → `MD5_NOT_VERIFIED` (409); `now_ms >= verified_at +
/// trust_window_h` → `PACKAGE_EXPIRED` (410). A clock earlier than `verified_at` (set back,
/// or lost without an RTC) cannot vouch for the package's age: `PACKAGE_EXPIRED` too, which a
/// re-download fixes.
pub fn check_installable(
    rec: Option<&DownloadRecord>,
    version: &str,
    trust_window_h: u64,
    now_ms: u64,
) -> Result<PathBuf> {
    let wanted = validate_version(version)?;
    let Some(rec) = rec else {
        return Err(Error::new(
            ErrorCode::DownloadIncomplete,
            "Cannot install, package download not completed",
        ));
    };
    if Version::parse(&rec.request.version).ok() != Some(wanted) {
        return Err(validation(format!(
            "version {version} does not match the downloaded package version {}",
            rec.request.version
        )));
    }
    if !rec.is_complete() {
        return Err(Error::new(
            ErrorCode::DownloadIncomplete,
            format!(
                "Cannot install, package download not completed ({} / {} bytes)",
                rec.offset, rec.request.package_size
            ),
        ));
    }
    let Some(verified_at) = rec.verified_at_unix_ms else {
        return Err(Error::new(
            ErrorCode::Md5NotVerified,
            "Cannot install, MD5 verification in progress",
        ));
    };
    if !within_trust_window(verified_at, now_ms, trust_window_h) {
        return Err(Error::new(
            ErrorCode::PackageExpired,
            format!(
                "Package verified at {} has exceeded {trust_window_h}-hour trust window, please \
                re-download",
                iso8601_utc(verified_at)
            ),
        ));
    }
    Ok(PathBuf::from(&rec.path))
}

/// `verified_at + window > now`, and the clock has not gone back before `verified_at`.
/// A verified package past its trust window (it can never be installed: SPEC §5).
pub fn is_expired(rec: &DownloadRecord, trust_window_h: u64, now_ms: u64) -> bool {
    rec.verified_at_unix_ms.is_some_and(|at| !within_trust_window(at, now_ms, trust_window_h))
}

/// Removes the package file, then its record (a cut in between leaves a record naming a
/// missing file, which the next request starts over and the next start-up clears). The
/// directory is fsynced between the two: without it, a power cut after the record's commit
/// could bring the file back with no record naming it, and nothing would ever remove it.
pub fn discard(journal: &Journal, rec: &DownloadRecord) -> Result<()> {
    let path = Path::new(&rec.path);
    if fsutil::remove_if_present(path).map_err(local)?
        && let Some(dir) = path.parent()
    {
        fsutil::fsync_dir(dir).map_err(local)?;
    }
    journal.clear_download()
}

fn within_trust_window(verified_at_ms: u64, now_ms: u64, trust_window_h: u64) -> bool {
    now_ms >= verified_at_ms && now_ms - verified_at_ms < trust_window_h.saturating_mul(MS_PER_HOUR)
}

/// `2025-11-26T10:30:00Z` for milliseconds since the epoch (UTC, proleptic Gregorian).
fn iso8601_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Knobs that tests shrink; production uses `Tuning::default()`.
#[derive(Debug, Clone)]
struct Tuning {
    /// First backoff; then ×2 per consecutive failure (1 s, 2 s, 4 s, ...).
    backoff_base: Duration,
    connect_timeout: Duration,
    /// Per socket read, and for the response headers. Also bounds how long `cancel` can go
    /// unnoticed while a server stalls.
    read_timeout: Duration,
    /// Honour `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY` from the environment.
    env_proxy: bool,
    /// An `Authorization` value sent with every GET: the DDI server's token, for an artifact
    /// on the server's own origin (the caller decides; ureq drops it on a redirect). Never
    /// journaled or logged.
    authorization: Option<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff_base: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(20),
            env_proxy: true,
            authorization: None,
        }
    }
}

impl Tuning {
    /// The wait before retry number `failures` (1-based): base × 2^(failures-1), capped.
    fn backoff(&self, failures: u32) -> Duration {
        self.backoff_base.saturating_mul(1 << failures.saturating_sub(1).min(BACKOFF_DOUBLINGS_MAX))
    }
}

/// Runs (or resumes) the download described by `req` to a verified file and returns its
/// journaled record (see the module documentation for the rules). `progress(done, total)` is
/// called as bytes arrive (done includes a resumed prefix); it must be cheap. `cancel` is
/// checked between reads and during backoff: when set, the durable offset is journaled and
/// `DOWNLOAD_INCOMPLETE` returned; the same request later resumes from there.
pub fn run(
    journal: &Journal,
    cfg: &Config,
    req: &DownloadRequest,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<DownloadRecord> {
    run_tuned(journal, cfg, req, progress, cancel, &Tuning::default())
}

/// Runs (or resumes) the download of `spec` to a file whose hash is `spec.expected`, exactly
/// as [`run`] does a legacy request (same journal record, same resume, retry and trust-window
/// rules; one download at a time, so a spec other than the journaled one replaces it). The
/// DDI client's entry point. A spec that [`validate_spec`] refuses touches nothing. A hash
/// mismatch deletes the file and clears the record: `MD5_MISMATCH` for MD5 (the legacy
/// message `expected X, got Y`), `HASH_MISMATCH` for SHA-1 and SHA-256
/// (`sha256 mismatch: expected X, got Y`).
pub fn fetch(
    journal: &Journal,
    cfg: &Config,
    spec: &DownloadSpec,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<DownloadRecord> {
    fetch_tuned(journal, cfg, spec, progress, cancel, &Tuning::default())
}

/// [`fetch`] with an `Authorization` header on every request (the DDI client's token, when
/// the artifact is on its server's origin).
pub fn fetch_authorized(
    journal: &Journal,
    cfg: &Config,
    spec: &DownloadSpec,
    authorization: Option<String>,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<DownloadRecord> {
    fetch_tuned(
        journal,
        cfg,
        spec,
        progress,
        cancel,
        &Tuning { authorization, ..Tuning::default() },
    )
}

fn run_tuned(
    journal: &Journal,
    cfg: &Config,
    req: &DownloadRequest,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
    tuning: &Tuning,
) -> Result<DownloadRecord> {
    validate(req, cfg)?;
    fetch_tuned(journal, cfg, &req.spec(), progress, cancel, tuning)
}

fn fetch_tuned(
    journal: &Journal,
    cfg: &Config,
    req: &DownloadSpec,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
    tuning: &Tuning,
) -> Result<DownloadRecord> {
    validate_spec(req, cfg)?;
    let dir = cfg.state_dir.join(DOWNLOADS_DIR);
    let path = dir.join(&req.package_name);
    let path_str = path.to_str().ok_or_else(|| {
        Error::internal(format!("state_dir {} is not UTF-8", cfg.state_dir.display()))
    })?;
    let now = crate::clock::now_unix_ms();
    let size = req.package_size;

    let resumable =
        match prior_download(journal, req, &path, path_str, now, cfg.download.trust_window_h)? {
            Prior::Verified(rec) => {
                progress(size, size);
                return Ok(rec);
            }
            Prior::Partial(rec) => Some(rec),
            Prior::Nothing => None,
        };
    preflight(&dir, size - resumable.as_ref().map_or(0, |r| r.offset))?;
    let rec = if let Some(mut rec) = resumable {
        rec.failed = false;
        rec
    } else {
        let rec = DownloadRecord {
            request: req.clone(),
            path: path_str.to_string(),
            offset: 0,
            verified_at_unix_ms: None,
            started_unix_ms: now,
            updated_unix_ms: now,
            failed: false,
        };
        journal.put_download(&rec)?;
        rec
    };

    let file = open_package_file(&cfg.state_dir, &dir, &path)?;
    let mut t = Transfer {
        journal,
        offset: 0,
        rec,
        path,
        file,
        hasher: Hasher::new(&req.expected),
        checkpoint_bytes: size.div_ceil(CHECKPOINTS_PER_PACKAGE),
        buf: vec![0u8; IO_BUFFER_BYTES],
        progress,
    };
    t.resume_prefix(cancel)?;
    match t.fetch(cfg, cancel, tuning) {
        Err(e) if e.code == ErrorCode::PackageSizeMismatch => {
            t.discard()?;
            Err(e)
        }
        Err(e) => Err(e),
        Ok(()) => t.verify(),
    }
}

/// What the journal's download record is worth for `req`.
enum Prior {
    /// `req` downloaded and verified, within the trust window, its file whole: nothing to do.
    Verified(DownloadRecord),
    /// `req` partly downloaded: resume from the record's offset.
    Partial(DownloadRecord),
    /// Nothing usable (none, another request's, or expired): its file is deleted.
    Nothing,
}

fn prior_download(
    journal: &Journal,
    req: &DownloadSpec,
    path: &Path,
    path_str: &str,
    now: u64,
    trust_window_h: u64,
) -> Result<Prior> {
    Ok(match journal.download()? {
        Some(old) if old.request == *req && old.path == path_str => {
            let on_disk = std::fs::symlink_metadata(path)
                .ok()
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len());
            match old.verified_at_unix_ms {
                Some(at)
                    if within_trust_window(at, now, trust_window_h)
                        && on_disk == Some(req.package_size) =>
                {
                    Prior::Verified(old)
                }
                // Expired, or the file is gone: fetch it again.
                Some(_) => {
                    fsutil::remove_if_present(path).map_err(local)?;
                    Prior::Nothing
                }
                None => Prior::Partial(old),
            }
        }
        Some(old) => {
            // Deleted before the new record is committed: a crash in between leaves the old
            // record naming a missing file, which a resume treats as "start from 0".
            fsutil::remove_if_present(Path::new(&old.path)).map_err(local)?;
            Prior::Nothing
        }
        None => Prior::Nothing,
    })
}

/// statvfs preflight: `remaining` bytes (rounded up to whole blocks) plus the reserve.
fn preflight(dir: &Path, remaining: u64) -> Result<()> {
    let (available, block) = fsutil::available_bytes_and_block(dir).map_err(local)?;
    let blocks = remaining.div_ceil(block.max(1)).saturating_mul(block.max(1));
    let needed = blocks.saturating_add(FREE_SPACE_RESERVE_BYTES);
    if available < needed {
        return Err(Error::new(
            ErrorCode::DiskFull,
            format!(
                "{} needs {needed} bytes free ({remaining} to download + \
                {FREE_SPACE_RESERVE_BYTES} reserve), {available} available",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Local file-system failures are `INTERNAL_ERROR` here (an unexpected environment), except
/// ENOSPC/EDQUOT, which `Error::io` already made `DISK_FULL`.
fn local(mut e: Error) -> Error {
    if e.code == ErrorCode::DeploymentFailed {
        e.code = ErrorCode::InternalError;
    }
    e
}

fn file_error(op: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::io(ErrorCode::InternalError, op, path, e)
}

/// Opens (or creates) the package file, never following a symlink. A new file's directory
/// entry, and the `downloads` directory's, are fsynced before any offset is journaled for it.
fn open_package_file(state_dir: &Path, dir: &Path, path: &Path) -> Result<File> {
    fsutil::make_dir(dir).map_err(local)?;
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC;
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => {
            fsutil::fsync_dir(dir).map_err(local)?;
            fsutil::fsync_dir(state_dir).map_err(local)?;
            f
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| file_error("open", path, &e))?,
        Err(e) => return Err(file_error("create", path, &e)),
    };
    let meta = file.metadata().map_err(|e| file_error("fstat", path, &e))?;
    if !meta.is_file() {
        return Err(Error::internal(format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

/// Why one attempt ended without the whole package.
enum Stop {
    /// Worth another attempt after a backoff.
    Retry(String),
    /// `cancel` was set.
    Cancelled,
    /// Not worth retrying (local I/O, journal, an HTTP status that waiting does not fix).
    Fatal(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fatal(e)
    }
}

struct Transfer<'a> {
    journal: &'a Journal,
    /// The journaled state; `rec.offset` is the durable, journaled offset.
    rec: DownloadRecord,
    /// Bytes written to the file and hashed (may be ahead of `rec.offset`).
    offset: u64,
    path: PathBuf,
    file: File,
    /// The hash of bytes `[0, offset)`.
    hasher: Hasher,
    checkpoint_bytes: u64,
    buf: Vec<u8>,
    progress: &'a dyn Fn(u64, u64),
}

impl Transfer<'_> {
    fn size(&self) -> u64 {
        self.rec.request.package_size
    }

    /// Trusts only the journaled prefix: truncates the file to it (or starts over if the file
    /// is shorter: its durable bytes were lost) and hashes it, so the hash state is the one an
    /// uninterrupted download would have at `offset`.
    fn resume_prefix(&mut self, cancel: &AtomicBool) -> Result<()> {
        let len = self.file.metadata().map_err(|e| file_error("fstat", &self.path, &e))?.len();
        if len < self.rec.offset {
            tracing::warn!(path = %self.path.display(), len, offset = self.rec.offset, "package \
                file shorter than its journaled offset; starting over");
            self.rec.offset = 0;
            self.commit()?;
        }
        if len != self.rec.offset {
            self.file
                .set_len(self.rec.offset)
                .map_err(|e| file_error("truncate", &self.path, &e))?;
        }
        while self.offset < self.rec.offset {
            if cancel.load(Ordering::Relaxed) {
                return Err(self.cancelled());
            }
            let want = (self.rec.offset - self.offset).min(self.buf.len() as u64) as usize;
            let n = self
                .file
                .read_at(&mut self.buf[..want], self.offset)
                .map_err(|e| file_error("read", &self.path, &e))?;
            if n == 0 {
                return Err(Error::internal(format!(
                    "{} shrank while being hashed",
                    self.path.display()
                )));
            }
            self.hasher.update(&self.buf[..n]);
            self.offset += n as u64;
        }
        (self.progress)(self.offset, self.size());
        Ok(())
    }

    /// Attempts until every byte is written, with backoff between failed attempts.
    fn fetch(&mut self, cfg: &Config, cancel: &AtomicBool, tuning: &Tuning) -> Result<()> {
        let agent = agent(cfg, tuning);
        let retries = cfg.download.retries;
        let mut failures = 0u32;
        let mut high_water = self.rec.offset;
        while self.offset < self.size() {
            if cancel.load(Ordering::Relaxed) {
                self.checkpoint()?;
                return Err(self.cancelled());
            }
            let why = match self.attempt(&agent, tuning.authorization.as_deref(), cancel) {
                Ok(()) => continue,
                Err(Stop::Fatal(e)) => return Err(e),
                Err(Stop::Cancelled) => {
                    self.checkpoint()?;
                    return Err(self.cancelled());
                }
                Err(Stop::Retry(why)) => why,
            };
            self.checkpoint()?;
            if self.rec.offset > high_water {
                high_water = self.rec.offset;
                failures = 0;
            }
            failures += 1;
            let url = redact(&self.rec.request.package_url);
            if failures > retries {
                return Err(Error::new(
                    ErrorCode::DownloadFailed,
                    format!(
                        "GET {url} failed {failures} times in a row ({} / {} bytes): {why}",
                        self.rec.offset,
                        self.size()
                    ),
                ));
            }
            let wait = tuning.backoff(failures);
            tracing::warn!(
                url,
                offset = self.rec.offset,
                failures,
                wait_ms = wait.as_millis() as u64,
                "download attempt failed: {why}"
            );
            if !sleep_unless_cancelled(wait, cancel) {
                return Err(self.cancelled());
            }
        }
        Ok(())
    }

    /// One GET from `self.offset` to the end of the package.
    fn attempt(
        &mut self,
        agent: &ureq::Agent,
        authorization: Option<&str>,
        cancel: &AtomicBool,
    ) -> Result<(), Stop> {
        let url = self.rec.request.package_url.clone();
        let mut request = agent.get(&url);
        if let Some(a) = authorization {
            request = request.header("Authorization", a);
        }
        let ranged = self.offset > 0;
        if ranged {
            request = request.header("Range", format!("bytes={}-", self.offset));
        }
        let response =
            request.call().map_err(|e| Stop::Retry(e.to_string().replace(&url, &redact(&url))))?;
        let status = response.status().as_u16();
        let content_length = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        self.check_answer(status, &response, content_length, ranged)?;
        let remaining = self.size() - self.offset;
        if let Some(len) = content_length.filter(|&len| len != remaining) {
            return Err(Stop::Retry(format!(
                "HTTP {status} with Content-Length {len}, expected {remaining}"
            )));
        }
        self.receive(response.into_body().into_reader(), cancel)
    }

    /// Whether the answer's status and range continue this download (a 200 to a ranged
    /// request starts over from byte 0; a 416 restarts and retries).
    fn check_answer(
        &mut self,
        status: u16,
        response: &ureq::http::Response<ureq::Body>,
        content_length: Option<u64>,
        ranged: bool,
    ) -> Result<(), Stop> {
        match status {
            206 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if let Some(total) = range_total(range).filter(|&t| t != self.size()) {
                    return Err(Stop::Fatal(
                        self.size_mismatch(&format!("the server's file has {total}")),
                    ));
                }
                if !continues_at(range, self.offset, self.size()) {
                    return Err(Stop::Retry(format!(
                        "206 with Content-Range {range:?}, expected bytes {}-{}/{}",
                        self.offset,
                        self.size() - 1,
                        self.size()
                    )));
                }
            }
            200 => {
                if let Some(len) = content_length.filter(|&len| len != self.size()) {
                    return Err(Stop::Fatal(
                        self.size_mismatch(&format!("the server's file has {len}")),
                    ));
                }
                if ranged {
                    tracing::warn!(
                        offset = self.offset,
                        "server ignored Range (200): starting over from byte 0"
                    );
                    self.restart_from_zero()?;
                }
            }
            416 => {
                self.restart_from_zero()?;
                return Err(Stop::Retry(format!(
                    "416 Range Not Satisfiable for bytes={}-",
                    self.rec.offset
                )));
            }
            408 | 429 | 500..=599 => return Err(Stop::Retry(format!("HTTP {status}"))),
            _ => {
                return Err(Stop::Fatal(Error::new(
                    ErrorCode::DownloadFailed,
                    format!("GET {}: HTTP {status}", redact(&self.rec.request.package_url)),
                )));
            }
        }
        Ok(())
    }

    /// Writes the body from `offset` to `package_size`, hashing as it goes and journaling a
    /// checkpoint every `checkpoint_bytes`.
    fn receive(&mut self, mut body: impl Read, cancel: &AtomicBool) -> Result<(), Stop> {
        while self.offset < self.size() {
            if cancel.load(Ordering::Relaxed) {
                return Err(Stop::Cancelled);
            }
            let want = (self.size() - self.offset).min(self.buf.len() as u64) as usize;
            let n = match body.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(Stop::Retry(format!(
                        "connection closed at {} of {} bytes",
                        self.offset,
                        self.size()
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Stop::Retry(format!(
                        "read at {} of {} bytes: {e}",
                        self.offset,
                        self.size()
                    )));
                }
            };
            self.file
                .write_all_at(&self.buf[..n], self.offset)
                .map_err(|e| file_error("write", &self.path, &e))?;
            self.hasher.update(&self.buf[..n]);
            self.offset += n as u64;
            (self.progress)(self.offset, self.size());
            if self.offset - self.rec.offset >= self.checkpoint_bytes {
                self.checkpoint()?;
            }
        }
        // A body that goes on past package_size (no Content-Length said so up front).
        if matches!(body.read(&mut [0u8; 1]), Ok(n) if n > 0) {
            return Err(Stop::Fatal(self.size_mismatch("the server sent more")));
        }
        Ok(())
    }

    fn size_mismatch(&self, what: &str) -> Error {
        Error::new(
            ErrorCode::PackageSizeMismatch,
            format!("expected {} bytes, but {what} bytes", self.size()),
        )
    }

    /// A download that cannot succeed (the server's file is another size): the file and the
    /// record go, so the next request starts afresh. File first (see `verify`).
    fn discard(self) -> Result<()> {
        drop(self.file);
        discard(self.journal, &self.rec)
    }

    /// Makes the bytes written durable, then journals the offset (write-ahead: the journal
    /// never vouches for bytes a power cut could lose).
    fn checkpoint(&mut self) -> Result<()> {
        if self.offset == self.rec.offset {
            return Ok(());
        }
        fsutil::sync_data(&self.file, &self.path, ErrorCode::InternalError)?;
        self.rec.offset = self.offset;
        self.commit()
    }

    fn commit(&mut self) -> Result<()> {
        self.rec.updated_unix_ms = crate::clock::now_unix_ms();
        self.journal.put_download(&self.rec)
    }

    /// Offset 0 is journaled before the file is truncated: from then on nothing is trusted.
    fn restart_from_zero(&mut self) -> Result<()> {
        self.rec.offset = 0;
        self.commit()?;
        self.file.set_len(0).map_err(|e| file_error("truncate", &self.path, &e))?;
        self.offset = 0;
        self.hasher = Hasher::new(&self.rec.request.expected);
        (self.progress)(0, self.size());
        Ok(())
    }

    /// Every byte is written: durable, then the hash compared, then `verified_at` journaled.
    fn verify(mut self) -> Result<DownloadRecord> {
        fsutil::sync_data(&self.file, &self.path, ErrorCode::InternalError)?;
        let expected = self.rec.request.expected.clone();
        let got = std::mem::replace(&mut self.hasher, Hasher::new(&expected)).finalize_hex();
        if got != expected.hex() {
            drop(self.file);
            // File first, record second: a crash in between leaves a record whose file is
            // missing, which the next request starts over.
            fsutil::remove_if_present(&self.path).map_err(local)?;
            self.journal.clear_download()?;
            return Err(expected.mismatch(&got));
        }
        self.rec.offset = self.offset;
        let now = crate::clock::now_unix_ms();
        self.rec.verified_at_unix_ms = Some(now);
        self.commit()?;
        Ok(self.rec)
    }

    fn cancelled(&self) -> Error {
        Error::new(
            ErrorCode::DownloadIncomplete,
            format!(
                "download interrupted at {} of {} bytes; the same request resumes it",
                self.rec.offset,
                self.size()
            ),
        )
    }
}

/// The running hash of an [`ExpectedHash`]'s algorithm.
enum Hasher {
    Md5(Md5),
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    fn new(expected: &ExpectedHash) -> Hasher {
        match expected {
            ExpectedHash::Md5(_) => Hasher::Md5(Md5::new()),
            ExpectedHash::Sha1(_) => Hasher::Sha1(Sha1::new()),
            ExpectedHash::Sha256(_) => Hasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    /// The digest, lower-case hex.
    fn finalize_hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex(&h.finalize()),
            Hasher::Sha1(h) => hex(&h.finalize()),
            Hasher::Sha256(h) => hex(&h.finalize()),
        }
    }
}

fn agent(cfg: &Config, tuning: &Tuning) -> ureq::Agent {
    let mut builder = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(!cfg.download.allow_http)
        .max_redirects(REDIRECTS_MAX)
        // A DDI token never follows a redirect (ureq's default, stated).
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
        .timeout_connect(Some(tuning.connect_timeout))
        .timeout_recv_response(Some(tuning.read_timeout))
        .timeout_per_read(Some(tuning.read_timeout))
        .user_agent(concat!("tope-updater/", env!("CARGO_PKG_VERSION")));
    if !tuning.env_proxy {
        builder = builder.proxy(None);
    }
    builder.build().new_agent()
}

/// TOTAL of `bytes START-END/TOTAL`, when it is a number.
fn range_total(content_range: &str) -> Option<u64> {
    let total = content_range.trim().rsplit_once('/')?.1;
    if total.is_empty() || !total.bytes().all(|b| b.is_ascii_digit()) {
        None
    } else {
        total.parse().ok()
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) continues at `offset` to the end of `size`.
fn continues_at(content_range: &str, offset: u64, size: u64) -> bool {
    let number = |s: &str| {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    let parsed = (|| {
        let (range, total) = content_range.trim().strip_prefix("bytes ")?.split_once('/')?;
        let (start, end) = range.split_once('-')?;
        Some((number(start)?, number(end)?, if total == "*" { None } else { Some(number(total)?) }))
    })();
    let total_fits = |total: Option<u64>| total.is_none_or(|t| t == size);
    matches!(
        parsed,
        Some((start, end, total)) if start == offset && end + 1 == size && total_fits(total)
    )
}

/// A URL without its query and fragment: presigned URLs carry credentials there, and
/// messages go to logs and reports.
fn redact(url: &str) -> String {
    match url.find(['?', '#']) {
        Some(i) => format!("{}?…", &url[..i]),
        None => url.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sleeps `d`, looking at `cancel` every `CANCEL_POLL`; false if cancelled.
fn sleep_unless_cancelled(d: Duration, cancel: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(CANCEL_POLL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// What the test server does with one request (a script, one entry per request; once the
    /// script is used up, every request is `Normal`).
    #[derive(Clone, Copy, Debug)]
    enum Reply {
        /// 200, or 206 from the `Range` start.
        Normal,
        /// Like `Normal`, but the connection is closed after this many body bytes.
        DropAfter(usize),
        /// This status, empty body.
        Status(u16),
        /// 200 with the whole body, whatever `Range` says.
        IgnoreRange,
        /// Like `Normal`, but every byte is altered (so the MD5 differs).
        WrongBytes,
        /// 206 whose `Content-Range` starts one byte after the requested offset.
        BadContentRange,
    }

    #[derive(Debug, Clone)]
    struct Seen {
        request_line: String,
        range: Option<String>,
        /// `offset` of the journal's download record when the request arrived.
        journaled_offset: Option<u64>,
    }

    /// A minimal HTTP/1.1 package server on 127.0.0.1 (one connection at a time,
    /// `Connection: close`).
    struct PackageServer {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        journal: Arc<Mutex<Option<Arc<Journal>>>>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl PackageServer {
        fn start(body: Vec<u8>, script: Vec<Reply>) -> PackageServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let journal: Arc<Mutex<Option<Arc<Journal>>>> = Arc::new(Mutex::new(None));
            let stop = Arc::new(AtomicBool::new(false));
            let (seen2, journal2, stop2) = (seen.clone(), journal.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let mut script = script.into_iter();
                for stream in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let reply = script.next().unwrap_or(Reply::Normal);
                    serve(stream, &body, reply, &seen2, &journal2);
                }
            });
            PackageServer { addr, seen, journal, stop, thread: Some(thread) }
        }

        fn url(&self, name: &str) -> String {
            format!("http://{}/ota/{name}", self.addr)
        }

        /// Lets the server note the journaled offset at each request.
        fn watch(&self, journal: &Arc<Journal>) {
            *self.journal.lock().unwrap() = Some(journal.clone());
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        fn ranges(&self) -> Vec<Option<String>> {
            self.seen().into_iter().map(|s| s.range).collect()
        }
    }

    impl Drop for PackageServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The request line and the Range header's value; `None` for a connection closed first.
    fn read_request(stream: &TcpStream) -> Option<(String, Option<String>)> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return None;
        }
        let mut range = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                range = Some(value.trim().to_string());
            }
        }
        Some((request_line, range))
    }

    fn serve(
        stream: TcpStream,
        body: &[u8],
        reply: Reply,
        seen: &Mutex<Vec<Seen>>,
        journal: &Mutex<Option<Arc<Journal>>>,
    ) {
        let Some((request_line, range)) = read_request(&stream) else { return };
        let journaled_offset =
            journal.lock().unwrap().as_ref().and_then(|j| j.download().unwrap()).map(|r| r.offset);
        seen.lock().unwrap().push(Seen {
            request_line: request_line.trim_end().to_string(),
            range: range.clone(),
            journaled_offset,
        });

        let mut out = stream;
        if let Reply::Status(code) = reply {
            let _ = write!(
                out,
                "HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        let data: Vec<u8> = match reply {
            Reply::WrongBytes => body.iter().map(|b| b ^ 0x5a).collect(),
            _ => body.to_vec(),
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
        let from = match (reply, start) {
            (Reply::IgnoreRange, _) | (_, None) => None,
            (_, Some(n)) => Some(n),
        };
        let len = data.len();
        let mut head = match from {
            Some(n) if n >= len => {
                let _ = write!(
                    out,
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes \
                    */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                return;
            }
            Some(n) => {
                let claimed = if matches!(reply, Reply::BadContentRange) { n + 1 } else { n };
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes \
                    {claimed}-{}/{len}\r\nContent-Length: {}\r\n",
                    len - 1,
                    len - n
                )
            }
            None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"),
        };
        head.push_str("Connection: close\r\n\r\n");
        let from = from.unwrap_or(0);
        let count = match reply {
            Reply::DropAfter(k) => k.min(len - from),
            _ => len - from,
        };
        let _ = out.write_all(head.as_bytes());
        let _ = out.write_all(&data[from..from + count]);
        let _ = out.flush();
        let _ = out.shutdown(std::net::Shutdown::Both);
    }

    fn package(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    }

    fn md5_hex(bytes: &[u8]) -> String {
        hex(&Md5::digest(bytes))
    }

    fn setup() -> (tempfile::TempDir, Config, Arc<Journal>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config { state_dir: dir.path().to_path_buf(), ..Config::default() };
        cfg.download.allow_http = true;
        cfg.download.retries = 3;
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        (dir, cfg, j)
    }

    fn request(server: &PackageServer, name: &str, body: &[u8]) -> DownloadRequest {
        DownloadRequest {
            version: "1.2.3".into(),
            package_url: server.url(name),
            package_name: name.into(),
            package_size: body.len() as u64,
            package_md5: md5_hex(body),
        }
    }

    fn sha1_hex(bytes: &[u8]) -> String {
        hex(&Sha1::digest(bytes))
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// What the DDI client would ask for: the request's fields with `expected`.
    fn spec(
        server: &PackageServer,
        name: &str,
        body: &[u8],
        expected: ExpectedHash,
    ) -> DownloadSpec {
        DownloadSpec::new("1.2.3", server.url(name), name, body.len() as u64, expected)
    }

    fn go_spec(j: &Journal, cfg: &Config, spec: &DownloadSpec) -> Result<DownloadRecord> {
        fetch_tuned(j, cfg, spec, &|_, _| {}, &AtomicBool::new(false), &fast())
    }

    fn fast() -> Tuning {
        Tuning {
            backoff_base: Duration::from_millis(1),
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            env_proxy: false,
            authorization: None,
        }
    }

    fn go(j: &Journal, cfg: &Config, req: &DownloadRequest) -> Result<DownloadRecord> {
        run_tuned(j, cfg, req, &|_, _| {}, &AtomicBool::new(false), &fast())
    }

    /// Runs with `cancel` set by the progress callback once `at` bytes are done.
    fn go_cancelling_at(
        j: &Journal,
        cfg: &Config,
        req: &DownloadRequest,
        at: u64,
    ) -> Result<DownloadRecord> {
        let cancel = AtomicBool::new(false);
        run_tuned(
            j,
            cfg,
            req,
            &|done, _| {
                if done >= at {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            &cancel,
            &fast(),
        )
    }

    fn package_path(cfg: &Config, name: &str) -> PathBuf {
        cfg.state_dir.join(DOWNLOADS_DIR).join(name)
    }

    const MIB: usize = 1024 * 1024;

    #[test]
    fn full_download_writes_the_file_checks_md5_and_journals_verified_at() {
        let (_d, cfg, j) = setup();
        let body = package(MIB + 123);
        let server = PackageServer::start(body.clone(), vec![]);
        let req = request(&server, "pkg-1.2.3.zip", &body);
        let last = Mutex::new((0, 0));
        let rec = run_tuned(
            &j,
            &cfg,
            &req,
            &|d, t| *last.lock().unwrap() = (d, t),
            &AtomicBool::new(false),
            &fast(),
        )
        .unwrap();
        assert_eq!(std::fs::read(package_path(&cfg, "pkg-1.2.3.zip")).unwrap(), body);
        assert!(rec.is_complete() && rec.is_verified());
        assert_eq!(rec.path, package_path(&cfg, "pkg-1.2.3.zip").to_str().unwrap());
        assert_eq!(j.download().unwrap(), Some(rec));
        assert_eq!(*last.lock().unwrap(), (body.len() as u64, body.len() as u64));
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].request_line, "GET /ota/pkg-1.2.3.zip HTTP/1.1");
        assert_eq!(seen[0].range, None);
    }

    #[test]
    fn dropped_connection_resumes_with_range_from_the_journaled_offset() {
        let (_d, cfg, j) = setup();
        let body = package(MIB);
        let server = PackageServer::start(body.clone(), vec![Reply::DropAfter(300_000)]);
        server.watch(&j);
        let req = request(&server, "p.zip", &body);
        go(&j, &cfg, &req).unwrap();
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].range, None);
        assert_eq!(seen[1].range.as_deref(), Some("bytes=300000-"));
        // The Range offset is exactly the offset journaled (after fdatasync) before the retry.
        assert_eq!(seen[1].journaled_offset, Some(300_000));
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
    }

    #[test]
    fn cancel_then_restart_with_a_fresh_journal_resumes_from_the_journaled_offset() {
        let (dir, cfg, j) = setup();
        let body = package(MIB);
        let server = PackageServer::start(body.clone(), vec![]);
        let req = request(&server, "p.zip", &body);
        let err = go_cancelling_at(&j, &cfg, &req, 400_000).unwrap_err();
        assert_eq!(err.code, ErrorCode::DownloadIncomplete, "{err}");
        let rec = j.download().unwrap().unwrap();
        let n = rec.offset;
        assert!(n >= 400_000 && n < body.len() as u64, "offset {n}");
        assert!(!rec.is_verified());
        let path = package_path(&cfg, "p.zip");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), n);

        // "Restart": a new process opens the journal again. Bytes written after the journaled
        // offset (not vouched for) must not be trusted.
        drop(j);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[0xee; 5000])
            .unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        server.watch(&j);
        go(&j, &cfg, &req).unwrap();
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].range, Some(format!("bytes={n}-")));
        assert_eq!(seen[1].journaled_offset, Some(n));
        assert_eq!(std::fs::read(&path).unwrap(), body);
    }

    #[test]
    fn two_503s_then_success_retries_with_backoff() {
        let (_d, cfg, j) = setup();
        let body = package(50_000);
        let server =
            PackageServer::start(body.clone(), vec![Reply::Status(503), Reply::Status(503)]);
        let req = request(&server, "p.zip", &body);
        assert!(go(&j, &cfg, &req).unwrap().is_verified());
        assert_eq!(server.ranges(), vec![None, None, None]);
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
    }

    #[test]
    fn retries_exhausted_is_download_failed_and_stays_resumable() {
        let (_d, cfg, j) = setup();
        let body = package(50_000);
        let server = PackageServer::start(body.clone(), vec![Reply::Status(503); 4]);
        let req = request(&server, "p.zip", &body);
        let err = go(&j, &cfg, &req).unwrap_err();
        assert_eq!(err.code, ErrorCode::DownloadFailed, "{err}");
        assert!(err.message.contains("HTTP 503"), "{err}");
        // The first attempt and cfg.download.retries = 3 retries.
        assert_eq!(server.seen().len(), 4);
        assert_eq!(j.download().unwrap().unwrap().offset, 0);
        // The same request later succeeds (the server recovered).
        assert!(go(&j, &cfg, &req).unwrap().is_verified());
    }

    #[test]
    fn production_backoff_is_one_two_four_seconds() {
        let t = Tuning::default();
        let waits: Vec<Duration> = (1..=3).map(|f| t.backoff(f)).collect();
        assert_eq!(waits, [1, 2, 4].map(Duration::from_secs));
        assert_eq!(t.backoff(40), Duration::from_secs(64));
        assert_eq!(Config::default().download.retries, 3);
    }

    #[test]
    fn a_4xx_other_than_408_or_429_fails_at_once() {
        let (_d, cfg, j) = setup();
        let body = package(1000);
        let server = PackageServer::start(body.clone(), vec![Reply::Status(404)]);
        let err = go(&j, &cfg, &request(&server, "p.zip", &body)).unwrap_err();
        assert_eq!(err.code, ErrorCode::DownloadFailed, "{err}");
        assert_eq!(server.seen().len(), 1);
    }

    #[test]
    fn server_answering_200_to_range_restarts_from_zero_and_is_still_correct() {
        let (_d, cfg, j) = setup();
        let body = package(MIB);
        let server =
            PackageServer::start(body.clone(), vec![Reply::DropAfter(300_000), Reply::IgnoreRange]);
        let req = request(&server, "p.zip", &body);
        let rec = go(&j, &cfg, &req).unwrap();
        assert!(rec.is_verified());
        assert_eq!(server.ranges(), vec![None, Some("bytes=300000-".into())]);
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
    }

    #[test]
    fn a_206_with_the_wrong_content_range_is_not_appended() {
        let (_d, cfg, j) = setup();
        let body = package(200_000);
        let server = PackageServer::start(
            body.clone(),
            vec![Reply::DropAfter(1000), Reply::BadContentRange],
        );
        let req = request(&server, "p.zip", &body);
        assert!(go(&j, &cfg, &req).unwrap().is_verified());
        assert_eq!(
            server.ranges(),
            vec![None, Some("bytes=1000-".into()), Some("bytes=1000-".into())]
        );
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
    }

    #[test]
    fn md5_mismatch_deletes_the_file_and_clears_the_record() {
        let (_d, cfg, j) = setup();
        let body = package(100_000);
        let server = PackageServer::start(body.clone(), vec![Reply::WrongBytes]);
        let req = request(&server, "p.zip", &body);
        let err = go(&j, &cfg, &req).unwrap_err();
        assert_eq!(err.code, ErrorCode::Md5Mismatch, "{err}");
        assert!(err.message.starts_with(&format!("expected {}, got ", req.package_md5)), "{err}");
        assert!(!package_path(&cfg, "p.zip").exists());
        assert_eq!(j.download().unwrap(), None);
    }

    #[test]
    fn sha256_download_is_verified() {
        let (_d, cfg, j) = setup();
        let body = package(MIB + 7);
        let server = PackageServer::start(body.clone(), vec![]);
        let s = spec(&server, "p.zip", &body, ExpectedHash::sha256(&sha256_hex(&body)).unwrap());
        let rec = go_spec(&j, &cfg, &s).unwrap();
        assert!(rec.is_complete() && rec.is_verified());
        assert_eq!(rec.request, s);
        assert_eq!(j.download().unwrap(), Some(rec.clone()));
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
        // The same spec again: verified within the trust window, no network.
        assert_eq!(go_spec(&j, &cfg, &s).unwrap(), rec);
        assert_eq!(server.seen().len(), 1);
        // POST /update accepts it like a legacy download.
        assert!(
            check_installable(Some(&rec), "1.2.3", 24, rec.verified_at_unix_ms.unwrap()).is_ok()
        );
    }

    /// gooseBit gives only sha1.
    #[test]
    fn sha1_download_is_verified() {
        let (_d, cfg, j) = setup();
        let body = package(300_001);
        let server = PackageServer::start(body.clone(), vec![]);
        let s = spec(&server, "goose.swu", &body, ExpectedHash::sha1(&sha1_hex(&body)).unwrap());
        let rec = go_spec(&j, &cfg, &s).unwrap();
        assert!(rec.is_verified());
        assert_eq!(rec.request.expected, ExpectedHash::Sha1(sha1_hex(&body)));
        assert_eq!(std::fs::read(package_path(&cfg, "goose.swu")).unwrap(), body);
    }

    /// Each kind: the file goes, the record goes, and the code is `MD5_MISMATCH` for MD5 (the
    /// legacy message) or `HASH_MISMATCH` naming the algorithm, the expected and the got digest.
    #[test]
    fn each_kind_of_hash_mismatch_deletes_the_file_and_clears_the_record() {
        let body = package(100_000);
        let wrong: Vec<u8> = body.iter().map(|b| b ^ 0x5a).collect();
        let kinds = [
            (ExpectedHash::Md5(md5_hex(&body)), md5_hex(&wrong), ErrorCode::Md5Mismatch, ""),
            (
                ExpectedHash::Sha1(sha1_hex(&body)),
                sha1_hex(&wrong),
                ErrorCode::HashMismatch,
                "sha1 mismatch: ",
            ),
            (
                ExpectedHash::Sha256(sha256_hex(&body)),
                sha256_hex(&wrong),
                ErrorCode::HashMismatch,
                "sha256 mismatch: ",
            ),
        ];
        for (expected, got, code, prefix) in kinds {
            let (_d, cfg, j) = setup();
            let server = PackageServer::start(body.clone(), vec![Reply::WrongBytes]);
            let s = spec(&server, "p.zip", &body, expected.clone());
            let err = go_spec(&j, &cfg, &s).unwrap_err();
            assert_eq!(err.code, code, "{err}");
            assert_eq!(err.message, format!("{prefix}expected {}, got {got}", expected.hex()));
            assert!(!package_path(&cfg, "p.zip").exists(), "{expected:?}");
            assert_eq!(j.download().unwrap(), None, "{expected:?}");
        }
    }

    /// Interrupted mid-way, then a new process: the SHA-256 state is rebuilt over the bytes
    /// already on disk (and only the journaled ones), the rest comes with Range, and the whole
    /// is verified. A wrong prefix on disk would fail it: the rebuilt state is really used.
    #[test]
    fn sha256_download_interrupted_and_resumed_with_range_rebuilds_the_hash_from_disk() {
        let (dir, cfg, j) = setup();
        let body = package(MIB);
        let server = PackageServer::start(body.clone(), vec![]);
        let s = spec(&server, "p.zip", &body, ExpectedHash::Sha256(sha256_hex(&body)));
        let cancel = AtomicBool::new(false);
        let stop_at = |done: u64, _| {
            if done >= 400_000 {
                cancel.store(true, Ordering::Relaxed);
            }
        };
        let err = fetch_tuned(&j, &cfg, &s, &stop_at, &cancel, &fast()).unwrap_err();
        assert_eq!(err.code, ErrorCode::DownloadIncomplete, "{err}");
        let n = j.download().unwrap().unwrap().offset;
        assert!(n >= 400_000 && n < body.len() as u64, "offset {n}");
        let path = package_path(&cfg, "p.zip");

        // A new process; untrusted bytes past the journaled offset.
        drop(j);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[0xee; 5000])
            .unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        server.watch(&j);
        let progress = Mutex::new(Vec::new());
        let rec = fetch_tuned(
            &j,
            &cfg,
            &s,
            &|d, _| progress.lock().unwrap().push(d),
            &AtomicBool::new(false),
            &fast(),
        )
        .unwrap();
        assert!(rec.is_verified());
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].range, Some(format!("bytes={n}-")));
        assert_eq!(seen[1].journaled_offset, Some(n));
        // The prefix was read back (progress starts at the offset, not 0).
        assert_eq!(progress.lock().unwrap().first(), Some(&n));
        assert_eq!(std::fs::read(&path).unwrap(), body);

        // Again, with a prefix on disk that is not the server's: the rebuilt hash catches it.
        let (_d2, cfg2, j2) = setup();
        let s2 = DownloadSpec { package_name: "q.zip".into(), ..s.clone() };
        let cancel = AtomicBool::new(false);
        let stop_at = |done: u64, _| {
            if done >= 400_000 {
                cancel.store(true, Ordering::Relaxed);
            }
        };
        fetch_tuned(&j2, &cfg2, &s2, &stop_at, &cancel, &fast()).unwrap_err();
        let path2 = package_path(&cfg2, "q.zip");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path2)
            .unwrap()
            .write_all_at(&[0u8; 10], 1000)
            .unwrap();
        let err = go_spec(&j2, &cfg2, &s2).unwrap_err();
        assert_eq!(err.code, ErrorCode::HashMismatch, "{err}");
        assert!(!path2.exists());
    }

    /// Within one run: a dropped connection keeps the SHA-1 state across the Range retry, and
    /// a server that ignores Range (200) restarts it with the file.
    #[test]
    fn sha1_download_resumes_after_a_dropped_connection() {
        let (_d, cfg, j) = setup();
        let body = package(MIB);
        let expected = ExpectedHash::Sha1(sha1_hex(&body));
        let kept = PackageServer::start(body.clone(), vec![Reply::DropAfter(250_000)]);
        assert!(
            go_spec(&j, &cfg, &spec(&kept, "a.zip", &body, expected.clone()))
                .unwrap()
                .is_verified()
        );
        assert_eq!(kept.ranges(), vec![None, Some("bytes=250000-".into())]);
        assert_eq!(std::fs::read(package_path(&cfg, "a.zip")).unwrap(), body);

        let restarted =
            PackageServer::start(body.clone(), vec![Reply::DropAfter(300_000), Reply::IgnoreRange]);
        assert!(
            go_spec(&j, &cfg, &spec(&restarted, "b.zip", &body, expected)).unwrap().is_verified()
        );
        assert_eq!(restarted.ranges(), vec![None, Some("bytes=300000-".into())]);
        assert_eq!(std::fs::read(package_path(&cfg, "b.zip")).unwrap(), body);
    }

    /// A download an older build journaled (record version 1, the legacy request) is the
    /// same download as that request now: it resumes from its offset and checks the MD5.
    #[test]
    fn a_download_journaled_by_an_older_build_resumes_as_md5() {
        let (_d, cfg, j) = setup();
        let body = package(MIB);
        let server = PackageServer::start(body.clone(), vec![]);
        server.watch(&j);
        let req = request(&server, "p.zip", &body);
        go_cancelling_at(&j, &cfg, &req, 300_000).unwrap_err();
        let rec = j.download().unwrap().unwrap();
        j.put_download_v1(&rec).unwrap();
        assert_eq!(
            j.download().unwrap().unwrap().request.expected,
            ExpectedHash::Md5(req.package_md5.clone())
        );
        assert!(go(&j, &cfg, &req).unwrap().is_verified());
        assert_eq!(server.ranges()[1], Some(format!("bytes={}-", rec.offset)));
        assert_eq!(std::fs::read(package_path(&cfg, "p.zip")).unwrap(), body);
    }

    #[test]
    fn expected_hashes_are_lower_case_hex_of_their_length() {
        let (md5, sha1, sha256) = ("0".repeat(32), "a".repeat(40), "f".repeat(64));
        assert_eq!(ExpectedHash::md5(&md5).unwrap(), ExpectedHash::Md5(md5.clone()));
        assert_eq!(ExpectedHash::sha1(&sha1).unwrap().algorithm(), "sha1");
        assert_eq!(ExpectedHash::sha256(&sha256).unwrap().hex(), sha256);
        let bad = [
            ExpectedHash::md5(&sha1),
            ExpectedHash::sha1(&md5),
            ExpectedHash::sha1(&"A".repeat(40)),
            ExpectedHash::sha256(&sha1),
            ExpectedHash::sha256(&"g".repeat(64)),
            ExpectedHash::sha256(""),
        ];
        for r in bad {
            assert_eq!(r.unwrap_err().code, ErrorCode::ValidationError);
        }
        assert_eq!(
            ExpectedHash::sha256("ab").unwrap_err().to_string(),
            "VALIDATION_ERROR: expected sha256 hash must be 64 lower-case hexadecimal digits"
        );
    }

    #[test]
    fn fetch_validates_the_spec_before_touching_anything() {
        let (_d, cfg, j) = setup();
        let body = package(10);
        let server = PackageServer::start(body.clone(), vec![]);
        let bad_hash = spec(&server, "p.zip", &body, ExpectedHash::Sha256("0".repeat(63)));
        assert_eq!(go_spec(&j, &cfg, &bad_hash).unwrap_err().code, ErrorCode::ValidationError);
        let bad_name = spec(&server, "../p.zip", &body, ExpectedHash::Sha256(sha256_hex(&body)));
        assert_eq!(go_spec(&j, &cfg, &bad_name).unwrap_err().code, ErrorCode::ValidationError);
        assert!(server.seen().is_empty());
        assert_eq!(j.download().unwrap(), None);
    }

    /// A spec is a legacy request exactly when it is checked by MD5.
    #[test]
    fn specs_and_legacy_requests_convert() {
        let req = DownloadRequest {
            version: "1.2.3".into(),
            package_url: "https://e.com/p.zip".into(),
            package_name: "p.zip".into(),
            package_size: 5,
            package_md5: "0".repeat(32),
        };
        assert_eq!(req.spec().legacy_request(), Some(req.clone()));
        let sha = DownloadSpec { expected: ExpectedHash::Sha256("0".repeat(64)), ..req.spec() };
        assert_eq!(sha.legacy_request(), None);
    }

    #[test]
    fn disk_full_preflight_refuses_before_any_request() {
        let (_d, mut cfg, j) = setup();
        cfg.max_package_bytes = u64::MAX;
        let body = package(10);
        let server = PackageServer::start(body.clone(), vec![]);
        let mut req = request(&server, "p.zip", &body);
        req.package_size = 1 << 60;
        let err = go(&j, &cfg, &req).unwrap_err();
        assert_eq!(err.code, ErrorCode::DiskFull, "{err}");
        assert!(server.seen().is_empty());
        assert!(!package_path(&cfg, "p.zip").exists());
    }

    #[test]
    fn a_request_for_another_url_replaces_the_record_and_deletes_the_old_partial_file() {
        let (_d, cfg, j) = setup();
        let old_body = package(MIB);
        let old_server = PackageServer::start(old_body.clone(), vec![]);
        let old = request(&old_server, "old.zip", &old_body);
        go_cancelling_at(&j, &cfg, &old, 300_000).unwrap_err();
        assert!(package_path(&cfg, "old.zip").exists());

        let new_body = package(70_000);
        let new_server = PackageServer::start(new_body.clone(), vec![]);
        let new = request(&new_server, "new.zip", &new_body);
        let rec = go(&j, &cfg, &new).unwrap();
        assert_eq!(rec.request, new.spec());
        assert!(!package_path(&cfg, "old.zip").exists());
        assert_eq!(std::fs::read(package_path(&cfg, "new.zip")).unwrap(), new_body);
        assert_eq!(new_server.ranges(), vec![None]);
    }

    #[test]
    fn a_verified_download_is_not_fetched_again_within_the_trust_window() {
        let (_d, cfg, j) = setup();
        let body = package(10_000);
        let server = PackageServer::start(body.clone(), vec![]);
        let req = request(&server, "p.zip", &body);
        let first = go(&j, &cfg, &req).unwrap();
        assert_eq!(go(&j, &cfg, &req).unwrap(), first);
        assert_eq!(server.seen().len(), 1);

        // Past the trust window the same request downloads it again.
        let mut expired = first.clone();
        expired.verified_at_unix_ms = Some(1);
        j.put_download(&expired).unwrap();
        let again = go(&j, &cfg, &req).unwrap();
        assert!(again.verified_at_unix_ms.unwrap() > 1);
        assert_eq!(server.seen().len(), 2);
    }

    #[test]
    fn https_to_a_server_without_tls_fails_as_download_failed() {
        let (_d, mut cfg, j) = setup();
        cfg.download.allow_http = false;
        cfg.download.retries = 1;
        let body = package(1000);
        let server = PackageServer::start(body.clone(), vec![]);
        let mut req = request(&server, "p.zip", &body);
        req.package_url = req.package_url.replacen("http://", "https://", 1);
        let err = go(&j, &cfg, &req).unwrap_err();
        assert_eq!(err.code, ErrorCode::DownloadFailed, "{err}");
        assert_eq!(j.download().unwrap().unwrap().offset, 0);
    }

    #[test]
    fn validation_errors_have_their_codes_and_messages() {
        type Change = fn(&mut DownloadRequest);
        let cfg = Config::default();
        let ok = DownloadRequest {
            version: "1.2.3".into(),
            package_url: "https://s3.example.com/ota/tope-update-1.2.3.zip?X-Amz-Signature=abc"
                .into(),
            package_name: "tope-update-1.2.3.zip".into(),
            package_size: 104_857_600,
            package_md5: "0123456789abcdef0123456789abcdef".into(),
        };
        validate(&ok, &cfg).unwrap();
        let cases: &[(Change, &str)] = &[
            (
                |r| r.package_url = "http://s3.example.com/p.zip".into(),
                "package_url must use HTTPS protocol",
            ),
            (
                |r| r.package_url = "ftp://s3.example.com/p.zip".into(),
                "package_url must use HTTPS protocol",
            ),
            (|r| r.package_url = "https://".into(), "package_url"),
            (|r| r.package_url = "https://exa mple.com/p".into(), "package_url is not a valid URL"),
            (
                |r| r.package_url = format!("https://e.com/{}", "a".repeat(URL_BYTES_MAX)),
                "package_url is longer than",
            ),
            (
                |r| r.package_md5 = "0123456789ABCDEF0123456789ABCDEF".into(),
                "package_md5 must be 32-character hexadecimal string",
            ),
            (
                |r| r.package_md5 = "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6".into(),
                "package_md5 must be 32-character hexadecimal string",
            ),
            (
                |r| r.package_md5 = "0123".into(),
                "package_md5 must be 32-character hexadecimal string",
            ),
            (|r| r.version = "1.2".into(), "version must match semantic versioning pattern"),
            (|r| r.version = "v1.2.3".into(), "version must match semantic versioning pattern"),
            (|r| r.package_name = "a/b.zip".into(), "package_name must be a plain file name"),
            (|r| r.package_name = "..".into(), "package_name must be a plain file name"),
            (|r| r.package_name = ".".into(), "package_name must be a plain file name"),
            (|r| r.package_name = String::new(), "package_name must be a plain file name"),
            (
                |r| r.package_name = "../../etc/passwd".into(),
                "package_name must be a plain file name",
            ),
            (|r| r.package_name = "a\nb".into(), "package_name must be a plain file name"),
            (|r| r.package_name = "x".repeat(256), "package_name must be a plain file name"),
            (|r| r.package_size = 0, "package_size must be at least 1"),
            (|r| r.package_size = 3 << 30, "exceeds max_package_bytes"),
        ];
        for (change, message) in cases {
            let mut r = ok.clone();
            change(&mut r);
            let err = validate(&r, &cfg).unwrap_err();
            assert_eq!(err.code, ErrorCode::ValidationError, "{r:?}");
            assert!(err.message.contains(message), "{r:?}: {err}");
        }
    }

    #[test]
    fn plain_http_is_valid_only_with_allow_http() {
        let mut cfg = Config::default();
        let http = DownloadRequest {
            version: "1.2.3".into(),
            package_url: "http://10.0.0.2:8080/p.zip".into(),
            package_name: "p.zip".into(),
            package_size: 1,
            package_md5: "0123456789abcdef0123456789abcdef".into(),
        };
        assert!(validate(&http, &cfg).is_err());
        cfg.download.allow_http = true;
        validate(&http, &cfg).unwrap();
        let ftp = DownloadRequest { package_url: "ftp://10.0.0.2/p.zip".into(), ..http };
        assert_eq!(
            validate(&ftp, &cfg).unwrap_err().message,
            "package_url must use HTTP or HTTPS protocol"
        );
    }

    #[test]
    fn run_validates_before_touching_anything() {
        let (_d, mut cfg, j) = setup();
        cfg.download.allow_http = false;
        let body = package(10);
        let server = PackageServer::start(body.clone(), vec![]);
        let err = go(&j, &cfg, &request(&server, "p.zip", &body)).unwrap_err();
        assert_eq!(err.to_string(), "VALIDATION_ERROR: package_url must use HTTPS protocol");
        assert!(server.seen().is_empty());
        assert_eq!(j.download().unwrap(), None);
    }

    fn verified(offset: u64, verified_at: Option<u64>) -> DownloadRecord {
        DownloadRecord {
            request: DownloadSpec::new(
                "1.2.3",
                "https://e.com/p.zip",
                "p.zip",
                100,
                ExpectedHash::Md5("0123456789abcdef0123456789abcdef".into()),
            ),
            path: "/var/lib/tope-updater/downloads/p.zip".into(),
            offset,
            verified_at_unix_ms: verified_at,
            started_unix_ms: 0,
            updated_unix_ms: 0,
            failed: false,
        }
    }

    #[test]
    fn check_installable_decides_like_the_contract() {
        const H: u64 = MS_PER_HOUR;
        let at = 1_764_153_000_000; // 2025-11-26T10:30:00Z
        let good = verified(100, Some(at));
        let code = |rec: Option<&DownloadRecord>, v: &str, now: u64| {
            check_installable(rec, v, 24, now).map_err(|e| e.code)
        };
        assert_eq!(
            check_installable(Some(&good), "1.2.3", 24, at + H).unwrap(),
            PathBuf::from("/var/lib/tope-updater/downloads/p.zip")
        );
        assert_eq!(code(Some(&good), "1.2.3", at), Ok(PathBuf::from(&good.path)));
        assert_eq!(code(Some(&good), "1.2.3", at + 24 * H - 1).map(|_| ()), Ok(()));
        assert_eq!(code(None, "1.2.3", at), Err(ErrorCode::DownloadIncomplete));
        assert_eq!(
            code(Some(&verified(99, None)), "1.2.3", at),
            Err(ErrorCode::DownloadIncomplete)
        );
        assert_eq!(code(Some(&verified(100, None)), "1.2.3", at), Err(ErrorCode::Md5NotVerified));
        assert_eq!(code(Some(&good), "1.2.4", at), Err(ErrorCode::ValidationError));
        assert_eq!(code(Some(&good), "1.2", at), Err(ErrorCode::ValidationError));
        assert_eq!(code(Some(&good), "1.2.3", at + 24 * H), Err(ErrorCode::PackageExpired));
        // A clock set back before verified_at cannot vouch for the package's age.
        assert_eq!(code(Some(&good), "1.2.3", at - 1), Err(ErrorCode::PackageExpired));
        let expired = check_installable(Some(&good), "1.2.3", 24, at + 25 * H).unwrap_err();
        assert_eq!(
            expired.to_string(),
            "PACKAGE_EXPIRED: Package verified at 2025-11-26T10:30:00Z has exceeded 24-hour trust \
            window, please re-download"
        );
        assert_eq!(
            check_installable(Some(&good), "1.2.4", 24, at).unwrap_err().to_string(),
            "VALIDATION_ERROR: version 1.2.4 does not match the downloaded package version 1.2.3"
        );
        assert_eq!(
            check_installable(None, "1.2.3", 24, at).unwrap_err().to_string(),
            "DOWNLOAD_INCOMPLETE: Cannot install, package download not completed"
        );
    }

    #[test]
    fn iso8601_formats_utc_dates() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(4_102_444_799_999), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn content_range_must_continue_at_the_offset_to_the_end() {
        assert!(continues_at("bytes 100-999/1000", 100, 1000));
        assert!(continues_at("bytes 100-999/*", 100, 1000));
        assert!(!continues_at("bytes 101-999/1000", 100, 1000));
        assert!(!continues_at("bytes 100-998/1000", 100, 1000));
        assert!(!continues_at("bytes 100-999/1001", 100, 1000));
        assert!(!continues_at("bytes 100-999", 100, 1000));
        assert!(!continues_at("", 100, 1000));
        assert!(!continues_at("bytes +100-999/1000", 100, 1000));
    }

    #[test]
    fn urls_are_redacted_in_messages() {
        assert_eq!(
            redact("https://s3.example.com/p.zip?X-Amz-Signature=secret"),
            "https://s3.example.com/p.zip?…"
        );
        assert_eq!(redact("https://s3.example.com/p.zip"), "https://s3.example.com/p.zip");
    }
}
