//! The destination policy (SPEC §2): absolute, normalised, under an allowed root, and not
//! reachable only through a symlink that leaves the allowed roots.
//!
//! Checked paths are returned *resolved* (symlinks in existing ancestors replaced by their
//! targets), so two spellings of one file are one target and the journal holds no symlinks.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::{PATH_BYTES_MAX, PATH_COMPONENT_BYTES_MAX};
use std::path::{Component, Path, PathBuf};

fn not_allowed(path: &str, why: &str) -> Error {
    Error::new(ErrorCode::PathNotAllowed, format!("destination {path:?} {why}"))
}

/// Lexical checks on an absolute destination: `/`-rooted, no `.`, `..` or empty components,
/// no NUL, no trailing slash, bounded length.
pub fn check_absolute(s: &str) -> Result<PathBuf> {
    if s.len() > PATH_BYTES_MAX {
        return Err(not_allowed(s, "is too long"));
    }
    if s.contains('\0') {
        return Err(not_allowed(s, "contains NUL"));
    }
    let Some(body) = s.strip_prefix('/') else {
        return Err(not_allowed(s, "is not absolute"));
    };
    if body.is_empty() {
        return Err(not_allowed(s, "is the root directory"));
    }
    for c in body.split('/') {
        if c.is_empty() {
            return Err(not_allowed(s, "has an empty component"));
        }
        if c == "." || c == ".." {
            return Err(not_allowed(s, "has a '.' or '..' component"));
        }
        if c.len() > PATH_COMPONENT_BYTES_MAX {
            return Err(not_allowed(s, "has a component longer than 255 bytes"));
        }
    }
    Ok(PathBuf::from(s))
}

/// Resolved parent directories, by their lexical form.
#[derive(Debug, Default)]
pub struct ResolveCache {
    parents: std::collections::HashMap<PathBuf, PathBuf>,
}

/// The configured allowed roots, each with its resolved form when it exists.
#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<(PathBuf, PathBuf)>,
}

impl AllowedRoots {
    pub fn new(configured: &[PathBuf]) -> AllowedRoots {
        let roots = configured
            .iter()
            .map(|r| {
                // A root may itself be a symlink (/opt/tope -> /data/tope): resolve it fully.
                let resolved = std::fs::canonicalize(r)
                    .or_else(|_| resolve_existing_prefix(r).map_err(|_| ()))
                    .unwrap_or_else(|()| r.clone());
                (r.clone(), resolved)
            })
            .collect();
        AllowedRoots { roots }
    }

    /// Checks `dst` and returns its resolved form.
    pub fn check(&self, dst: &str) -> Result<PathBuf> {
        self.check_cached(dst, &mut ResolveCache::default())
    }

    /// `check`, resolving each parent directory once per cache (thousands of files of one
    /// directory module share a handful of parents).
    pub fn check_cached(&self, dst: &str, cache: &mut ResolveCache) -> Result<PathBuf> {
        let path = check_absolute(dst)?;
        let lexically_inside = self.roots.iter().any(|(root, _)| is_strictly_under(&path, root));
        if !lexically_inside {
            return Err(not_allowed(dst, "is not under an allowed root"));
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(not_allowed(dst, "has no parent directory"));
        };
        let resolved_parent = if let Some(r) = cache.parents.get(parent) {
            r.clone()
        } else {
            let r = resolve_existing_prefix(&path)
                .map(|p| p.parent().map(Path::to_path_buf).unwrap_or(p))
                .map_err(|e| match e {
                    // The path is allowed, but this device holds a file where the package
                    // needs a directory: the package cannot be deployed here (what the legacy
                    // service said, DEPLOYMENT_FAILED), found before anything is touched.
                    PrefixError::NotADirectory { existing, resolved }
                        if self
                            .roots
                            .iter()
                            .any(|(_, root)| is_strictly_under(&resolved, root)) =>
                    {
                        Error::new(
                            ErrorCode::DeploymentFailed,
                            format!(
                                "destination {dst:?} cannot be created: {} is not a directory",
                                existing.display()
                            ),
                        )
                    }
                    PrefixError::NotADirectory { existing, resolved } => not_allowed(
                        dst,
                        &format!(
                            "resolves through {} to {}, outside the allowed roots",
                            existing.display(),
                            resolved.display()
                        ),
                    ),
                    PrefixError::Io(e) => not_allowed(dst, &format!("cannot be resolved: {e}")),
                })?;
            cache.parents.insert(parent.to_path_buf(), r.clone());
            r
        };
        let resolved = resolved_parent.join(name);
        if !self.roots.iter().any(|(_, root)| is_strictly_under(&resolved, root)) {
            return Err(not_allowed(
                dst,
                &format!(
                    "resolves through a symlink to {} outside the allowed roots",
                    resolved.display()
                ),
            ));
        }
        match std::fs::symlink_metadata(&resolved) {
            Ok(m) if m.file_type().is_file() => Ok(resolved),
            Ok(m) if m.file_type().is_symlink() => Err(not_allowed(dst, "is a symlink")),
            Ok(_) => Err(not_allowed(dst, "exists and is not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(resolved),
            Err(e) => Err(not_allowed(dst, &e.to_string())),
        }
    }
}

fn is_strictly_under(path: &Path, root: &Path) -> bool {
    path != root && path.starts_with(root)
}

/// Why the existing prefix of a path cannot hold it.
enum PrefixError {
    /// The longest existing ancestor (`resolved` after symlinks) is not a directory.
    NotADirectory {
        existing: PathBuf,
        resolved: PathBuf,
    },
    Io(std::io::Error),
}

/// Resolves symlinks in the longest existing proper prefix of `path` (the last component is
/// kept as is, so a symlink *at* the destination is seen by the caller, not followed), then
/// appends the missing components. An existing non-directory ancestor is an error.
fn resolve_existing_prefix(path: &Path) -> Result<PathBuf, PrefixError> {
    let comps: Vec<Component> = path.components().collect();
    let mut existing = PathBuf::from("/");
    let mut rest = Vec::new();
    for (i, c) in comps.iter().enumerate().skip(1) {
        let candidate = existing.join(c);
        let is_last = i + 1 == comps.len();
        // symlink_metadata, not exists(): a dangling symlink exists too, and must be
        // resolved (and fail) rather than be taken for a directory still to be created.
        if rest.is_empty() && !is_last && std::fs::symlink_metadata(&candidate).is_ok() {
            existing = candidate;
        } else {
            rest.push(c.as_os_str().to_owned());
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).map_err(PrefixError::Io)?;
    if !resolved.is_dir() {
        return Err(PrefixError::NotADirectory { existing, resolved });
    }
    for r in rest {
        resolved.push(r);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_rules() {
        for bad in [
            "opt/tope/a",
            "/opt/tope/../etc/passwd",
            "/opt/tope//a",
            "/opt/tope/./a",
            "/opt/tope/a/",
            "/",
            "/opt/tope/a\0b",
        ] {
            assert_eq!(check_absolute(bad).unwrap_err().code, ErrorCode::PathNotAllowed, "{bad:?}");
        }
        assert!(check_absolute("/opt/tope/a").is_ok());
    }

    #[test]
    fn outside_roots_and_symlink_escapes_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(root.join("inner"), root.join("alias")).unwrap();
        std::fs::create_dir_all(root.join("inner")).unwrap();
        let roots = AllowedRoots::new(std::slice::from_ref(&root));
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert!(roots.check(&s(&root.join("a/b"))).is_ok());
        assert_eq!(roots.check(&s(&root)).unwrap_err().code, ErrorCode::PathNotAllowed);
        assert_eq!(
            roots.check(&s(&outside.join("x"))).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        assert_eq!(
            roots.check(&s(&root.join("escape/x"))).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        // A symlink that stays inside the root resolves to the real path.
        assert_eq!(
            roots.check(&s(&root.join("alias/x"))).unwrap(),
            std::fs::canonicalize(root.join("inner")).unwrap().join("x")
        );
        // A dangling symlink on the way is refused, not taken for a directory to create.
        std::os::unix::fs::symlink(outside.join("nowhere"), root.join("dangling")).unwrap();
        assert_eq!(
            roots.check(&s(&root.join("dangling/x"))).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        // A regular file where the package needs a directory: allowed, but not deployable.
        std::fs::write(root.join("file"), b"x").unwrap();
        let e = roots.check(&s(&root.join("file/x"))).unwrap_err();
        assert_eq!(e.code, ErrorCode::DeploymentFailed, "{e}");
        assert!(e.message.contains("is not a directory"), "{e}");
        // ... and a symlink to a file outside the roots is still outside.
        std::fs::write(outside.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.join("file"), root.join("to-file")).unwrap();
        assert_eq!(
            roots.check(&s(&root.join("to-file/x"))).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
        // A symlink at the destination itself is refused, not followed.
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        assert_eq!(
            roots.check(&s(&root.join("link"))).unwrap_err().code,
            ErrorCode::PathNotAllowed
        );
    }
}
