//! [`RedbStore`]: the durable backend, one redb file, one write transaction (one fsync)
//! per committed batch.
//!
//! Tables: `sessions` (client id -> record), `delivery` (client id -> last packet id and
//! next flow number), `inflight` ((client id, packet id) -> send order, state, reference),
//! `inbound` ((client id, packet id) -> state), `queue_by_id` ((client id, message id) ->
//! payload length and reference; message ids grow in queue order, so the key order is
//! the queue's and a broker can read the next part of a queue after the last id it
//! holds), `queue_stats` (client id -> queued messages and payload bytes, kept per batch,
//! so a start counts queues without reading them), `messages` (key -> message body) with
//! `message_refs` (key -> how many references), `retained` (topic -> message). Files
//! from before message-keyed queues (a `queue` table keyed by a sequence) are moved over
//! once when opened. A message is stored once: the copies a
//! batch queues or sends for several sessions (a fan-out) share one body, each reference
//! adding only what differs per session (QoS, RETAIN, Subscription Identifiers, shared
//! group); the body goes with its last reference. Each [`Change`] touches a few rows, so
//! a message sent or acknowledged costs a row, not a rewrite of the session. A batch that
//! names a missing session aborts its transaction: nothing of it is written, as with
//! [`crate::MemoryStore`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Instant, SystemTime};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition,
};
use tern_codec::{PacketId, Str, TopicName};
use tern_proto::{Change, Entry, MessageId, OutboundState, SessionState};

use crate::encoding::{self, Anchor, CopyOf};
use crate::wal::{Records, Wal};
use crate::{Committed, Op, Snapshot, Store, StoreError, StoredSession};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const DELIVERY: TableDefinition<&str, &[u8]> = TableDefinition::new("delivery");
const INFLIGHT: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("inflight");
const INBOUND: TableDefinition<(&str, u16), u8> = TableDefinition::new("inbound");
/// The queue keyed by an internal sequence, before queues were keyed by message id: read
/// only to move its rows over.
const OLD_QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue_by_id");
const QUEUE_STATS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("queue_stats");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const WILLS: TableDefinition<&str, &[u8]> = TableDefinition::new("wills");
/// Idempotency keys: (identity, slot) -> when the key may be forgotten (milliseconds since
/// the Unix epoch, 8 bytes little-endian), then the key.
const KEYS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("idempotency_keys");
/// Topic histories: (policy filter, position) -> when it was published (milliseconds since
/// the Unix epoch, 8 bytes little-endian), then the message.
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const REFS: TableDefinition<u64, u32> = TableDefinition::new("message_refs");
/// `wal_seq`: the number of the last logged batch this state includes.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The page cache a store opened with [`RedbStore::open`] keeps in memory: 64 MiB (redb's
/// own default is 1 GiB, which a broker with a deep queue on disk would fill with pages it
/// wrote and will not read again soon).
pub const DEFAULT_CACHE: usize = 64 << 20;

type Slot = std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<Database>>>>;

/// The database in `slot`, if it is open.
fn current(slot: &Slot) -> Option<std::sync::Arc<Database>> {
    slot.read().ok().and_then(|g| g.clone())
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// When a commit is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Every commit is flushed to disk (fsync) before `commit` returns.
    Always,
    /// Commits return once applied; the file is flushed by [`RedbStore::flush`]. What was
    /// committed since the last flush is lost if the process dies.
    OnFlush,
}

/// The durable store.
pub struct RedbStore {
    /// The open database, shared with the queue reader ([`Store::reader`]); `None` only
    /// while it is being opened again.
    slot: Slot,
    /// What it was opened from, to open it again after an I/O error.
    path: std::path::PathBuf,
    cache: usize,
    /// A commit failed with an I/O error: redb refuses every later write transaction
    /// ("previous I/O error") until the database is opened again.
    latched: bool,
    anchor: Anchor,
    /// Key of the next message body.
    next_key: u64,
    /// The log of batches committed without fsync, and the number of the last one.
    wal: Wal,
    seq: u64,
    sync: Sync,
    unflushed: bool,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

struct Tables<'t> {
    sessions: Table<'t, &'static str, &'static [u8]>,
    delivery: Table<'t, &'static str, &'static [u8]>,
    inflight: Table<'t, (&'static str, u16), &'static [u8]>,
    inbound: Table<'t, (&'static str, u16), u8>,
    queue: Table<'t, (&'static str, u64), &'static [u8]>,
    retained: Table<'t, &'static str, &'static [u8]>,
    wills: Table<'t, &'static str, &'static [u8]>,
    messages: Table<'t, u64, &'static [u8]>,
    refs: Table<'t, u64, u32>,
    stats: Table<'t, &'static str, (u64, u64)>,
    /// Opened when a batch has a key to write (only publishes that carry one do).
    keys: Option<Table<'t, (&'static str, u32), &'static [u8]>>,
    /// Opened when a batch keeps or forgets history.
    history: Option<Table<'t, (&'static str, u64), &'static [u8]>>,
    /// What this batch changed of each session's queue count and payload bytes, written
    /// to `stats` at its end.
    deltas: HashMap<String, (i64, i64)>,
    /// Bodies written in this batch, by payload address and length, for the copies of a
    /// fan-out to find.
    bodies: HashMap<(usize, usize), Vec<(tern_proto::Message, u64)>>,
}

impl RedbStore {
    /// Opens the store file at `path`, creating it if it does not exist. A file that is
    /// not a readable store is an error, never silently replaced. `now` and `wall` are
    /// the same moment (message expiry instants are stored as wall-clock times).
    /// Batches committed without fsync by an earlier process (`Sync::OnFlush`) that its log
    /// holds and redb lost are applied again, durably, before this returns.
    ///
    /// A file that exists but is empty is refused, not started afresh: nothing Tern writes
    /// leaves a store at zero bytes, so its state was lost somewhere (truncated, or copied
    /// wrong), and starting empty over it would silently drop every session. Truncated
    /// or corrupt files are refused by redb, with the file named.
    pub fn open(path: &Path, now: Instant, wall: SystemTime) -> Result<RedbStore, StoreError> {
        RedbStore::open_with_cache(path, now, wall, DEFAULT_CACHE)
    }

    /// [`RedbStore::open`] with a cache of `cache_bytes` for the file's pages (read and
    /// written, in this process's memory; the operating system's page cache is apart).
    pub fn open_with_cache(
        path: &Path,
        now: Instant,
        wall: SystemTime,
        cache_bytes: usize,
    ) -> Result<RedbStore, StoreError> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Backend(format!(
                "{}: the store file is empty (0 bytes); refusing to start with no state over it \
                 (move it away to start afresh)",
                path.display()
            )));
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let (wal, records) = Wal::open(&path.with_extension("wal"))?;
        // Create the tables once, so reads never meet a missing one.
        let txn = db.begin_write().map_err(backend)?;
        for t in [SESSIONS, DELIVERY, RETAINED, WILLS] {
            txn.open_table(t).map_err(backend)?;
        }
        txn.open_table(INFLIGHT).map_err(backend)?;
        txn.open_table(INBOUND).map_err(backend)?;
        txn.open_table(QUEUE).map_err(backend)?;
        txn.open_table(QUEUE_STATS).map_err(backend)?;
        txn.open_table(REFS).map_err(backend)?;
        txn.open_table(KEYS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let anchor = Anchor { instant: now, wall };
        migrate_queues(&db, anchor)
            .map_err(|e| StoreError::Backend(format!("{}: moving queues: {e}", path.display())))?;
        let mut store = RedbStore {
            slot: std::sync::Arc::new(std::sync::RwLock::new(Some(std::sync::Arc::new(db)))),
            path: path.to_path_buf(),
            cache: cache_bytes,
            latched: false,
            next_key: 0,
            wal,
            seq: 0,
            anchor,
            sync: Sync::Always,
            unflushed: false,
        };
        store.replay_log(records)?;
        Ok(store)
    }

    /// Brings a freshly opened database up to date with the log: the batches it holds
    /// beyond the last one the database has (`wal_seq`: redb forgets commits made
    /// without fsync when the process dies or the database is opened again) are applied
    /// again, in order, each once; then one durable commit, after which the log is
    /// emptied. Also finds the next message key.
    fn replay_log(&mut self, records: Records) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write().map_err(backend)?;
        let durable_seq = txn
            .open_table(META)
            .map_err(backend)?
            .get("wal_seq")
            .map_err(backend)?
            .map_or(0, |v| v.value());
        self.next_key = {
            let messages = txn.open_table(MESSAGES).map_err(backend)?;
            match messages.last().map_err(backend)? {
                Some((k, _)) => k.value() + 1,
                None => 0,
            }
        };
        let mut last = durable_seq;
        for (seq, record) in records.iter().filter(|(seq, _)| *seq > durable_seq) {
            let batch = encoding::read_batch(record, self.anchor)?;
            self.apply_batch(&txn, &batch)
                .map_err(|e| StoreError::Backend(format!("replaying logged batch {seq}: {e}")))?;
            last = *seq;
        }
        txn.open_table(META)
            .map_err(backend)?
            .insert("wal_seq", last)
            .map_err(backend)?;
        txn.commit().map_err(|e| self.io_failed(e))?;
        self.seq = last;
        self.unflushed = false;
        self.wal.clear()
    }

    /// How many message bodies are stored (each shared by every queue and flow holding a
    /// copy of that message).
    pub fn stored_messages(&self) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let messages = txn.open_table(MESSAGES).map_err(backend)?;
        messages.len().map_err(backend)
    }

    fn db(&self) -> Result<std::sync::Arc<Database>, StoreError> {
        current(&self.slot).ok_or_else(|| {
            StoreError::Backend(format!(
                "{}: the store could not be opened again after an I/O error",
                self.path.display()
            ))
        })
    }

    /// A write failed: redb now refuses every write transaction until the database is
    /// opened again, which the next commit tries (once the disk takes writes again).
    fn io_failed(&mut self, e: impl std::fmt::Display) -> StoreError {
        self.latched = true;
        backend(e)
    }

    /// Opens the database again after an I/O error, if the disk takes writes again: a
    /// probe first writes 1 MiB past the end of a scratch file as long as the store (so a
    /// full disk or a file size limit is found before the working database is let go);
    /// then the database is closed (once the queue reader has let go of it) and opened,
    /// which repairs it from its last commit.
    fn reopen(&mut self) -> Result<(), StoreError> {
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let probe_path = self.path.with_extension("probe");
        let probe = (|| -> std::io::Result<()> {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::File::create(&probe_path)?;
            f.seek(SeekFrom::Start(len))?;
            f.write_all(&vec![0; 1 << 20])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&probe_path);
        if let Err(e) = probe {
            return Err(StoreError::Backend(format!(
                "{}: the disk does not take writes yet: {e}",
                self.path.display()
            )));
        }
        let Ok(mut slot) = self.slot.write() else {
            return Err(StoreError::Backend("the store's lock is poisoned".into()));
        };
        if let Some(mut old) = slot.take() {
            // The reader holds it only for one read.
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match std::sync::Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(still) => {
                        *slot = Some(still);
                        return Err(StoreError::Backend(
                            "the store is still being read; not opened again yet".into(),
                        ));
                    }
                }
            }
        }
        let db = Database::builder()
            .set_cache_size(self.cache)
            .create(&self.path)
            .map_err(|e| {
                StoreError::Backend(format!("{}: opening again: {e}", self.path.display()))
            })?;
        *slot = Some(std::sync::Arc::new(db));
        drop(slot);
        self.latched = false;
        // Commits made without fsync since the last flush may be gone from the database
        // opened again; the log has them (a batch whose commit failed was taken back out).
        let (wal, records) = Wal::open(&self.path.with_extension("wal"))?;
        self.wal = wal;
        self.replay_log(records)
    }

    /// Chooses when commits reach the disk (default [`Sync::Always`]).
    pub fn set_sync(&mut self, sync: Sync) {
        self.sync = sync;
    }
}

fn clear_delivery(t: &mut Tables<'_>, id: &str) -> Result<(), StoreError> {
    let mut held = Vec::new();
    t.inflight
        .retain_in((id, 0)..=(id, u16::MAX), |_, row| {
            held.push(row.to_vec());
            false
        })
        .map_err(backend)?;
    t.inbound
        .retain_in((id, 0)..=(id, u16::MAX), |_, _| false)
        .map_err(backend)?;
    for row in held {
        let (_, _, reference) = encoding::read_flow_ref(&row)?;
        release(t, reference)?;
    }
    let mut held = Vec::new();
    t.queue
        .retain_in((id, 0)..=(id, u64::MAX), |_, row| {
            held.push(row.to_vec());
            false
        })
        .map_err(backend)?;
    for row in held {
        let (size, reference) = queue_row(&row)?;
        count(t, id, -1, -i64::from(size));
        release(t, reference)?;
    }
    Ok(())
}

/// A queue row: the payload length, then the reference.
fn queue_row(row: &[u8]) -> Result<(u32, &[u8]), StoreError> {
    match row.split_first_chunk::<4>() {
        Some((size, reference)) => Ok((u32::from_le_bytes(*size), reference)),
        None => Err(StoreError::Backend(
            "a stored queue row is unreadable".into(),
        )),
    }
}

fn count(t: &mut Tables<'_>, id: &str, n: i64, bytes: i64) {
    match t.deltas.get_mut(id) {
        Some(d) => {
            d.0 += n;
            d.1 += bytes;
        }
        None => {
            t.deltas.insert(id.to_owned(), (n, bytes));
        }
    }
}

/// Puts a message in session `id`'s queue under its message id.
fn queue_push(
    t: &mut Tables<'_>,
    id: &str,
    key: MessageId,
    size: usize,
    reference: &[u8],
) -> Result<(), StoreError> {
    let size = u32::try_from(size).unwrap_or(u32::MAX);
    let mut row = Vec::with_capacity(4 + reference.len());
    row.extend_from_slice(&size.to_le_bytes());
    row.extend_from_slice(reference);
    let old = t
        .queue
        .insert((id, key.get()), row.as_slice())
        .map_err(backend)?
        .map(|r| r.value().to_vec());
    if let Some(old) = old {
        // The same message queued again under its id: the old row goes.
        let (size, reference) = queue_row(&old)?;
        count(t, id, -1, -i64::from(size));
        release(t, reference)?;
    }
    count(t, id, 1, i64::from(size));
    Ok(())
}

/// Takes the row of message `key` (the front one if `None`) out of session `id`'s queue;
/// its reference, if there was one.
fn queue_take(
    t: &mut Tables<'_>,
    id: &str,
    key: Option<u64>,
) -> Result<Option<Vec<u8>>, StoreError> {
    let key = match key {
        Some(k) => k,
        None => {
            let first = t
                .queue
                .range((id, 0)..=(id, u64::MAX))
                .map_err(backend)?
                .next();
            match first {
                Some(e) => e.map_err(backend)?.0.value().1,
                None => return Ok(None),
            }
        }
    };
    let Some(row) = t
        .queue
        .remove((id, key))
        .map_err(backend)?
        .map(|r| r.value().to_vec())
    else {
        return Ok(None);
    };
    let (size, reference) = queue_row(&row)?;
    count(t, id, -1, -i64::from(size));
    Ok(Some(reference.to_vec()))
}

/// Writes this batch's queue counts.
fn write_counts(t: &mut Tables<'_>) -> Result<(), StoreError> {
    for (id, (n, bytes)) in std::mem::take(&mut t.deltas) {
        if (n, bytes) == (0, 0) {
            continue;
        }
        let (len, size) = t
            .stats
            .get(id.as_str())
            .map_err(backend)?
            .map_or((0, 0), |v| v.value());
        let len = len.saturating_add_signed(n);
        let size = size.saturating_add_signed(bytes);
        if len == 0 {
            t.stats.remove(id.as_str()).map_err(backend)?;
        } else {
            t.stats.insert(id.as_str(), (len, size)).map_err(backend)?;
        }
    }
    Ok(())
}

/// Moves the rows of a store written before queues were keyed by message id (table
/// `queue`, keyed by a sequence) to `queue_by_id`, numbering copies stored before
/// message ids as loading used to (above every id the session holds, in queue order),
/// and counts them. Once; a store without such rows is left as it is.
fn migrate_queues(db: &Database, anchor: Anchor) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(backend)?;
    {
        let mut old = txn.open_table(OLD_QUEUE).map_err(backend)?;
        if old.is_empty().map_err(backend)? {
            drop(old);
            txn.abort().map_err(backend)?;
            return Ok(());
        }
        let inflight = txn.open_table(INFLIGHT).map_err(backend)?;
        let messages = txn.open_table(MESSAGES).map_err(backend)?;
        let mut queue = txn.open_table(QUEUE).map_err(backend)?;
        let mut stats = txn.open_table(QUEUE_STATS).map_err(backend)?;
        // Rows by session, in queue order.
        let mut by_session: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for row in old.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            by_session
                .entry(k.value().0.to_owned())
                .or_default()
                .push(v.value().to_vec());
        }
        for (id, rows) in by_session {
            let mut copies = Vec::with_capacity(rows.len());
            for row in &rows {
                copies.push(encoding::read_reference(row)?);
            }
            let mut high = 0;
            for f in inflight
                .range((id.as_str(), 0)..=(id.as_str(), u16::MAX))
                .map_err(backend)?
            {
                let (_, row) = f.map_err(backend)?;
                let (_, _, reference) = encoding::read_flow_ref(row.value())?;
                if let Some(n) = encoding::read_reference(reference)?.1.id {
                    high = high.max(n.get());
                }
            }
            let numbered = copies.iter().all(|(_, c)| c.id.is_some())
                && copies.windows(2).all(|w| w[0].1.id < w[1].1.id);
            high = copies
                .iter()
                .filter_map(|(_, c)| c.id.map(MessageId::get))
                .fold(high, u64::max);
            let (mut len, mut bytes) = (0u64, 0u64);
            for (row, (key, copy)) in rows.iter().zip(copies) {
                let Some(body) = messages.get(key).map_err(backend)? else {
                    return Err(StoreError::Backend(format!(
                        "stored message {key} is missing"
                    )));
                };
                let body = encoding::read_body(body.value(), anchor)?;
                let (message, since) = copy.of(&body, anchor, anchor.instant);
                let shared = copy.shared.clone().or_else(|| body.shared.clone());
                let message_id = match copy.id {
                    Some(n) if numbered => n,
                    _ => {
                        high += 1;
                        MessageId::new(high)
                            .ok_or_else(|| StoreError::Backend("message ids ran out".into()))?
                    }
                };
                let reference = if numbered {
                    row.clone()
                } else {
                    encoding::reference(
                        key,
                        CopyOf {
                            message: &message,
                            id: message_id,
                            since,
                            shared: shared.as_ref(),
                        },
                        anchor,
                    )
                };
                let size = message.payload.len();
                let mut new_row = Vec::with_capacity(4 + reference.len());
                new_row.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_le_bytes());
                new_row.extend_from_slice(&reference);
                queue
                    .insert((id.as_str(), message_id.get()), new_row.as_slice())
                    .map_err(backend)?;
                len += 1;
                bytes += size as u64;
            }
            stats.insert(id.as_str(), (len, bytes)).map_err(backend)?;
        }
        old.retain(|_, _| false).map_err(backend)?;
    }
    txn.commit().map_err(backend)?;
    Ok(())
}

/// Drops one reference to a stored body, and the body with the last one.
fn release(t: &mut Tables<'_>, reference: &[u8]) -> Result<(), StoreError> {
    let (key, _) = encoding::read_reference(reference)?;
    let n = t.refs.get(key).map_err(backend)?.map_or(0, |n| n.value());
    if n <= 1 {
        t.refs.remove(key).map_err(backend)?;
        t.messages.remove(key).map_err(backend)?;
    } else {
        t.refs.insert(key, n - 1).map_err(backend)?;
    }
    Ok(())
}

/// The idempotency key table of this batch, opened on first use.
fn history_table<'a, 't>(
    txn: &'t redb::WriteTransaction,
    slot: &'a mut Option<Table<'t, (&'static str, u64), &'static [u8]>>,
) -> Result<&'a mut Table<'t, (&'static str, u64), &'static [u8]>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(HISTORY).map_err(backend)?);
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Backend("the history table did not open".into()))
}

fn keys_table<'a, 't>(
    txn: &'t redb::WriteTransaction,
    slot: &'a mut Option<Table<'t, (&'static str, u32), &'static [u8]>>,
) -> Result<&'a mut Table<'t, (&'static str, u32), &'static [u8]>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(KEYS).map_err(backend)?);
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Backend("the key table did not open".into()))
}

impl RedbStore {
    /// Applies `batch` inside `txn` (which the caller commits or drops).
    fn apply_batch(
        &mut self,
        txn: &redb::WriteTransaction,
        batch: &[Op],
    ) -> Result<(), StoreError> {
        let mut t = Tables {
            sessions: txn.open_table(SESSIONS).map_err(backend)?,
            delivery: txn.open_table(DELIVERY).map_err(backend)?,
            inflight: txn.open_table(INFLIGHT).map_err(backend)?,
            inbound: txn.open_table(INBOUND).map_err(backend)?,
            queue: txn.open_table(QUEUE).map_err(backend)?,
            retained: txn.open_table(RETAINED).map_err(backend)?,
            wills: txn.open_table(WILLS).map_err(backend)?,
            messages: txn.open_table(MESSAGES).map_err(backend)?,
            refs: txn.open_table(REFS).map_err(backend)?,
            stats: txn.open_table(QUEUE_STATS).map_err(backend)?,
            keys: None,
            history: None,
            deltas: HashMap::new(),
            bodies: HashMap::new(),
        };
        for (index, op) in batch.iter().enumerate() {
            if let Some(client_id) = op.needs_session()
                && t.sessions.get(&**client_id).map_err(backend)?.is_none()
            {
                // The transaction is dropped: nothing of the batch is written.
                return Err(StoreError::NoSuchSession {
                    index,
                    client_id: client_id.to_string(),
                });
            }
            match op {
                Op::PutSession { client_id, record } => {
                    let id: &str = client_id;
                    t.sessions
                        .insert(id, encoding::record(record)?.as_slice())
                        .map_err(backend)?;
                    if t.delivery.get(id).map_err(backend)?.is_none() {
                        t.delivery
                            .insert(id, encoding::delivery_row(0, 0).as_slice())
                            .map_err(backend)?;
                    }
                }
                Op::DeleteSession { client_id } => {
                    let id: &str = client_id;
                    t.sessions.remove(id).map_err(backend)?;
                    t.delivery.remove(id).map_err(backend)?;
                    clear_delivery(&mut t, id)?;
                }
                Op::PutDelivery {
                    client_id,
                    state,
                    shared,
                } => {
                    self.put_delivery(&mut t, client_id, state, shared)?;
                }
                Op::Change {
                    client_id,
                    change,
                    shared,
                } => self.apply(&mut t, client_id, change, shared.as_ref())?,
                Op::PutRetained { message } => {
                    t.retained
                        .insert(
                            message.topic.as_str(),
                            encoding::message(message, self.anchor)?.as_slice(),
                        )
                        .map_err(backend)?;
                }
                Op::DeleteRetained { topic } => {
                    t.retained.remove(topic.as_str()).map_err(backend)?;
                }
                Op::PutWill { client_id, will } => {
                    t.wills
                        .insert(&**client_id, encoding::will_record(will)?.as_slice())
                        .map_err(backend)?;
                }
                Op::DeleteWill { client_id } => {
                    t.wills.remove(&**client_id).map_err(backend)?;
                }
                Op::PutKey {
                    identity,
                    slot,
                    key,
                    expires,
                } => {
                    let millis = expires
                        .duration_since(std::time::SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    let mut row = Vec::with_capacity(8 + key.len());
                    row.extend_from_slice(&millis.to_le_bytes());
                    row.extend_from_slice(key.as_bytes());
                    keys_table(txn, &mut t.keys)?
                        .insert((&**identity, *slot), row.as_slice())
                        .map_err(backend)?;
                }
                Op::DeleteKey { identity, slot } => {
                    keys_table(txn, &mut t.keys)?
                        .remove((&**identity, *slot))
                        .map_err(backend)?;
                }
                Op::PutHistory {
                    policy,
                    seq,
                    at,
                    message,
                } => {
                    let body = encoding::message(message, self.anchor)?;
                    let mut row = Vec::with_capacity(8 + body.len());
                    row.extend_from_slice(&millis(*at).to_le_bytes());
                    row.extend_from_slice(&body);
                    history_table(txn, &mut t.history)?
                        .insert((&**policy, *seq), row.as_slice())
                        .map_err(backend)?;
                }
                Op::ClusterApplied(seq) => {
                    txn.open_table(META)
                        .map_err(backend)?
                        .insert("cluster_applied", *seq)
                        .map_err(backend)?;
                }
                Op::ClusterForwarded(n) => {
                    txn.open_table(META)
                        .map_err(backend)?
                        .insert("cluster_forwarded", *n)
                        .map_err(backend)?;
                }
                Op::TrimHistory { policy, through } => {
                    history_table(txn, &mut t.history)?
                        .retain_in((&**policy, 0)..=(&**policy, *through), |_, _| false)
                        .map_err(backend)?;
                }
            }
        }
        write_counts(&mut t)
    }

    /// A reference to `m`'s body for one more holder: the body another copy in this batch
    /// stored, or a new one.
    fn hold(&mut self, t: &mut Tables<'_>, c: CopyOf<'_>) -> Result<Vec<u8>, StoreError> {
        let m = c.message;
        let slot = (m.payload.as_ptr() as usize, m.payload.len());
        let mut found = None;
        if let Some(candidates) = t.bodies.get(&slot) {
            for (body, key) in candidates {
                if encoding::same_body(body, m) && t.refs.get(*key).map_err(backend)?.is_some() {
                    found = Some(*key);
                    break;
                }
            }
        }
        let key = match found {
            Some(key) => {
                let n = t.refs.get(key).map_err(backend)?.map_or(0, |n| n.value());
                t.refs.insert(key, n + 1).map_err(backend)?;
                key
            }
            None => {
                let key = self.next_key;
                self.next_key += 1;
                t.messages
                    .insert(key, encoding::message(m, self.anchor)?.as_slice())
                    .map_err(backend)?;
                t.refs.insert(key, 1).map_err(backend)?;
                t.bodies.entry(slot).or_default().push((m.clone(), key));
                key
            }
        };
        Ok(encoding::reference(key, c, self.anchor))
    }

    fn put_delivery(
        &mut self,
        t: &mut Tables<'_>,
        id: &str,
        state: &SessionState,
        shared: &BTreeMap<MessageId, Str>,
    ) -> Result<(), StoreError> {
        clear_delivery(t, id)?;
        let mut seq = 0;
        for f in state.inflight() {
            let copy = CopyOf {
                message: &f.message,
                id: f.message_id,
                since: f.since,
                shared: shared.get(&f.message_id),
            };
            let reference = self.hold(t, copy)?;
            let row = encoding::flow_ref(seq, f.state, &reference);
            t.inflight
                .insert((id, f.id.get()), row.as_slice())
                .map_err(backend)?;
            seq += 1;
        }
        for (pid, s) in state.inbound_qos2() {
            t.inbound
                .insert((id, pid.get()), encoding::inbound(s))
                .map_err(backend)?;
        }
        for e in state.queued() {
            let row = self.hold(t, CopyOf::entry(e, shared.get(&e.id)))?;
            queue_push(t, id, e.id, e.message.payload.len(), &row)?;
        }
        t.delivery
            .insert(id, encoding::delivery_row(state.last_id(), seq).as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        id: &str,
        change: &Change,
        shared: Option<&Str>,
    ) -> Result<(), StoreError> {
        match change {
            Change::Queued(e) | Change::Requeued(e) => {
                let row = self.hold(t, CopyOf::entry(e, shared))?;
                queue_push(t, id, e.id, e.message.payload.len(), &row)?;
            }
            Change::Unqueued => {
                if let Some(reference) = queue_take(t, id, None)? {
                    release(t, &reference)?;
                }
            }
            Change::Removed(n) => {
                if let Some(reference) = queue_take(t, id, Some(n.get()))? {
                    release(t, &reference)?;
                }
            }
            Change::Sent(pid, e) => {
                let reference = self.hold(t, CopyOf::entry(e, shared))?;
                self.put_flow(t, id, *pid, &reference)?;
            }
            Change::Launched(pid) => {
                // The front row moves to the flows, its reference (and so its body) as is.
                if let Some(reference) = queue_take(t, id, None)? {
                    self.put_flow(t, id, *pid, &reference)?;
                }
            }
            Change::Released(pid) => {
                let row = match t.inflight.get((id, pid.get())).map_err(backend)? {
                    Some(row) => {
                        let mut row = row.value().to_vec();
                        if row.len() <= encoding::FLOW_STATE_OFFSET {
                            return Err(StoreError::Backend(
                                "stored in-flight message is unreadable".into(),
                            ));
                        }
                        row[encoding::FLOW_STATE_OFFSET] = 1;
                        Some(row)
                    }
                    None => None,
                };
                if let Some(row) = row {
                    t.inflight
                        .insert((id, pid.get()), row.as_slice())
                        .map_err(backend)?;
                }
            }
            Change::Completed(pid) => {
                let row = t
                    .inflight
                    .remove((id, pid.get()))
                    .map_err(backend)?
                    .map(|r| r.value().to_vec());
                if let Some(row) = row {
                    release(t, encoding::read_flow_ref(&row)?.2)?;
                }
            }
            Change::Inbound(pid, state) => {
                t.inbound
                    .insert((id, pid.get()), encoding::inbound(*state))
                    .map_err(backend)?;
            }
            Change::InboundDone(pid) => {
                t.inbound.remove((id, pid.get())).map_err(backend)?;
            }
        }
        Ok(())
    }
}

/// A copy read back, before it is numbered.
struct Loaded {
    message: tern_proto::Message,
    id: Option<MessageId>,
    since: std::time::Instant,
    shared: Option<Str>,
}

impl RedbStore {
    /// A new flow under packet id `pid` holding `reference`, last in send order; `pid`
    /// becomes the last id handed out.
    fn put_flow(
        &mut self,
        t: &mut Tables<'_>,
        id: &str,
        pid: tern_codec::PacketId,
        reference: &[u8],
    ) -> Result<(), StoreError> {
        let (_, next_seq) = match t.delivery.get(id).map_err(backend)? {
            Some(row) => encoding::read_delivery_row(row.value())?,
            None => (0, 0),
        };
        let row = encoding::flow_ref(next_seq, OutboundState::Published, reference);
        let old = t
            .inflight
            .insert((id, pid.get()), row.as_slice())
            .map_err(backend)?
            .map(|r| r.value().to_vec());
        if let Some(old) = old {
            release(t, encoding::read_flow_ref(&old)?.2)?;
        }
        t.delivery
            .insert(
                id,
                encoding::delivery_row(pid.get(), next_seq + 1).as_slice(),
            )
            .map_err(backend)?;
        Ok(())
    }
}

impl Store for RedbStore {
    fn commit(&mut self, batch: &[Op]) -> Result<Committed, StoreError> {
        if self.latched {
            self.reopen()?;
        }
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(|e| self.io_failed(e))?;
        if self.sync == Sync::OnFlush {
            txn.set_durability(Durability::None).map_err(backend)?;
        }
        self.apply_batch(&txn, batch)?;
        if self.sync == Sync::Always {
            txn.commit().map_err(|e| self.io_failed(e))?;
            return Ok(Committed::receipt());
        }
        // Not fsynced: the batch reaches the OS through the log before it is committed,
        // so a crash of the process (not of the machine) loses nothing; a failed commit
        // takes its record back out.
        // The batch's number goes into the same transaction, so whatever redb keeps after
        // a crash (durable commits, or more if it persisted later ones on close) says
        // exactly which logged batches it already holds.
        let record = encoding::batch(batch, self.anchor)?;
        self.seq += 1;
        txn.open_table(META)
            .map_err(backend)?
            .insert("wal_seq", self.seq)
            .map_err(backend)?;
        let mark = self.wal.append(self.seq, &record)?;
        if let Err(e) = txn.commit() {
            self.seq -= 1;
            self.wal.cut(mark)?;
            return Err(self.io_failed(e));
        }
        self.unflushed = true;
        Ok(Committed::receipt())
    }

    /// Makes every commit so far durable (an empty fsynced transaction); nothing to do if
    /// every commit already was.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.unflushed {
            return Ok(());
        }
        if self.latched {
            self.reopen()?;
        }
        let db = self.db()?;
        let txn = db.begin_write().map_err(|e| self.io_failed(e))?;
        txn.open_table(META)
            .map_err(backend)?
            .insert("wal_seq", self.seq)
            .map_err(backend)?;
        txn.commit().map_err(|e| self.io_failed(e))?;
        self.wal.clear()?;
        self.unflushed = false;
        Ok(())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        read_all(&*self.db()?, self.anchor, true, None)
    }

    fn load_spilled(&self) -> Result<Snapshot, StoreError> {
        read_all(&*self.db()?, self.anchor, false, None)
    }

    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<(Entry, Option<Str>)>, StoreError> {
        read_queue(&*self.db()?, self.anchor, client_id, after, max)
    }

    fn read_history(
        &self,
        read: &crate::HistoryRead,
    ) -> Result<Vec<crate::HistoryMessage>, StoreError> {
        read_history(&*self.db()?, self.anchor, read)
    }

    fn reader(&self) -> Option<Box<dyn crate::QueueReader>> {
        Some(Box::new(Reader {
            slot: self.slot.clone(),
            anchor: self.anchor,
        }))
    }
}

/// Reads queues beside the writer: redb's readers see the last commit and never wait for
/// a write transaction.
struct Reader {
    slot: Slot,
    anchor: Anchor,
}

impl crate::QueueReader for Reader {
    fn read_history(
        &self,
        read: &crate::HistoryRead,
    ) -> Result<Vec<crate::HistoryMessage>, StoreError> {
        match current(&self.slot) {
            Some(db) => read_history(&db, self.anchor, read),
            None => Ok(Vec::new()),
        }
    }

    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<crate::QueuePart, StoreError> {
        // While the store is opened again there is nothing to read from: an empty
        // answer, read again after a commit.
        match current(&self.slot) {
            Some(db) => read_queue(&db, self.anchor, client_id, after, max),
            None => Ok(Vec::new()),
        }
    }

    fn export_session(&self, client_id: &str) -> Result<Option<crate::Exported>, StoreError> {
        let Some(db) = current(&self.slot) else {
            return Err(StoreError::Backend(
                "the store is being opened again".into(),
            ));
        };
        let mut snapshot = read_all(&db, self.anchor, true, Some(client_id))?;
        Ok(snapshot
            .sessions
            .pop_first()
            .map(|(client_id, session)| crate::Exported {
                client_id,
                session,
                cluster_applied: snapshot.cluster_applied,
                cluster_forwarded: snapshot.cluster_forwarded,
            }))
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

fn history_row(row: &[u8]) -> Result<(SystemTime, &[u8]), StoreError> {
    let (at, body) = row
        .split_at_checked(8)
        .ok_or_else(|| StoreError::Backend("a history row is too short".into()))?;
    let mut ms = [0u8; 8];
    ms.copy_from_slice(at);
    Ok((from_millis(u64::from_le_bytes(ms)), body))
}

/// Each policy's part in position order (at most `max` each), merged by position.
fn read_history(
    db: &Database,
    anchor: Anchor,
    read: &crate::HistoryRead,
) -> Result<Vec<crate::HistoryMessage>, StoreError> {
    let mut out = Vec::new();
    if read.max == 0 || read.from > read.through {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(backend)?;
    let table = match txn.open_table(HISTORY) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
        Err(e) => return Err(backend(e)),
    };
    for policy in &read.policies {
        let mut taken = 0;
        for row in table
            .range((&**policy, read.from)..=(&**policy, read.through))
            .map_err(backend)?
        {
            let (key, row) = row.map_err(backend)?;
            let (at, body) = history_row(row.value())?;
            let message = encoding::read_message(body, anchor)?;
            let seq = key.value().1;
            if read.wants(seq, at, &message) {
                out.push((seq, at, message));
                taken += 1;
                if taken == read.max {
                    break;
                }
            }
        }
    }
    out.sort_by_key(|(seq, _, _)| *seq);
    out.truncate(read.max);
    Ok(out)
}

fn read_queue(
    db: &Database,
    anchor: Anchor,
    client_id: &str,
    after: MessageId,
    max: usize,
) -> Result<crate::QueuePart, StoreError> {
    let mut out = Vec::new();
    if max == 0 || after.get() == u64::MAX {
        return Ok(out);
    }
    let txn = db.begin_read().map_err(backend)?;
    let queue = txn.open_table(QUEUE).map_err(backend)?;
    let messages = txn.open_table(MESSAGES).map_err(backend)?;
    // One session's queue holds each message once: no body is read twice, so nothing is
    // kept but the row at hand.
    for row in queue
        .range((client_id, after.get() + 1)..=(client_id, u64::MAX))
        .map_err(backend)?
        .take(max)
    {
        let (key, row) = row.map_err(backend)?;
        let (_, reference) = queue_row(row.value())?;
        let (body_key, copy) = encoding::read_reference(reference)?;
        let Some(body) = messages.get(body_key).map_err(backend)? else {
            return Err(StoreError::Backend(format!(
                "stored message {body_key} is missing"
            )));
        };
        let body = encoding::read_body(body.value(), anchor)?;
        let (message, since) = copy.of(&body, anchor, anchor.instant);
        let id = MessageId::new(key.value().1)
            .ok_or_else(|| StoreError::Backend("a stored queue row has id 0".into()))?;
        let shared = copy.shared.or(body.shared);
        out.push((Entry { id, since, message }, shared));
    }
    Ok(out)
}

/// Everything the store holds, from one read transaction (`queues`: with the waiting
/// messages; without, counted only); `only`: that one session and the cluster positions,
/// nothing else.
fn read_all(
    db: &Database,
    anchor: Anchor,
    queues: bool,
    only: Option<&str>,
) -> Result<Snapshot, StoreError> {
    {
        let txn = db.begin_read().map_err(backend)?;
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        let delivery = txn.open_table(DELIVERY).map_err(backend)?;
        let inflight = txn.open_table(INFLIGHT).map_err(backend)?;
        let inbound = txn.open_table(INBOUND).map_err(backend)?;
        let queue = txn.open_table(QUEUE).map_err(backend)?;
        let stats = txn.open_table(QUEUE_STATS).map_err(backend)?;
        let retained = txn.open_table(RETAINED).map_err(backend)?;
        let wills = txn.open_table(WILLS).map_err(backend)?;
        let messages = txn.open_table(MESSAGES).map_err(backend)?;
        // Each body decoded once, its copies sharing topic, payload and properties.
        let mut bodies: HashMap<u64, encoding::Body> = HashMap::new();
        let mut copy_of = |reference: &[u8]| -> Result<Loaded, StoreError> {
            let (key, copy) = encoding::read_reference(reference)?;
            if let std::collections::hash_map::Entry::Vacant(slot) = bodies.entry(key) {
                let Some(body) = messages.get(key).map_err(backend)? else {
                    return Err(StoreError::Backend(format!(
                        "stored message {key} is missing"
                    )));
                };
                slot.insert(encoding::read_body(body.value(), anchor)?);
            }
            let body = &bodies[&key];
            let (message, since) = copy.of(body, anchor, anchor.instant);
            Ok(Loaded {
                message,
                id: copy.id,
                since,
                shared: copy.shared.or_else(|| body.shared.clone()),
            })
        };
        let mut snapshot = Snapshot::default();
        match txn.open_table(META) {
            Ok(meta) => {
                snapshot.cluster_applied = meta
                    .get("cluster_applied")
                    .map_err(backend)?
                    .map_or(0, |v| v.value());
                snapshot.cluster_forwarded = meta
                    .get("cluster_forwarded")
                    .map_err(backend)?
                    .map_or(0, |v| v.value());
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(backend(e)),
        }
        let rows = match only {
            Some(id) => sessions.range(id..=id),
            None => sessions.iter(),
        };
        for entry in rows.map_err(backend)? {
            let (id, rec) = entry.map_err(backend)?;
            let id = id.value();
            let record = encoding::read_record(rec.value())?;
            let Some(row) = delivery.get(id).map_err(backend)? else {
                return Err(StoreError::Backend(format!(
                    "session {id:?} has no delivery state"
                )));
            };
            let (last_id, _) = encoding::read_delivery_row(row.value())?;
            let mut flows = Vec::new();
            for f in inflight.range((id, 0)..=(id, u16::MAX)).map_err(backend)? {
                let (key, row) = f.map_err(backend)?;
                let pid = PacketId::new(key.value().1)
                    .ok_or_else(|| StoreError::Backend("stored in-flight packet id is 0".into()))?;
                let (seq, state, reference) = encoding::read_flow_ref(row.value())?;
                flows.push((seq, pid, copy_of(reference)?, state));
            }
            flows.sort_by_key(|f| f.0);
            let mut ids = Vec::new();
            for i in inbound.range((id, 0)..=(id, u16::MAX)).map_err(backend)? {
                let (key, state) = i.map_err(backend)?;
                let pid = PacketId::new(key.value().1)
                    .ok_or_else(|| StoreError::Backend("stored inbound packet id is 0".into()))?;
                ids.push((pid, encoding::read_inbound(state.value())?));
            }
            let mut queued = Vec::new();
            if queues {
                for q in queue.range((id, 0)..=(id, u64::MAX)).map_err(backend)? {
                    let (key, row) = q.map_err(backend)?;
                    let mut copy = copy_of(queue_row(row.value())?.1)?;
                    // The key is the message's id.
                    copy.id = MessageId::new(key.value().1).or(copy.id);
                    queued.push(copy);
                }
            }
            // The highest id in the queue (its last key), read or not, and when the first
            // one was queued.
            let (last_queued, oldest) = {
                let last = match queue
                    .range((id, 0)..=(id, u64::MAX))
                    .map_err(backend)?
                    .next_back()
                {
                    Some(row) => row.map_err(backend)?.0.value().1,
                    None => 0,
                };
                let first = if queues || last == 0 {
                    None
                } else {
                    queue
                        .range((id, 0)..=(id, u64::MAX))
                        .map_err(backend)?
                        .next()
                };
                let oldest = match first {
                    Some(row) => {
                        let (_, row) = row.map_err(backend)?;
                        let (_, copy) = encoding::read_reference(queue_row(row.value())?.1)?;
                        copy.since.map(|t| anchor.to_instant(t))
                    }
                    None => None,
                };
                (last, oldest)
            };
            // Copies stored before message ids get ids above every id the session holds.
            let mut next = flows
                .iter()
                .map(|f| &f.2)
                .chain(&queued)
                .filter_map(|c| c.id.map(MessageId::get))
                .max()
                .unwrap_or(0)
                .max(last_queued);
            // Room for the numbering (an id this high is no id Tern gave: unreadable).
            if next > u64::MAX / 2 + (1 << 62) {
                return Err(StoreError::Backend(format!(
                    "session {id:?} holds an unreadable message id"
                )));
            }
            let mut shared = BTreeMap::new();
            let mut entry = |c: Loaded| -> Entry {
                let id = c.id.unwrap_or_else(|| {
                    next += 1;
                    MessageId::new(next).expect("above 0")
                });
                if let Some(group) = c.shared {
                    shared.insert(id, group);
                }
                Entry {
                    id,
                    since: c.since,
                    message: c.message,
                }
            };
            let flows: Vec<_> = flows
                .into_iter()
                .map(|(_, pid, c, s)| (pid, entry(c), s))
                .collect();
            let queued: Vec<_> = queued.into_iter().map(&mut entry).collect();
            let mut state = SessionState::restore(last_id, flows, queued, ids);
            if !queues {
                let (len, bytes) = stats
                    .get(id)
                    .map_err(backend)?
                    .map_or((0, 0), |v| v.value());
                state.restore_spilled(
                    usize::try_from(len).unwrap_or(usize::MAX),
                    usize::try_from(bytes).unwrap_or(usize::MAX),
                    MessageId::new(last_queued),
                    oldest,
                );
            }
            snapshot.sessions.insert(
                Str::from(id),
                StoredSession {
                    record,
                    delivery: state,
                    shared,
                },
            );
        }
        if only.is_some() {
            return Ok(snapshot);
        }
        for entry in retained.iter().map_err(backend)? {
            let (topic, m) = entry.map_err(backend)?;
            let topic = TopicName::new(topic.value())
                .map_err(|_| StoreError::Backend("a stored retained topic is invalid".into()))?;
            snapshot
                .retained
                .insert(topic, encoding::read_message(m.value(), anchor)?);
        }
        for entry in wills.iter().map_err(backend)? {
            let (client_id, w) = entry.map_err(backend)?;
            snapshot.wills.insert(
                Str::from(client_id.value()),
                encoding::read_will_record(w.value())?,
            );
        }
        match txn.open_table(HISTORY) {
            Ok(table) => {
                for entry in table.iter().map_err(backend)? {
                    let (key, row) = entry.map_err(backend)?;
                    let (policy, seq) = key.value();
                    let (at, body) = history_row(row.value())?;
                    let bytes =
                        encoding::read_message(body, anchor).map(|m| crate::history_bytes(&m))?;
                    snapshot
                        .history
                        .insert((Str::from(policy), seq), crate::HistoryMeta { at, bytes });
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(backend(e)),
        }
        for entry in txn
            .open_table(KEYS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (k, row) = entry.map_err(backend)?;
            let (identity, slot) = k.value();
            let row = row.value();
            let bad = || StoreError::Backend("a stored idempotency key is corrupt".into());
            let (millis, key) = row.split_at_checked(8).ok_or_else(bad)?;
            let millis = u64::from_le_bytes(millis.try_into().map_err(|_| bad())?);
            let key = std::str::from_utf8(key).map_err(|_| bad())?;
            snapshot.keys.insert(
                (Str::from(identity), slot),
                (
                    Str::from(key),
                    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(millis),
                ),
            );
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{SessionRecord, Store};
    use tern_codec::QoS;

    fn queued(id: &str, payload: &str, n: u64, now: Instant) -> Op {
        Op::Change {
            client_id: id.into(),
            change: Change::Queued(Entry {
                id: MessageId::new(n).unwrap(),
                since: now,
                message: tern_proto::Message::new(
                    TopicName::new("t").unwrap(),
                    payload.to_string(),
                    QoS::AtLeastOnce,
                ),
            }),
            shared: None,
        }
    }

    /// A file from before queues were keyed by message id (rows in `queue` under a
    /// sequence, references without ids) is moved over when opened: the same messages in
    /// the same order, numbered, counted, readable in parts.
    #[test]
    fn a_store_with_the_old_queue_layout_is_moved_over_when_opened() {
        let dir = std::env::temp_dir().join(format!("tern-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tern.redb");
        let (now, wall) = (Instant::now(), SystemTime::now());
        {
            let mut store = RedbStore::open(&path, now, wall).unwrap();
            let mut batch = vec![Op::PutSession {
                client_id: "a".into(),
                record: SessionRecord::default(),
            }];
            for (n, p) in ["one", "two", "three"].iter().enumerate() {
                batch.push(queued("a", p, n as u64 + 7, now));
            }
            store.commit(&batch).unwrap();
            // Rewrite it the old way: sequence keys from 1 << 40, references that end
            // before the id and time (20 bytes), no counts.
            let db = store.db().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut new = txn.open_table(QUEUE).unwrap();
                let mut old = txn.open_table(OLD_QUEUE).unwrap();
                let rows: Vec<Vec<u8>> = new
                    .iter()
                    .unwrap()
                    .map(|r| r.unwrap().1.value().to_vec())
                    .collect();
                for (k, row) in rows.iter().enumerate() {
                    let reference = &row[4..row.len() - 20];
                    old.insert(("a", (1u64 << 40) + k as u64), reference)
                        .unwrap();
                }
                new.retain(|_, _| false).unwrap();
                txn.open_table(QUEUE_STATS)
                    .unwrap()
                    .retain(|_, _| false)
                    .unwrap();
            }
            txn.commit().unwrap();
            assert_eq!(store.load().unwrap().sessions["a"].delivery.queued_len(), 0);
        }
        let store = RedbStore::open(&path, now, wall).unwrap();
        let full = store.load().unwrap();
        let payloads: Vec<String> = full.sessions["a"]
            .delivery
            .queued()
            .map(|e| String::from_utf8(e.message.payload.to_vec()).unwrap())
            .collect();
        assert_eq!(payloads, ["one", "two", "three"]);
        let ids: Vec<u64> = full.sessions["a"]
            .delivery
            .queued()
            .map(|e| e.id.get())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "numbered in order: {ids:?}"
        );
        let spilled = store.load_spilled().unwrap();
        let d = &spilled.sessions["a"].delivery;
        assert_eq!((d.spilled_len(), d.queued_bytes()), (3, 11));
        let part = store
            .read_queue("a", MessageId::new(ids[0]).unwrap(), 10)
            .unwrap();
        assert_eq!(part.len(), 2);
        let db = store.db().unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(OLD_QUEUE).unwrap().is_empty().unwrap());
        drop(txn);
        drop(db);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
