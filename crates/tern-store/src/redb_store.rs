//! [`RedbStore`]: the durable backend, one redb file, one write transaction (one fsync)
//! per committed batch.
//!
//! Tables: `sessions` (client id -> record), `delivery` (client id -> inflight flows,
//! inbound QoS 2 ids, last packet id), `queue` ((client id, sequence) -> message, so
//! enqueueing is one insert, not a rewrite of the whole queue), `retained` (topic ->
//! message). A batch that names a missing session aborts its transaction: nothing of it
//! is written, as with [`crate::MemoryStore`].

use std::path::Path;
use std::time::{Instant, SystemTime};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tern_codec::{Str, TopicName};

use crate::encoding::{self, Anchor};
use crate::{Op, Snapshot, Store, StoreError, StoredSession};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const DELIVERY: TableDefinition<&str, &[u8]> = TableDefinition::new("delivery");
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The durable store.
pub struct RedbStore {
    db: Database,
    anchor: Anchor,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store file at `path`, creating it if it does not exist. A file that is
    /// not a readable store is an error, never silently replaced. `now` and `wall` are
    /// the same moment (message expiry instants are stored as wall-clock times).
    pub fn open(path: &Path, now: Instant, wall: SystemTime) -> Result<RedbStore, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        // Create the tables once, so reads never meet a missing one.
        let txn = db.begin_write().map_err(backend)?;
        for t in [SESSIONS, DELIVERY, RETAINED] {
            txn.open_table(t).map_err(backend)?;
        }
        txn.open_table(QUEUE).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(RedbStore {
            db,
            anchor: Anchor { instant: now, wall },
        })
    }
}

impl Store for RedbStore {
    fn commit(&mut self, batch: &[Op]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut sessions = txn.open_table(SESSIONS).map_err(backend)?;
            let mut delivery = txn.open_table(DELIVERY).map_err(backend)?;
            let mut queue = txn.open_table(QUEUE).map_err(backend)?;
            let mut retained = txn.open_table(RETAINED).map_err(backend)?;
            for (index, op) in batch.iter().enumerate() {
                let missing = |client_id: &Str| StoreError::NoSuchSession {
                    index,
                    client_id: client_id.to_string(),
                };
                match op {
                    Op::PutSession { client_id, record } => {
                        let id: &str = client_id;
                        sessions
                            .insert(id, encoding::record(record).as_slice())
                            .map_err(backend)?;
                        if delivery.get(id).map_err(backend)?.is_none() {
                            let empty = encoding::delivery(&Default::default(), self.anchor);
                            delivery.insert(id, empty.as_slice()).map_err(backend)?;
                        }
                    }
                    Op::DeleteSession { client_id } => {
                        let id: &str = client_id;
                        sessions.remove(id).map_err(backend)?;
                        delivery.remove(id).map_err(backend)?;
                        queue
                            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                            .map_err(backend)?;
                    }
                    Op::PutDelivery { client_id, state } => {
                        let id: &str = client_id;
                        if sessions.get(id).map_err(backend)?.is_none() {
                            return Err(missing(client_id)); // the transaction is dropped
                        }
                        delivery
                            .insert(id, encoding::delivery(state, self.anchor).as_slice())
                            .map_err(backend)?;
                        queue
                            .retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
                            .map_err(backend)?;
                        for (seq, m) in state.queued().enumerate() {
                            queue
                                .insert(
                                    (id, seq as u64),
                                    encoding::message(m, self.anchor).as_slice(),
                                )
                                .map_err(backend)?;
                        }
                    }
                    Op::Enqueue { client_id, message } => {
                        let id: &str = client_id;
                        if sessions.get(id).map_err(backend)?.is_none() {
                            return Err(missing(client_id));
                        }
                        let next = match queue
                            .range((id, 0)..=(id, u64::MAX))
                            .map_err(backend)?
                            .next_back()
                        {
                            Some(last) => last.map_err(backend)?.0.value().1 + 1,
                            None => 0,
                        };
                        queue
                            .insert(
                                (id, next),
                                encoding::message(message, self.anchor).as_slice(),
                            )
                            .map_err(backend)?;
                    }
                    Op::DequeueOldest { client_id } => {
                        let id: &str = client_id;
                        if sessions.get(id).map_err(backend)?.is_none() {
                            return Err(missing(client_id));
                        }
                        let first = match queue
                            .range((id, 0)..=(id, u64::MAX))
                            .map_err(backend)?
                            .next()
                        {
                            Some(first) => Some(first.map_err(backend)?.0.value().1),
                            None => None,
                        };
                        if let Some(seq) = first {
                            queue.remove((id, seq)).map_err(backend)?;
                        }
                    }
                    Op::PutRetained { message } => {
                        retained
                            .insert(
                                message.topic.as_str(),
                                encoding::message(message, self.anchor).as_slice(),
                            )
                            .map_err(backend)?;
                    }
                    Op::DeleteRetained { topic } => {
                        retained.remove(topic.as_str()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let sessions = txn.open_table(SESSIONS).map_err(backend)?;
        let delivery = txn.open_table(DELIVERY).map_err(backend)?;
        let queue = txn.open_table(QUEUE).map_err(backend)?;
        let retained = txn.open_table(RETAINED).map_err(backend)?;
        let mut snapshot = Snapshot::default();
        for entry in sessions.iter().map_err(backend)? {
            let (id, rec) = entry.map_err(backend)?;
            let id = id.value();
            let record = encoding::read_record(rec.value())?;
            let mut queued = Vec::new();
            for q in queue.range((id, 0)..=(id, u64::MAX)).map_err(backend)? {
                queued.push(encoding::read_message(
                    q.map_err(backend)?.1.value(),
                    self.anchor,
                )?);
            }
            let state = match delivery.get(id).map_err(backend)? {
                Some(d) => encoding::read_delivery(d.value(), queued, self.anchor)?,
                None => {
                    return Err(StoreError::Backend(format!(
                        "session {id:?} has no delivery state"
                    )));
                }
            };
            snapshot.sessions.insert(
                Str::from(id),
                StoredSession {
                    record,
                    delivery: state,
                },
            );
        }
        for entry in retained.iter().map_err(backend)? {
            let (topic, m) = entry.map_err(backend)?;
            let topic = TopicName::new(topic.value())
                .map_err(|_| StoreError::Backend("a stored retained topic is invalid".into()))?;
            snapshot
                .retained
                .insert(topic, encoding::read_message(m.value(), self.anchor)?);
        }
        Ok(snapshot)
    }
}
