//! The journal: a redb database in `<state_dir>/journal.redb`.
//!
//! **Architecture invariant:** only this module knows redb. Every method that writes is one
//! redb write transaction committed with `Durability::Immediate` (one fdatasync): when it
//! returns, the change survives a power cut. The on-disk format is specified in
//! `journal-format.md`, which changes in the same commit as this file.

pub mod ddi;
pub mod downloads;
pub mod outbox;
pub mod records;

use crate::engine::generation::{Factory, Generation};
use crate::engine::known::KnownFile;
use crate::engine::trial::Trial;
use crate::engine::{Hash, PathState, Plan};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::limits::HISTORY_TX_MAX;
use records::{Size, TxRecord, decode, encode};
use redb::{
    Database, Durability, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle, WriteTransaction,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Bumped on any incompatible change of tables, keys or records (see journal-format.md).
pub const FORMAT_VERSION: u32 = 1;
pub const JOURNAL_FILE: &str = "journal.redb";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const TRANSACTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("transactions");
const PLANS: TableDefinition<u64, &[u8]> = TableDefinition::new("plans");
const GENERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("generations");
const FACTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("factory");
const FAILED_PACKAGES: TableDefinition<&[u8], u64> = TableDefinition::new("failed_packages");
/// Added after format 1 was first released: `open` creates it in older journals.
const TRIAL: TableDefinition<&str, &[u8]> = TableDefinition::new("trial");
/// Added after format 1 was first released, like `trial`: path → `KnownFile` (the content
/// hash of a file the engine verified, with its stat signature then; `engine::known`).
const KNOWN_FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("known_files");
/// The only key of `trial`.
const CURRENT_TRIAL: &str = "current";

/// Keys of the `counters` table.
const NEXT_TX_ID: &str = "next_tx_id";
const NEXT_GENERATION_ID: &str = "next_generation_id";
const ACTIVE_TX: &str = "active_tx";
const CURRENT_GENERATION: &str = "current_generation";

enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

pub struct Journal {
    db: Db,
    path: PathBuf,
}

/// What the `Committed` commit changes besides the transaction record.
pub struct CommitEffects {
    pub new_generation: Option<Generation>,
    /// The generation current afterwards (`None`: the factory baseline).
    pub current: Option<u64>,
    pub remove_generations: Vec<u64>,
    pub factory_additions: Vec<(String, PathState)>,
    /// A package that now installed successfully is no longer "failed".
    pub clear_failed_package: Option<Hash>,
    /// A package to remember as failed (an expired trial being rolled back), with the
    /// transaction that installed it.
    pub mark_failed_package: Option<(Hash, u64)>,
    /// The trial after this commit: any commit ends the current trial; an install with
    /// `confirm_required` begins a new one.
    pub trial: Option<Trial>,
    /// Known-file records: put (`Some`) for targets verified with a settled signature,
    /// removed (`None`) for every other target of the transaction.
    pub known_files: Vec<(String, Option<KnownFile>)>,
}

/// Tables added to format 1 after its first release (journal-format.md §7).
fn create_later_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(TRIAL)?;
    wt.open_table(KNOWN_FILES)?;
    downloads::create_tables(wt)?;
    outbox::create_tables(wt)?;
    ddi::create_tables(wt)
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::JournalCorrupt, format!("journal {}: {e}", path.display()))
}

fn map_open_error(path: &Path, e: redb::DatabaseError) -> Error {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => Error::new(
            ErrorCode::OperationInProgress,
            "the journal is open in another tope-updater process",
        ),
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Error::io(ErrorCode::InternalError, "open journal", path, &io)
        }
        other => corrupt(path, other),
    }
}

impl Journal {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join(JOURNAL_FILE)
    }

    /// Opens the journal for writing, creating it atomically if it does not exist. Integrity
    /// is checked on open: a damaged file is `JOURNAL_CORRUPT`, never trusted.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        let path = Journal::path_in(state_dir);
        if !path.exists() {
            Journal::create_atomically(state_dir, &path)?;
        }
        let db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .open(&path)
            .map_err(|e| map_open_error(&path, e))?;
        let j = Journal { db: Db::ReadWrite(db), path };
        j.check_format()?;
        j.add_missing_tables()?;
        Ok(j)
    }

    /// Tables added to format 1 after its release are created on first open for writing
    /// (journal-format.md §7: adding a table is compatible). Readers treat them as empty.
    fn add_missing_tables(&self) -> Result<()> {
        let rt = self.read()?;
        let names: Vec<String> =
            rt.list_tables().map_err(|e| self.storage(e))?.map(|h| h.name().to_string()).collect();
        drop(rt);
        if [TRIAL.name(), KNOWN_FILES.name(), downloads::DOWNLOADS.name(), outbox::OUTBOX.name()]
            .iter()
            .all(|t| names.iter().any(|n| n == t))
        {
            return Ok(());
        }
        let wt = self.write()?;
        create_later_tables(&wt).map_err(|e| self.storage(e))?;
        self.commit(wt)
    }

    /// Opens an existing journal read-only (for `status`, `history`, `journal`, `verify`).
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Journal>> {
        let path = Journal::path_in(state_dir);
        if !path.exists() {
            return Ok(None);
        }
        let db =
            redb::Builder::new().open_read_only(&path).map_err(|e| map_open_error(&path, e))?;
        let j = Journal { db: Db::ReadOnly(db), path };
        j.check_format()?;
        Ok(Some(j))
    }

    /// A crash inside `Database::create` leaves a file redb cannot open. So the journal is
    /// built under a temporary name, committed (fdatasync), renamed into place, and the
    /// directory fsynced (the rename survives a power cut): `journal.redb` is either absent
    /// or complete.
    fn create_atomically(state_dir: &Path, path: &Path) -> Result<()> {
        let tmp = state_dir.join(format!("{JOURNAL_FILE}.tmp"));
        fsutil::remove_if_present(&tmp)?;
        let db = redb::Builder::new().create(&tmp).map_err(|e| map_open_error(&tmp, e))?;
        let wt = db.begin_write().map_err(|e| corrupt(&tmp, e))?;
        {
            let mut meta = wt.open_table(META).map_err(|e| corrupt(&tmp, e))?;
            meta.insert("format_version", FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(|e| corrupt(&tmp, e))?;
            meta.insert(
                "created_by",
                concat!("tope-updater ", env!("CARGO_PKG_VERSION")).as_bytes(),
            )
            .map_err(|e| corrupt(&tmp, e))?;
            let mut c = wt.open_table(COUNTERS).map_err(|e| corrupt(&tmp, e))?;
            c.insert(NEXT_TX_ID, 1).map_err(|e| corrupt(&tmp, e))?;
            c.insert(NEXT_GENERATION_ID, 1).map_err(|e| corrupt(&tmp, e))?;
            wt.open_table(TRANSACTIONS).map_err(|e| corrupt(&tmp, e))?;
            wt.open_table(PLANS).map_err(|e| corrupt(&tmp, e))?;
            wt.open_table(GENERATIONS).map_err(|e| corrupt(&tmp, e))?;
            wt.open_table(FACTORY).map_err(|e| corrupt(&tmp, e))?;
            wt.open_table(FAILED_PACKAGES).map_err(|e| corrupt(&tmp, e))?;
            create_later_tables(&wt).map_err(|e| corrupt(&tmp, e))?;
        }
        wt.commit().map_err(|e| corrupt(&tmp, e))?;
        drop(db);
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(ErrorCode::InternalError, "rename", path, &e))?;
        fsutil::fsync_dir(state_dir)
    }

    fn check_format(&self) -> Result<()> {
        let rt = self.read()?;
        let meta = rt.open_table(META).map_err(|e| self.storage(e))?;
        let v = meta
            .get("format_version")
            .map_err(|e| self.storage(e))?
            .ok_or_else(|| self.corrupt("no format_version"))?;
        let bytes: [u8; 4] =
            v.value().try_into().map_err(|_| self.corrupt("format_version is not 4 bytes"))?;
        match u32::from_le_bytes(bytes) {
            FORMAT_VERSION => Ok(()),
            other => Err(self.corrupt(format!(
                "format version {other}; this tope-updater reads version {FORMAT_VERSION}"
            ))),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> Error {
        corrupt(&self.path, e)
    }

    /// A redb error while using an open journal: I/O errors keep their errno (ENOSPC is
    /// `DISK_FULL`: a full disk is not a damaged journal); anything else means the file does
    /// not hold what this format says it must.
    fn storage(&self, e: impl Into<redb::Error>) -> Error {
        match e.into() {
            redb::Error::Io(io) => Error::io(ErrorCode::InternalError, "journal", &self.path, &io),
            other => self.corrupt(other),
        }
    }

    fn read(&self) -> Result<ReadTransaction> {
        match &self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
        .map_err(|e| self.storage(e))
    }

    fn write(&self) -> Result<WriteTransaction> {
        let Db::ReadWrite(db) = &self.db else {
            return Err(Error::internal("journal opened read-only"));
        };
        let mut wt = db.begin_write().map_err(|e| self.storage(e))?;
        // The default, stated: the commit is durable (one fdatasync) when it returns. (Not in
        // the power-cut harness's `journal` negative control: fsutil::negative_control.)
        let durability = if crate::fsutil::negative_control("journal") {
            Durability::None
        } else {
            Durability::Immediate
        };
        wt.set_durability(durability).map_err(|e| self.storage(e))?;
        Ok(wt)
    }

    fn commit(&self, wt: WriteTransaction) -> Result<()> {
        // A failed commit is not retried: storage errors stop the engine (STYLE rule 7).
        wt.commit().map_err(|e| match redb::Error::from(e) {
            redb::Error::Io(io) => {
                Error::io(ErrorCode::InternalError, "journal commit", &self.path, &io)
            }
            other => {
                Error::new(ErrorCode::InternalError, format!("journal commit failed: {other}"))
            }
        })
    }

    // ---- reads ----

    /// A table added to format 1 after its release (§7), or `None` in a journal written
    /// before it existed and opened read-only (a read-write open creates it): readers treat
    /// it as empty.
    fn later_table<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        rt: &ReadTransaction,
        def: TableDefinition<K, V>,
    ) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
        match rt.open_table(def) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(self.storage(e)),
        }
    }

    /// The first `limit` rows of a table of small records, in key order, decoded; each row's
    /// key repeats a field of its record, and `own_key` says that field: a record under
    /// another key is a damaged journal. A journal without the table (opened read-only before
    /// it existed) has none.
    fn keyed_records<K, T>(
        &self,
        def: TableDefinition<K, &'static [u8]>,
        limit: usize,
        what: &str,
        own_key: impl for<'a> Fn(&T, &K::SelfType<'a>) -> bool,
    ) -> Result<Vec<T>>
    where
        K: redb::Key + 'static,
        for<'a> K::SelfType<'a>: std::fmt::Debug,
        T: records::Record,
    {
        let rt = self.read()?;
        let Some(t) = self.later_table(&rt, def)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.storage(e))?.take(limit) {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let r: T = records::decode(v.value(), records::Size::Small, what)?;
            if !own_key(&r, &k.value()) {
                return Err(
                    self.corrupt(format!("{what} row {:?} holds another's record", k.value()))
                );
            }
            out.push(r);
        }
        Ok(out)
    }

    fn counter(&self, rt: &ReadTransaction, key: &str) -> Result<Option<u64>> {
        let t = rt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
        Ok(t.get(key).map_err(|e| self.storage(e))?.map(|v| v.value()))
    }

    pub fn next_tx_id(&self) -> Result<u64> {
        let rt = self.read()?;
        self.counter(&rt, NEXT_TX_ID)?.ok_or_else(|| self.corrupt("no next_tx_id"))
    }

    pub fn current_generation_id(&self) -> Result<Option<u64>> {
        self.counter(&self.read()?, CURRENT_GENERATION)
    }

    pub fn tx(&self, id: u64) -> Result<Option<TxRecord>> {
        let rt = self.read()?;
        let t = rt.open_table(TRANSACTIONS).map_err(|e| self.storage(e))?;
        t.get(id)
            .map_err(|e| self.storage(e))?
            .map(|v| decode(v.value(), Size::Small, "transaction"))
            .transpose()
    }

    /// The transaction in flight (or waiting for an operator) with its plan.
    pub fn active(&self) -> Result<Option<(TxRecord, Plan)>> {
        let rt = self.read()?;
        let Some(id) = self.counter(&rt, ACTIVE_TX)? else { return Ok(None) };
        let txs = rt.open_table(TRANSACTIONS).map_err(|e| self.storage(e))?;
        let plans = rt.open_table(PLANS).map_err(|e| self.storage(e))?;
        let rec: TxRecord = decode(
            txs.get(id)
                .map_err(|e| self.storage(e))?
                .ok_or_else(|| self.corrupt(format!("active tx {id} has no record")))?
                .value(),
            Size::Small,
            "transaction",
        )?;
        let plan: Plan = decode(
            plans
                .get(id)
                .map_err(|e| self.storage(e))?
                .ok_or_else(|| self.corrupt(format!("active tx {id} has no plan")))?
                .value(),
            Size::Large,
            "plan",
        )?;
        Ok(Some((rec, plan)))
    }

    /// The state dir this journal lives in.
    pub fn state_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    /// Finished and in-flight transactions, newest first.
    pub fn history(&self, limit: usize) -> Result<Vec<TxRecord>> {
        let rt = self.read()?;
        let t = rt.open_table(TRANSACTIONS).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.storage(e))?.rev().take(limit) {
            let (_, v) = item.map_err(|e| self.storage(e))?;
            out.push(decode(v.value(), Size::Small, "transaction")?);
        }
        Ok(out)
    }

    /// Kept generations, oldest first.
    pub fn generations(&self) -> Result<Vec<Generation>> {
        let rt = self.read()?;
        let t = rt.open_table(GENERATIONS).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.storage(e))? {
            let (_, v) = item.map_err(|e| self.storage(e))?;
            out.push(decode(v.value(), Size::Large, "generation")?);
        }
        Ok(out)
    }

    pub fn factory(&self) -> Result<Factory> {
        let rt = self.read()?;
        let t = rt.open_table(FACTORY).map_err(|e| self.storage(e))?;
        let mut out = Factory::new();
        for item in t.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            out.insert(k.value().to_string(), decode(v.value(), Size::Small, "factory")?);
        }
        Ok(out)
    }

    /// The transaction whose rollback made this package "failed", if any.
    pub fn failed_package(&self, hash: &Hash) -> Result<Option<u64>> {
        let rt = self.read()?;
        let t = rt.open_table(FAILED_PACKAGES).map_err(|e| self.storage(e))?;
        Ok(t.get(hash.0.as_slice()).map_err(|e| self.storage(e))?.map(|v| v.value()))
    }

    /// The trial install awaiting confirmation, if any.
    pub fn trial(&self) -> Result<Option<Trial>> {
        let rt = self.read()?;
        let Some(t) = self.later_table(&rt, TRIAL)? else { return Ok(None) };
        t.get(CURRENT_TRIAL)
            .map_err(|e| self.storage(e))?
            .map(|v| decode(v.value(), Size::Small, "trial"))
            .transpose()
    }

    /// The known-file records of `paths` (those that have one), in one read transaction.
    pub fn known_files<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::BTreeMap<String, KnownFile>> {
        let rt = self.read()?;
        let Some(t) = self.later_table(&rt, KNOWN_FILES)? else {
            return Ok(std::collections::BTreeMap::new());
        };
        let mut out = std::collections::BTreeMap::new();
        for p in paths {
            if let Some(v) = t.get(p).map_err(|e| self.storage(e))? {
                out.insert(p.to_string(), decode(v.value(), Size::Small, "known file")?);
            }
        }
        Ok(out)
    }

    /// Every known-file record, for `journal`.
    pub fn all_known_files(&self) -> Result<Vec<(String, KnownFile)>> {
        let rt = self.read()?;
        let Some(t) = self.later_table(&rt, KNOWN_FILES)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            out.push((k.value().to_string(), decode(v.value(), Size::Small, "known file")?));
        }
        Ok(out)
    }

    // ---- writes: each is exactly one durable commit ----

    /// Records a boot counted for the trial.
    pub fn update_trial(&self, trial: &Trial) -> Result<()> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(TRIAL).map_err(|e| self.storage(e))?;
            t.insert(CURRENT_TRIAL, encode(trial, Size::Small)?.as_slice())
                .map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }

    /// The trial is confirmed: it ends, and its install's record says `Confirmed`.
    pub fn confirm_trial(&self, rec: Option<&mut TxRecord>) -> Result<()> {
        let wt = self.write()?;
        if let Some(rec) = rec {
            self.put_tx(&wt, rec)?;
        }
        {
            let mut t = wt.open_table(TRIAL).map_err(|e| self.storage(e))?;
            t.remove(CURRENT_TRIAL).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }

    fn put_tx(&self, wt: &WriteTransaction, rec: &mut TxRecord) -> Result<()> {
        rec.commits += 1;
        let bytes = encode(rec, Size::Small)?;
        let mut t = wt.open_table(TRANSACTIONS).map_err(|e| self.storage(e))?;
        t.insert(rec.id, bytes.as_slice()).map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn put_plan(&self, wt: &WriteTransaction, plan: &Plan) -> Result<()> {
        let bytes = encode(plan, Size::Large)?;
        let mut t = wt.open_table(PLANS).map_err(|e| self.storage(e))?;
        t.insert(plan.tx_id, bytes.as_slice()).map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// The `Planned` commit: record, plan, active pointer, id counter.
    pub fn begin(&self, rec: &mut TxRecord, plan: &Plan) -> Result<()> {
        let wt = self.write()?;
        self.put_tx(&wt, rec)?;
        self.put_plan(&wt, plan)?;
        {
            let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            c.insert(ACTIVE_TX, rec.id).map_err(|e| self.storage(e))?;
            c.insert(NEXT_TX_ID, rec.id + 1).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }

    /// Writes `rec` as it is (a phase the caller set: only `driver::transaction::commit_phase`
    /// changes it; or an attempt count), and the plan when staging has filled in new hashes,
    /// in one commit.
    pub fn save_tx(&self, rec: &mut TxRecord, plan: Option<&Plan>) -> Result<()> {
        let wt = self.write()?;
        self.put_tx(&wt, rec)?;
        if let Some(p) = plan {
            self.put_plan(&wt, p)?;
        }
        self.commit(wt)
    }

    /// The `Committed` commit: the transaction ends, the generation moves.
    pub fn finish_committed(&self, rec: &mut TxRecord, fx: CommitEffects) -> Result<()> {
        let wt = self.write()?;
        self.put_tx(&wt, rec)?;
        {
            let mut gens = wt.open_table(GENERATIONS).map_err(|e| self.storage(e))?;
            let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            if let Some(g) = &fx.new_generation {
                gens.insert(g.id, encode(g, Size::Large)?.as_slice())
                    .map_err(|e| self.storage(e))?;
                c.insert(NEXT_GENERATION_ID, g.id + 1).map_err(|e| self.storage(e))?;
            }
            for id in &fx.remove_generations {
                gens.remove(id).map_err(|e| self.storage(e))?;
            }
            match fx.current {
                Some(id) => c.insert(CURRENT_GENERATION, id).map_err(|e| self.storage(e))?,
                None => c.remove(CURRENT_GENERATION).map_err(|e| self.storage(e))?,
            };
            c.remove(ACTIVE_TX).map_err(|e| self.storage(e))?;
            let mut f = wt.open_table(FACTORY).map_err(|e| self.storage(e))?;
            for (path, state) in &fx.factory_additions {
                f.insert(path.as_str(), encode(state, Size::Small)?.as_slice())
                    .map_err(|e| self.storage(e))?;
            }
            let mut fp = wt.open_table(FAILED_PACKAGES).map_err(|e| self.storage(e))?;
            if let Some(h) = fx.clear_failed_package {
                fp.remove(h.0.as_slice()).map_err(|e| self.storage(e))?;
            }
            if let Some((h, tx)) = fx.mark_failed_package {
                fp.insert(h.0.as_slice(), tx).map_err(|e| self.storage(e))?;
            }
            let mut trial = wt.open_table(TRIAL).map_err(|e| self.storage(e))?;
            match &fx.trial {
                Some(tr) => trial
                    .insert(CURRENT_TRIAL, encode(tr, Size::Small)?.as_slice())
                    .map_err(|e| self.storage(e))?,
                None => trial.remove(CURRENT_TRIAL).map_err(|e| self.storage(e))?,
            };
            let mut known = wt.open_table(KNOWN_FILES).map_err(|e| self.storage(e))?;
            for (path, k) in &fx.known_files {
                match k {
                    Some(k) => known
                        .insert(path.as_str(), encode(k, Size::Small)?.as_slice())
                        .map_err(|e| self.storage(e))?,
                    None => known.remove(path.as_str()).map_err(|e| self.storage(e))?,
                };
            }
        }
        self.end(&wt, rec.id)?;
        self.commit(wt)
    }

    /// The `RolledBack` commit: the transaction ends; an install's package is remembered as
    /// failed so it is not retried in a loop.
    pub fn finish_rolled_back(
        &self,
        rec: &mut TxRecord,
        failed_package: Option<Hash>,
    ) -> Result<()> {
        let wt = self.write()?;
        self.put_tx(&wt, rec)?;
        {
            let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            c.remove(ACTIVE_TX).map_err(|e| self.storage(e))?;
            if let Some(h) = failed_package {
                let mut fp = wt.open_table(FAILED_PACKAGES).map_err(|e| self.storage(e))?;
                fp.insert(h.0.as_slice(), rec.id).map_err(|e| self.storage(e))?;
            }
        }
        self.end(&wt, rec.id)?;
        self.commit(wt)
    }

    /// Drops the finished transaction's plan and old history beyond the limit.
    fn end(&self, wt: &WriteTransaction, id: u64) -> Result<()> {
        let mut plans = wt.open_table(PLANS).map_err(|e| self.storage(e))?;
        plans.remove(id).map_err(|e| self.storage(e))?;
        let mut txs = wt.open_table(TRANSACTIONS).map_err(|e| self.storage(e))?;
        let excess =
            (txs.len().map_err(|e| self.storage(e))? as usize).saturating_sub(HISTORY_TX_MAX);
        if excess > 0 {
            let old: Vec<u64> = txs
                .iter()
                .map_err(|e| self.storage(e))?
                .take(excess)
                .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                .collect();
            for k in old {
                txs.remove(k).map_err(|e| self.storage(e))?;
            }
        }
        Ok(())
    }

    /// After journal loss: put the transaction described by the plan copy back in flight, so
    /// the ordinary recovery path rolls it back.
    pub fn import_in_flight(&self, rec: &mut TxRecord, plan: &Plan) -> Result<()> {
        let wt = self.write()?;
        self.put_tx(&wt, rec)?;
        self.put_plan(&wt, plan)?;
        {
            let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            c.insert(ACTIVE_TX, rec.id).map_err(|e| self.storage(e))?;
            let next = c.get(NEXT_TX_ID).map_err(|e| self.storage(e))?.map_or(1, |v| v.value());
            c.insert(NEXT_TX_ID, next.max(rec.id + 1)).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }

    /// Everything, decoded, for `tope-updater journal`.
    pub fn dump(&self) -> Result<JournalDump> {
        let rt = self.read()?;
        let mut counters = Vec::new();
        for item in rt
            .open_table(COUNTERS)
            .map_err(|e| self.storage(e))?
            .iter()
            .map_err(|e| self.storage(e))?
        {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            counters.push((k.value().to_string(), v.value()));
        }
        let mut plans = Vec::new();
        for item in rt
            .open_table(PLANS)
            .map_err(|e| self.storage(e))?
            .iter()
            .map_err(|e| self.storage(e))?
        {
            let (_, v) = item.map_err(|e| self.storage(e))?;
            plans.push(decode(v.value(), Size::Large, "plan")?);
        }
        let mut failed_packages = Vec::new();
        for item in rt
            .open_table(FAILED_PACKAGES)
            .map_err(|e| self.storage(e))?
            .iter()
            .map_err(|e| self.storage(e))?
        {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let h: [u8; 32] = k
                .value()
                .try_into()
                .map_err(|_| self.corrupt("failed_packages key is not 32 bytes"))?;
            failed_packages.push((Hash(h), v.value()));
        }
        let mut transactions = self.history(usize::MAX)?;
        transactions.reverse();
        Ok(JournalDump {
            path: self.path.display().to_string(),
            format_version: FORMAT_VERSION,
            counters,
            transactions,
            plans,
            generations: self.generations()?,
            factory: self.factory()?.into_iter().collect(),
            failed_packages,
            trial: self.trial()?,
            download: self.download()?,
            outbox: self.outbox_pending(usize::MAX)?,
            known_files: self.all_known_files()?,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct JournalDump {
    pub path: String,
    pub format_version: u32,
    pub counters: Vec<(String, u64)>,
    pub transactions: Vec<TxRecord>,
    pub plans: Vec<Plan>,
    pub generations: Vec<Generation>,
    pub factory: Vec<(String, PathState)>,
    pub failed_packages: Vec<(Hash, u64)>,
    pub trial: Option<Trial>,
    pub download: Option<downloads::DownloadRecord>,
    pub outbox: Vec<outbox::Report>,
    pub known_files: Vec<(String, KnownFile)>,
}
