//! The write-ahead log of a [`crate::RedbStore`] that does not fsync each commit
//! ([`crate::Sync::OnFlush`]). redb forgets commits made without fsync when the process
//! dies, so each such batch is first appended here with one `write(2)`: once that returns,
//! the batch is in the operating system's hands and survives a crash of the process (not
//! of the machine). A flush makes redb durable, records the last batch it holds, and
//! empties the log; opening the store replays what the log holds beyond that.
//!
//! Record: length (u32), batch number (u64), FNV-1a hash of the body (u64), body. A torn
//! or damaged tail (the process died mid-append: that batch was never acknowledged) is
//! cut off when the log is opened.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use crate::StoreError;

fn io(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("{}: {e}", path.display()))
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const HEADER: usize = 4 + 8 + 8;

/// Records read back: batch number and body, in order.
pub(crate) type Records = Vec<(u64, Vec<u8>)>;

pub(crate) struct Wal {
    file: File,
    len: u64,
    path: std::path::PathBuf,
}

impl Wal {
    /// Opens (or creates) the log; returns it with the whole records it holds, in order.
    pub(crate) fn open(path: &Path) -> Result<(Wal, Records), StoreError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| io(path, e))?;
        let mut records = Vec::new();
        let mut at = 0;
        while buf.len() - at >= HEADER {
            let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let seq = u64::from_le_bytes(buf[at + 4..at + 12].try_into().expect("8 bytes"));
            let hash = u64::from_le_bytes(buf[at + 12..at + 20].try_into().expect("8 bytes"));
            let Some(body) = buf.get(at + HEADER..at + HEADER + len) else {
                break;
            };
            if fnv(body) != hash {
                break;
            }
            records.push((seq, body.to_vec()));
            at += HEADER + len;
        }
        let mut wal = Wal {
            file,
            len: buf.len() as u64,
            path: path.to_path_buf(),
        };
        if at < buf.len() {
            wal.cut(at as u64)?;
        }
        Ok((wal, records))
    }

    /// Appends one batch with a single write; returns where the log ended before it.
    pub(crate) fn append(&mut self, seq: u64, body: &[u8]) -> Result<u64, StoreError> {
        let mark = self.len;
        let mut record = Vec::with_capacity(HEADER + body.len());
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(&fnv(body).to_le_bytes());
        record.extend_from_slice(body);
        if let Err(e) = self.file.write_all(&record) {
            let _ = self.cut(mark);
            return Err(io(&self.path, e));
        }
        self.len += record.len() as u64;
        Ok(mark)
    }

    /// Cuts the log back to `mark` (a failed commit takes its record back).
    pub(crate) fn cut(&mut self, mark: u64) -> Result<(), StoreError> {
        self.file.set_len(mark).map_err(|e| io(&self.path, e))?;
        self.len = mark;
        Ok(())
    }

    /// Empties the log once everything in it is durable in redb.
    pub(crate) fn clear(&mut self) -> Result<(), StoreError> {
        if self.len > 0 {
            self.cut(0)?;
        }
        Ok(())
    }
}
