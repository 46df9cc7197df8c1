//! The plan of one transaction: for every target path its old state and its new state.
//! Journaled before any side effect; recovery needs nothing else to decide.

use serde::{Deserialize, Serialize};

pub use super::Hash;

/// Content and attributes of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub hash: Hash,
    pub size: u64,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The state of a target path: absent, or a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathState {
    Absent,
    File(FileMeta),
}

impl PathState {
    pub fn hash(&self) -> Option<Hash> {
        match self {
            PathState::Absent => None,
            PathState::File(m) => Some(m.hash),
        }
    }
}

/// New content of a target. `hash` is `None` until staging has computed it, for legacy
/// manifests that carry no hashes; it is filled in before any target is swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFile {
    pub hash: Option<Hash>,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewState {
    Absent,
    File(NewFile),
}

impl NewState {
    /// The new state as a `PathState`, once its hash is known.
    pub fn settled(&self) -> Option<PathState> {
        match self {
            NewState::Absent => Some(PathState::Absent),
            NewState::File(f) => f.hash.map(|hash| {
                PathState::File(FileMeta {
                    hash,
                    size: f.size,
                    mode: f.mode,
                    uid: f.uid,
                    gid: f.gid,
                })
            }),
        }
    }
}

/// Where new content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A ZIP entry of the package, by name.
    Package { entry: String },
    /// The backup store, by the new hash (rollbacks).
    Blob,
    /// Nothing: the new state is `Absent`.
    Nothing,
    /// Built on the device (a delta package): the content hashing to `base`, read from the
    /// target path itself (`live`: its old content, which nothing changes before the swap)
    /// or from the backup store, then `patch` applied to it, or copied as it is.
    Delta { base: Hash, live: bool, patch: Option<PatchRef> },
}

/// A patch entry of the package and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRef {
    pub entry: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Absolute, normalised, UTF-8.
    pub path: String,
    /// Index into `Plan::modules`.
    pub module: u32,
    pub old: PathState,
    pub new: NewState,
    pub source: Source,
}

impl Target {
    /// Whether the path already holds exactly its new state (content, mode and owner): such a
    /// target is not staged, not swapped and not rewritten; verification still reads it.
    pub fn unchanged(&self) -> bool {
        matches!(self.old, PathState::File(_)) && self.new.settled() == Some(self.old)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub path: String,
    pub blake3: Hash,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackTarget {
    /// A kept generation, by id.
    Generation(u64),
    /// The content every path had before the first transaction that touched it.
    Factory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxKind {
    Install { package: PackageRef },
    Rollback { to: RollbackTarget },
}

/// A module as the manifest described it; recorded so that service control and post
/// commands can be planned from the journal alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulePlan {
    pub name: String,
    pub process_name: Option<String>,
    pub restart_order: Option<i64>,
    pub post_cmds: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub tx_id: u64,
    pub kind: TxKind,
    pub from_version: Option<String>,
    /// `None` for a rollback to the factory baseline.
    pub to_version: Option<String>,
    pub modules: Vec<ModulePlan>,
    /// Sorted by path, unique.
    pub targets: Vec<Target>,
    /// Directories this transaction creates, parents first. Removed again (when empty) on
    /// rollback.
    pub created_dirs: Vec<String>,
    /// Directories a rollback transaction removes when empty after its swap, deepest first.
    pub removed_dirs: Vec<String>,
    /// Whether the `ServicesStopped`/`ServicesStarted` phases have work. Service control is
    /// not part of this build, so the planner sets it to false.
    pub controls_services: bool,
    /// Whether the `PostCommands` phase has work (false in this build, see above).
    pub runs_post_cmds: bool,
}

impl Plan {
    /// All new hashes known (staging finished or the manifest gave them).
    pub fn new_hashes_known(&self) -> bool {
        self.targets.iter().all(|t| t.new.settled().is_some())
    }

    /// Bytes of new content, for progress and the free-space check.
    pub fn new_bytes(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| match t.new {
                NewState::File(f) => f.size,
                NewState::Absent => 0,
            })
            .sum()
    }
}

/// What rolling back one target needs, given its old state and what is there now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreAction {
    /// The path already holds its old state.
    Nothing,
    /// The path did not exist before: remove what is there.
    Remove,
    /// Put the old content back from the backup store (and its mode and owner).
    Restore,
}

pub fn restore_action(old: &PathState, current: &PathState) -> RestoreAction {
    match (old, current) {
        (PathState::Absent, PathState::Absent) => RestoreAction::Nothing,
        (PathState::Absent, PathState::File(_)) => RestoreAction::Remove,
        (PathState::File(o), PathState::File(c)) if o == c => RestoreAction::Nothing,
        (PathState::File(_), _) => RestoreAction::Restore,
    }
}

/// What swapping one target needs, given whether its staged file is there and what the
/// target holds now (`current` is consulted only when the staged file is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapAction {
    /// Rename the staged file over the target.
    Rename,
    /// Remove the target (new state is absent).
    Remove,
    /// Already in its new state (an earlier attempt renamed it).
    Done,
    /// Neither staged nor swapped: the input is lost, roll back.
    Lost,
}

pub fn swap_action(
    new: &NewState,
    staged_present: bool,
    current: Option<&PathState>,
) -> SwapAction {
    match (new, staged_present) {
        (NewState::Absent, _) => match current {
            Some(PathState::Absent) => SwapAction::Done,
            _ => SwapAction::Remove,
        },
        (NewState::File(_), true) => SwapAction::Rename,
        (NewState::File(_), false) => match (new.settled(), current) {
            (Some(want), Some(have)) if want == *have => SwapAction::Done,
            _ => SwapAction::Lost,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(h: u8, mode: u32) -> PathState {
        PathState::File(FileMeta { hash: Hash([h; 32]), size: 1, mode, uid: 0, gid: 0 })
    }

    fn new_file(h: Option<u8>) -> NewState {
        NewState::File(NewFile {
            hash: h.map(|h| Hash([h; 32])),
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
        })
    }

    #[test]
    fn restore_removes_files_that_did_not_exist_before() {
        assert_eq!(restore_action(&PathState::Absent, &file(1, 0o644)), RestoreAction::Remove);
        assert_eq!(restore_action(&PathState::Absent, &PathState::Absent), RestoreAction::Nothing);
    }

    #[test]
    fn restore_compares_content_and_mode() {
        assert_eq!(restore_action(&file(1, 0o644), &file(1, 0o644)), RestoreAction::Nothing);
        assert_eq!(restore_action(&file(1, 0o644), &file(2, 0o644)), RestoreAction::Restore);
        assert_eq!(restore_action(&file(1, 0o644), &file(1, 0o755)), RestoreAction::Restore);
        assert_eq!(restore_action(&file(1, 0o644), &PathState::Absent), RestoreAction::Restore);
    }

    #[test]
    fn swap_prefers_the_staged_file_and_detects_lost_input() {
        assert_eq!(swap_action(&new_file(Some(1)), true, None), SwapAction::Rename);
        let swapped =
            PathState::File(FileMeta { hash: Hash([1; 32]), size: 1, mode: 0o644, uid: 0, gid: 0 });
        assert_eq!(swap_action(&new_file(Some(1)), false, Some(&swapped)), SwapAction::Done);
        assert_eq!(swap_action(&new_file(Some(1)), false, Some(&file(9, 0o644))), SwapAction::Lost);
        assert_eq!(swap_action(&new_file(None), false, Some(&swapped)), SwapAction::Lost);
        assert_eq!(
            swap_action(&NewState::Absent, false, Some(&file(9, 0o644))),
            SwapAction::Remove
        );
        assert_eq!(
            swap_action(&NewState::Absent, false, Some(&PathState::Absent)),
            SwapAction::Done
        );
    }
}
