//! Read-only reports over the journal and the live files: `status` and `verify`.

use crate::engine::generation::{self, Generation};
use crate::engine::{PathState, Phase};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::journal::Journal;
use crate::journal::records::TxRecord;
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::TxAction;

/// Live files against the current generation (or the factory baseline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub version: Option<String>,
    pub checked: usize,
    pub mismatches: Vec<String>,
}

pub fn verify_live(journal: &Journal) -> Result<VerifyReport> {
    let gens = journal.generations()?;
    let id = journal.current_generation_id()?;
    let current = gens.iter().find(|g| Some(g.id) == id);
    let factory = journal.factory()?;
    let mut mismatches = Vec::new();
    let paths = generation::managed_paths(current, &factory);
    for path in &paths {
        let want = generation::desired_state(path, current, &factory);
        match fsutil::observe(Path::new(path)) {
            Ok(have) if have == want => {}
            Ok(PathState::Absent) => mismatches.push(format!("{path}: missing")),
            Ok(_) if want == PathState::Absent => {
                mismatches.push(format!("{path}: should not exist"));
            }
            Ok(_) => mismatches.push(format!("{path}: content, mode or owner differs")),
            Err(e) => mismatches.push(format!("{path}: {e}")),
        }
    }
    Ok(VerifyReport {
        version: current.map(|g| g.version.clone()),
        checked: paths.len(),
        mismatches,
    })
}

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub current: Option<GenerationSummary>,
    pub generations: Vec<GenerationSummary>,
    pub factory_paths: usize,
    pub in_flight: Option<InFlight>,
    pub last: Option<TxRecord>,
    /// The trial install awaiting confirmation.
    pub trial: Option<TrialStatus>,
    /// The backup store: what the kept generations and the factory baseline hold there.
    pub backups: BackupUsage,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BackupUsage {
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialStatus {
    pub tx: u64,
    pub version: String,
    /// Boots it has run in, the install's own included.
    pub boots: u32,
    pub max_boots: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationSummary {
    pub id: u64,
    pub version: String,
    pub tx: u64,
    pub files: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InFlight {
    pub tx: u64,
    pub kind: TxAction,
    pub phase: Phase,
    pub to_version: Option<String>,
    pub error: Option<Error>,
}

pub fn status(journal: &Journal, max_trial_boots: u32) -> Result<StatusReport> {
    let gens = journal.generations()?;
    let id = journal.current_generation_id()?;
    let summary = |g: &Generation| GenerationSummary {
        id: g.id,
        version: g.version.clone(),
        tx: g.tx_id,
        files: g.files.len(),
    };
    let in_flight = journal.active()?.map(|(rec, plan)| InFlight {
        tx: rec.id,
        kind: TxAction::of(&plan.kind),
        phase: rec.phase,
        to_version: rec.to_version,
        error: rec.error,
    });
    let last = journal
        .history(usize::MAX)?
        .into_iter()
        .find(|r| r.phase.is_terminal() && r.phase != Phase::RollbackFailed);
    Ok(StatusReport {
        current: gens.iter().find(|g| Some(g.id) == id).map(summary),
        generations: gens.iter().map(summary).collect(),
        factory_paths: journal.factory()?.len(),
        in_flight,
        last,
        trial: journal.trial()?.map(|t| TrialStatus {
            tx: t.tx,
            version: t.version,
            boots: t.boots,
            max_boots: max_trial_boots,
        }),
        backups: crate::store::usage_in(journal.state_dir())
            .map(|(blobs, bytes)| BackupUsage { blobs, bytes })?,
    })
}
