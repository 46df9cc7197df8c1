//! Typed errors mapped to the stable codes of SPEC §6. Codes are never renumbered or reused.

use std::fmt;
use std::path::Path;

/// The stable error codes shared by the CLI, the API and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// A request or configuration value is malformed.
    ValidationError,
    /// Another transaction holds the state lock.
    OperationInProgress,
    DownloadIncomplete,
    Md5NotVerified,
    PackageExpired,
    Md5Mismatch,
    /// Content does not match the blake3 the manifest or plan promised.
    HashMismatch,
    SignatureInvalid,
    /// Not enough free space (statvfs preflight or ENOSPC).
    DiskFull,
    /// The ZIP container is malformed or hostile.
    InvalidPackage,
    /// `manifest.json` is missing, malformed or inconsistent.
    InvalidManifest,
    /// A destination lies outside the allowed roots or is not a regular file.
    PathNotAllowed,
    /// Downgrade without `--allow-downgrade`, or not the version the caller asked for.
    VersionMismatch,
    /// The package's `compatible` does not match this device.
    Incompatible,
    DownloadFailed,
    ServiceStopFailed,
    ProcessKillFailed,
    ServiceStartFailed,
    PostCmdFailed,
    /// Writing, backing up or swapping files failed.
    DeploymentFailed,
    /// A rollback could not complete: an operator is needed.
    RollbackFailed,
    /// No earlier generation to return to.
    NothingToRollBack,
    /// The journal cannot be opened or a record does not decode.
    JournalCorrupt,
    /// A bug or an unexpected environment.
    InternalError,
    /// An API request refused before any handler ran: a foreign `Origin`, a `Host` that is
    /// not this device (DNS rebinding), a body that is not `application/json`, or a caller
    /// whose uid is not in `api.allowed_uids` (SECURITY.md).
    RequestRefused,
    /// The package server's file is not `package_size` bytes long (what the legacy service
    /// reported; the download fails at once, nothing kept).
    PackageSizeMismatch,
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
            Some(libc_enospc) if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT => ErrorCode::DiskFull,
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
