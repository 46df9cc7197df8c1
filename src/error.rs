//! Typed errors mapped to the stable codes of SPEC §6. Codes are never renumbered or reused.

use std::fmt;
use std::path::Path;

/// The stable error codes shared by the CLI, the API and reports.
/// The discriminants are the variants' bincode indexes in journal records (journal-format.md):
/// never renumber or reuse one; a new code takes the next number. Pinned by
/// `journal::records::tests::on_disk_enum_indexes_are_their_discriminants`.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// A request or configuration value is malformed.
    ValidationError = 0,
    /// Another transaction holds the state lock.
    OperationInProgress = 1,
    DownloadIncomplete = 2,
    Md5NotVerified = 3,
    PackageExpired = 4,
    Md5Mismatch = 5,
    /// Content does not match the blake3 the manifest or plan promised.
    HashMismatch = 6,
    SignatureInvalid = 7,
    /// Not enough free space (statvfs preflight or ENOSPC).
    DiskFull = 8,
    /// The ZIP container is malformed or hostile.
    InvalidPackage = 9,
    /// `manifest.json` is missing, malformed or inconsistent.
    InvalidManifest = 10,
    /// A destination lies outside the allowed roots or is not a regular file.
    PathNotAllowed = 11,
    /// Downgrade without `--allow-downgrade`, or not the version the caller asked for.
    VersionMismatch = 12,
    /// The package's `compatible` does not match this device.
    Incompatible = 13,
    DownloadFailed = 14,
    ServiceStopFailed = 15,
    ProcessKillFailed = 16,
    ServiceStartFailed = 17,
    PostCmdFailed = 18,
    /// Writing, backing up or swapping files failed.
    DeploymentFailed = 19,
    /// A rollback could not complete: an operator is needed.
    RollbackFailed = 20,
    /// No earlier generation to return to.
    NothingToRollBack = 21,
    /// The journal cannot be opened or a record does not decode.
    JournalCorrupt = 22,
    /// A bug or an unexpected environment.
    InternalError = 23,
    /// An API request refused before any handler ran: a foreign `Origin`, a `Host` that is
    /// not this device (DNS rebinding), a body that is not `application/json`, or a caller
    /// whose uid is not in `api.allowed_uids` (SECURITY.md).
    RequestRefused = 24,
    /// The package server's file is not `package_size` bytes long (what the legacy service
    /// reported; the download fails at once, nothing kept).
    PackageSizeMismatch = 25,
    /// A delta package builds a file from content this device holds neither live nor in its
    /// backup store (a drifted or foreign device): nothing touched; the full package would do.
    DeltaBaseMissing = 26,
    /// The fleet server canceled the update before anything was swapped: rolled back (only
    /// an install the DDI client runs can be canceled; SPEC §6 does not list it yet).
    Canceled = 27,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::OperationInProgress => "OPERATION_IN_PROGRESS",
            ErrorCode::DownloadIncomplete => "DOWNLOAD_INCOMPLETE",
            ErrorCode::Md5NotVerified => "MD5_NOT_VERIFIED",
            ErrorCode::PackageExpired => "PACKAGE_EXPIRED",
            ErrorCode::Md5Mismatch => "MD5_MISMATCH",
            ErrorCode::HashMismatch => "HASH_MISMATCH",
            ErrorCode::SignatureInvalid => "SIGNATURE_INVALID",
            ErrorCode::DiskFull => "DISK_FULL",
            ErrorCode::InvalidPackage => "INVALID_PACKAGE",
            ErrorCode::InvalidManifest => "INVALID_MANIFEST",
            ErrorCode::PathNotAllowed => "PATH_NOT_ALLOWED",
            ErrorCode::VersionMismatch => "VERSION_MISMATCH",
            ErrorCode::Incompatible => "INCOMPATIBLE",
            ErrorCode::DownloadFailed => "DOWNLOAD_FAILED",
            ErrorCode::ServiceStopFailed => "SERVICE_STOP_FAILED",
            ErrorCode::ProcessKillFailed => "PROCESS_KILL_FAILED",
            ErrorCode::ServiceStartFailed => "SERVICE_START_FAILED",
            ErrorCode::PostCmdFailed => "POST_CMD_FAILED",
            ErrorCode::DeploymentFailed => "DEPLOYMENT_FAILED",
            ErrorCode::RollbackFailed => "ROLLBACK_FAILED",
            ErrorCode::NothingToRollBack => "NOTHING_TO_ROLL_BACK",
            ErrorCode::JournalCorrupt => "JOURNAL_CORRUPT",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::RequestRefused => "REQUEST_REFUSED",
            ErrorCode::PackageSizeMismatch => "PACKAGE_SIZE_MISMATCH",
            ErrorCode::DeltaBaseMissing => "DELTA_BASE_MISSING",
            ErrorCode::Canceled => "CANCELED",
        }
    }

    /// Codes that mean "the package (or request) was refused": when such an error ends a
    /// transaction before any target was swapped, the CLI exits 3 (nothing touched).
    pub fn is_rejection(self) -> bool {
        matches!(
            self,
            ErrorCode::ValidationError
                | ErrorCode::HashMismatch
                | ErrorCode::SignatureInvalid
                | ErrorCode::DiskFull
                | ErrorCode::InvalidPackage
                | ErrorCode::InvalidManifest
                | ErrorCode::PathNotAllowed
                | ErrorCode::VersionMismatch
                | ErrorCode::Incompatible
                | ErrorCode::DeltaBaseMissing
                // At planning: the package stops a service this device's backend could not
                // start again. (A start that fails after the swap is never "nothing touched".)
                | ErrorCode::ServiceStartFailed
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operating error: a stable code plus a message that names the operation and the path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }

    /// An I/O failure during `op` on `path`. ENOSPC/EDQUOT become `DISK_FULL` whatever the
    /// caller's code, because the operator's remedy is the same.
    pub fn io(code: ErrorCode, op: &str, path: &Path, err: &std::io::Error) -> Error {
        let code = match err.raw_os_error() {
            Some(libc_enospc)
                if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
            {
                ErrorCode::DiskFull
            }
            _ => code,
        };
        Error::new(code, format!("{op} {}: {err}", path.display()))
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorCode::InternalError, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}
