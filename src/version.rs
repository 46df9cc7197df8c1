//! Package versions: `^\d+\.\d+\.\d+$`, compared numerically.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::VERSION_BYTES_MAX;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(s: &str) -> Result<Version> {
        let bad = || {
            Error::new(
                ErrorCode::InvalidManifest,
                format!("version {s:?} is not MAJOR.MINOR.PATCH"),
            )
        };
        if s.is_empty() || s.len() > VERSION_BYTES_MAX {
            return Err(bad());
        }
        let mut parts = s.split('.');
        let mut next = || -> Result<u64> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u64>().map_err(|_| bad())
        };
        let v = Version { major: next()?, minor: next()?, patch: next()? };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_numerically() {
        assert!(Version::parse("1.10.0").unwrap() > Version::parse("1.9.9").unwrap());
        assert_eq!(Version::parse("0.0.1").unwrap().to_string(), "0.0.1");
    }

    #[test]
    fn rejects_anything_but_three_numbers() {
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "v1.2.3",
            "1..3",
            "1.2.3-rc1",
            " 1.2.3",
            "99999999999999999999.0.0",
        ] {
            assert_eq!(
                Version::parse(bad).unwrap_err().code,
                ErrorCode::InvalidManifest,
                "{bad:?}"
            );
        }
    }
}
