//! The wall clock and the boot id: leaf helpers that every layer reads (records' times, the
//! download trust window, reports, trial boots), so that none of them depends on the driver.

use crate::error::{Error, ErrorCode, Result};

/// Wall-clock milliseconds since the epoch (informational, and the download trust window).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The kernel's id of the current boot; a new one every boot.
pub fn boot_id() -> Result<String> {
    #[cfg(feature = "failpoints")]
    if let Some(p) = std::env::var_os("TOPE_BOOT_ID_FILE") {
        // Test seam: tests cannot reboot the machine they run on (the systemd VM test does).
        let p = std::path::PathBuf::from(p);
        return std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .map_err(|e| Error::io(ErrorCode::InternalError, "read", &p, &e));
    }
    let p = std::path::Path::new("/proc/sys/kernel/random/boot_id");
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Error::io(ErrorCode::InternalError, "read", p, &e))
}
