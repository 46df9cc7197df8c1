//! The durable state of the current download (SPEC §5). Owned by the download work; see
//! journal-format.md.

use redb::{TableDefinition, WriteTransaction};

pub(super) const DOWNLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("downloads");

/// Creates this module's tables (journal creation, and older journals on first write open).
pub(super) fn create_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(DOWNLOADS)?;
    Ok(())
}
