//! The durable outbox: the client's session state (QoS 1/2 messages in flight and waiting,
//! inbound QoS 2 ids, the last packet id) kept in a redb file by the same store the broker
//! uses, updated change by change before anything is sent.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use tern_codec::Str;
use tern_proto::{Changes, SessionState};
use tern_store::{Op, RedbStore, SessionRecord, Store};

use crate::Error;

pub(crate) struct Outbox {
    /// `None` only while a commit runs on the blocking pool.
    store: Option<RedbStore>,
    client_ids: Vec<Str>,
    ops: Vec<Op>,
}

fn fail(path: &std::path::Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Outbox(format!("{}: {e}", path.display()))
}

impl Outbox {
    /// Opens (or creates) the file and reads back the session kept for `client_id`.
    pub(crate) async fn open(
        path: PathBuf,
        client_id: &str,
    ) -> Result<(Outbox, SessionState), Error> {
        let (outbox, mut states) = Outbox::open_many(path, &[client_id]).await?;
        let state = states.pop().unwrap_or_else(SessionState::new);
        Ok((outbox, state))
    }

    /// Opens (or creates) the file and reads back the sessions kept for `client_ids`
    /// (in that order): one file whose sessions change together, in one commit
    /// ([`Outbox::save_many`]), as the bridge needs.
    pub(crate) async fn open_many(
        path: PathBuf,
        client_ids: &[&str],
    ) -> Result<(Outbox, Vec<SessionState>), Error> {
        if client_ids.iter().any(|id| id.is_empty()) {
            return Err(Error::Outbox(
                "an outbox needs a client identifier (it is kept per client)".into(),
            ));
        }
        let ids: Vec<Str> = client_ids.iter().map(|&id| Str::from(id)).collect();
        let keys = ids.clone();
        tokio::task::spawn_blocking(move || {
            let fail = fail(&path);
            let mut store = RedbStore::open(&path, Instant::now(), SystemTime::now())
                .map_err(|e| fail(e.to_string()))?;
            let mut snapshot = store.load().map_err(|e| fail(e.to_string()))?;
            let mut states = Vec::with_capacity(keys.len());
            for key in &keys {
                let mut state = match snapshot.sessions.remove(key) {
                    Some(s) => s.delivery,
                    None => {
                        store
                            .commit(&[Op::PutSession {
                                client_id: key.clone(),
                                record: SessionRecord::default(),
                            }])
                            .map_err(|e| fail(e.to_string()))?;
                        SessionState::new()
                    }
                };
                // The file holds this state: from now on only changes are written.
                state.track(true);
                states.push(state);
            }
            let outbox = Outbox {
                store: Some(store),
                client_ids: keys,
                ops: Vec::new(),
            };
            Ok((outbox, states))
        })
        .await
        .map_err(|e| Error::Outbox(e.to_string()))?
    }

    /// Writes `changes` (what changed in the session since the last call: the engine's
    /// or the held state's `take_changes`), durably (fsync), in one commit.
    pub(crate) async fn save(&mut self, changes: Option<Changes>) -> Result<(), Error> {
        self.save_many([changes]).await
    }

    /// As [`Outbox::save`] for every session of the file, the `i`th change set being
    /// the `i`th session's of [`Outbox::open_many`]: all of them in one commit, or none.
    pub(crate) async fn save_many<const N: usize>(
        &mut self,
        changes: [Option<Changes>; N],
    ) -> Result<(), Error> {
        for (i, changes) in changes.into_iter().enumerate() {
            let Some(client_id) = self.client_ids.get(i) else {
                continue;
            };
            match changes {
                None => {}
                Some(Changes::Some(changes)) => {
                    self.ops
                        .extend(changes.into_iter().map(|change| Op::Change {
                            client_id: client_id.clone(),
                            change,
                            shared: None,
                        }));
                }
                Some(Changes::All(all)) => self.ops.push(Op::PutDelivery {
                    client_id: client_id.clone(),
                    state: all,
                    shared: Default::default(),
                }),
            }
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        let Some(mut store) = self.store.take() else {
            return Err(Error::Outbox("an earlier write failed".into()));
        };
        let mut ops = std::mem::take(&mut self.ops);
        let (store, ops, result) = tokio::task::spawn_blocking(move || {
            let result = store.commit(&ops);
            ops.clear();
            (store, ops, result)
        })
        .await
        .map_err(|e| Error::Outbox(e.to_string()))?;
        self.store = Some(store);
        self.ops = ops;
        result
            .map(|_committed| ())
            .map_err(|e| Error::Outbox(e.to_string()))
    }
}
