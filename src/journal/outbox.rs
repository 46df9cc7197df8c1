//! The durable outbox of progress reports to device-api (SPEC §5). See journal-format.md.

use redb::{TableDefinition, WriteTransaction};

pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Creates this module's tables (journal creation, and older journals on first write open).
pub(super) fn create_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(OUTBOX)?;
    Ok(())
}
