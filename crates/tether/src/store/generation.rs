//! The generation marker: how a store put back from an older copy is told from the one last
//! written.
//!
//! Every session write counts a generation up, kept both in the store and in a small marker
//! file in the node's data directory, which the store's own backups do not carry back. A
//! store older than its marker was put back from a copy (see [`RolledBack`]).

use std::path::PathBuf;

use super::{RolledBack, StoreError};

/// A generation marker file.
#[derive(Debug, Clone)]
pub(crate) struct Marker {
    path: PathBuf,
}

impl Marker {
    /// The marker at `path` (not read or created yet).
    pub(crate) fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// Compares the store's generation `database` with the marker, and says which generation
    /// both move to now (past anything written before, so the next comparison is fair).
    pub(crate) fn compare(&self, database: u64) -> Result<(Option<RolledBack>, u64), StoreError> {
        let written = self.read()?;
        let rolled_back =
            written.filter(|written| database < *written).map(|written| RolledBack { database, marker: written });
        Ok((rolled_back, database.max(written.unwrap_or(0)) + 1))
    }

    /// The generation in the marker, if there is one.
    fn read(&self) -> Result<Option<u64>, StoreError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(self.io(err)),
        }
    }

    /// Writes `generation` in place (one short fixed-width line, synced). Written after the
    /// store's commit: it is never behind the store by more than a crash between the two
    /// writes, which reads as no rollback.
    pub(crate) fn write(&self, generation: u64) -> Result<(), StoreError> {
        use std::io::{Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        file.rewind().map_err(|e| self.io(e))?;
        writeln!(file, "{generation:020}").map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))
    }

    fn io(&self, err: std::io::Error) -> StoreError {
        StoreError::Io(self.path.display().to_string(), err)
    }
}
