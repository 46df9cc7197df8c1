//! Automatic collection of backup blobs (SPEC §3 "Committed"; journal-format.md §5.8).
//!
//! Order, so that a power cut at any instant never loses a blob that is still needed and
//! never leaves a record naming a missing blob:
//! 1. the end commit of a transaction (`Committed` or `RolledBack`) drops the last references
//!    (pruned generations; the backups of a rolled-back install) and records what that
//!    leaves unreferenced (`TxRecord.freed_*`);
//! 2. only after that commit is durable, and after the plan copy is gone (so a journal loss
//!    can no longer ask for those backups), the unreferenced blobs are unlinked and the
//!    directory fsynced.
//!
//! A cut between or during the unlinks leaves blobs nothing references; the next collection
//! (the next transaction's end, or `recover` with nothing in flight) removes them. Nothing runs
//! while a transaction is in flight: its plan may need any blob.

use super::Updater;
use crate::engine::generation;
use crate::error::Result;
use crate::journal::CommitEffects;
use crate::store::Garbage;

impl Updater {
    /// What the end commit of the running transaction leaves unreferenced: everything in the
    /// store that neither the kept generations nor the factory baseline need once `fx` (the
    /// `Committed` effects; `None` for a `RolledBack`, which changes no generation) is applied.
    pub(super) fn garbage_after(&self, fx: Option<&CommitEffects>) -> Result<Garbage> {
        let gens = self.journal.generations()?;
        let factory = self.journal.factory()?;
        let keep = match fx {
            Some(fx) => generation::referenced_after(
                &gens,
                &fx.remove_generations,
                fx.new_generation.as_ref(),
                &factory,
                &fx.factory_additions,
            ),
            None => generation::referenced_blobs(&gens, &factory),
        };
        self.store.garbage(&keep)
    }

    /// Removes the blobs nothing needs any more. Called after a transaction's end commit and
    /// the removal of its plan copy, and by `recover` with nothing in flight (what a cut in
    /// the middle left). Never fails the caller: the end is already durable, and what is left
    /// is collected next time.
    pub(super) fn collect_garbage(&self) {
        let collected = (|| {
            if self.journal.active()?.is_some()
                || crate::plancopy::path_in(&self.state_dir).exists()
            {
                return Ok(None);
            }
            let garbage = self.garbage_after(None)?;
            self.store.remove(&garbage).map(Some)
        })();
        match collected {
            Ok(Some(s)) if s.removed > 0 => {
                tracing::info!(
                    removed = s.removed,
                    bytes = s.removed_bytes,
                    kept = s.kept,
                    "backup blobs collected"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not collect backup blobs; the next transaction \
                    tries again");
            }
        }
    }
}
