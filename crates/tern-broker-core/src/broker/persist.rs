//! The store seam: what an input changed becomes ops for the driver to commit
//! ([`Broker::take_ops`]), and deadlines go to the store as wall-clock times.

use super::*;

impl Broker {
    pub(super) fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.anchor.0) {
            Some(d) => self.anchor.1 + d,
            None => self.anchor.1 - self.anchor.0.duration_since(t),
        }
    }

    pub(super) fn instant(&self, t: SystemTime) -> Instant {
        match t.duration_since(self.anchor.1) {
            Ok(d) => self.anchor.0 + d,
            // In the past: due now (an Instant cannot go before the process started).
            Err(_) => self.anchor.0,
        }
    }

    /// Notes that the session's delivery state may change in this input.
    pub(super) fn touch(&mut self, client_id: &Str) {
        if let Some(s) = self.sessions.get_mut(client_id)
            && !s.touched
        {
            s.touched = true;
            self.touched.push(client_id.clone());
        }
    }

    /// Collects the recorded delivery changes of the sessions this input touched.
    pub(super) fn collect_changes(&mut self) {
        for client_id in std::mem::take(&mut self.touched) {
            if !self.replaying.is_empty() && self.replaying.contains(&client_id) {
                self.resume_replay(&client_id);
            }
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            s.touched = false;
            let queued = {
                let state = s.state();
                (state.queued_len(), state.queued_bytes())
            };
            if queued != s.accounted {
                self.shrank |= queued.0 < s.accounted.0 || queued.1 < s.accounted.1;
                self.queued.0 = self.queued.0 + queued.0 - s.accounted.0;
                self.queued.1 = self.queued.1 + queued.1 - s.accounted.1;
                s.accounted = queued;
            }
            match s.take_changes() {
                None => {}
                Some(Changes::Some(changes)) => {
                    let via = &s.via_shared;
                    self.batch.extend(changes.into_iter().map(|change| {
                        // The side map goes to the store with the message it is about.
                        let shared = match &change {
                            Change::Queued(e) | Change::Requeued(e) | Change::Sent(_, e)
                                if !via.is_empty() =>
                            {
                                via.get(&e.id).cloned()
                            }
                            _ => None,
                        };
                        Op::Change {
                            client_id: client_id.clone(),
                            change,
                            shared,
                        }
                    }));
                }
                Some(Changes::All(state)) => {
                    let shared = s
                        .via_shared
                        .iter()
                        .filter(|(id, _)| state.holds(**id))
                        .map(|(id, key)| (*id, key.clone()))
                        .collect();
                    self.batch.push(Op::PutDelivery {
                        client_id: client_id.clone(),
                        state,
                        shared,
                    })
                }
            }
            if self.settings.queue_window.is_none() || !s.persisted {
                continue;
            }
            match &mut s.conn {
                // Everything it holds is in this input's ops now: an offline session
                // keeps none of its queue in memory.
                Link::Offline(stored) if stored.queued().next().is_some() => {
                    stored.spill_all();
                    s.prune_via_shared();
                }
                Link::Online((_, c)) => {
                    if let Some((after, max)) = c.session().wants_load() {
                        self.last_load += 1;
                        c.begin_load(self.last_load);
                        self.loads.push(Load {
                            client_id: client_id.clone(),
                            token: self.last_load,
                            after,
                            max,
                            early: self.settings.queue_policy != QueuePolicy::DropOldest,
                            born: s.born,
                            history: None,
                        });
                    }
                }
                Link::Offline(_) => {}
            }
        }
    }

    /// The answer to a [`Load`]: the messages read back, in order, each with the shared
    /// subscription it came through. Those the session still waits for join its window
    /// (and go out as it has room); an answer to a load that is no longer wanted (the
    /// session went offline, ended or started again) is ignored.
    ///
    /// An early load ([`Load::early`]) that found nothing committed yet is asked again, to
    /// be read after the next commit.
    pub fn handle_loaded(
        &mut self,
        load: &Load,
        messages: Vec<(Entry, Option<Str>)>,
        now: Instant,
    ) {
        if load.history.is_some() {
            self.history_loaded(load, messages, now);
            return;
        }
        let token = load.token;
        let Some(client_id) = self
            .sessions
            .get_key_value(&load.client_id)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&client_id) else {
            return;
        };
        if s.state().loading() != Some(token) {
            return;
        }
        if messages.is_empty() && load.early {
            self.last_load += 1;
            match &mut s.conn {
                Link::Online((_, c)) => c.begin_load(self.last_load),
                Link::Offline(stored) => stored.begin_load(self.last_load),
            }
            self.loads.push(Load {
                token: self.last_load,
                early: false,
                ..load.clone()
            });
            return;
        }
        let mut groups: Vec<(MessageId, Str)> = Vec::new();
        let entries = messages
            .into_iter()
            .map(|(e, group)| {
                if let Some(g) = group {
                    groups.push((e.id, g));
                }
                e
            })
            .collect();
        let taken = match &mut s.conn {
            Link::Online((_, c)) => c.loaded(token, entries, now),
            Link::Offline(stored) => stored.loaded(token, entries),
        };
        for (id, g) in groups {
            if taken.binary_search(&id).is_ok() {
                s.via_shared.insert(id, g);
            }
        }
        self.touch(&client_id);
        self.list_for_drain(&client_id);
        self.commit(now);
    }

    /// Ends an input: the sessions it gave messages to (listed by `deliver`) are drained,
    /// once each and not inside the drain of the session whose input it is, and the
    /// delivery changes it made join its ops.
    pub(super) fn commit(&mut self, now: Instant) {
        self.drain_listed(now);
        // Copies awaited by settled receipts that this input acknowledged (or dropped).
        if self.receipts.has_copies() {
            let touched: Vec<Str> = self
                .touched
                .iter()
                .filter(|c| self.receipts.awaits(c))
                .cloned()
                .collect();
            for client_id in touched {
                self.settle_copies(&client_id, now);
            }
            self.drain_listed(now);
        }
        self.collect_changes();
        // Queues got shorter: held publishes may fit now.
        if std::mem::take(&mut self.shrank) && !self.blocked.is_empty() {
            self.unblock(None, now);
            self.drain_listed(now);
            self.collect_changes();
            self.shrank = false;
        }
    }

    /// Drains the sessions listed as having something to send.
    fn drain_listed(&mut self, now: Instant) {
        // Two lists swapped, so that draining (which may list more) allocates nothing.
        let mut due = std::mem::take(&mut self.drain_spare);
        while !self.drain_due.is_empty() {
            std::mem::swap(&mut due, &mut self.drain_due);
            for client_id in due.drain(..) {
                self.drain(&client_id, now);
            }
        }
        self.drain_spare = due;
    }

    /// Writes the session's record (expiry, subscriptions, delayed will).
    pub(super) fn put_session(&mut self, client_id: &Str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.expiry.is_zero() {
            // A session whose queue is partly in the store only stays there until it ends
            // (deleted then), rather than lose what is spilled.
            if s.persisted && s.state().spilled_len() == 0 {
                s.persisted = false;
                s.track(None, None);
                self.batch.push(Op::DeleteSession {
                    client_id: client_id.clone(),
                });
            }
            return;
        }
        if !s.persisted {
            // From now on the store follows its delivery state, starting with all of it.
            s.persisted = true;
            s.track(Some(false), self.settings.queue_window);
            self.touch(client_id);
        }
        let s = &self.sessions[client_id];
        let record = SessionRecord {
            expiry: s.expiry,
            expires_at: s.expires_at.map(|t| self.wall(t)),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(filter, (options, id))| Subscription {
                    filter: filter.clone(),
                    options: *options,
                    id: *id,
                })
                .collect(),
            pending_will: s.pending_will.as_deref().map(|(at, will)| PendingWill {
                at: self.wall(*at),
                will: will.clone(),
            }),
            username: s.username.clone(),
            fed: s.fed.as_deref().cloned(),
        };
        self.batch.push(Op::PutSession {
            client_id: client_id.clone(),
            record,
        });
    }

    /// The durable changes made since the last call, in order, as one batch (handed out
    /// with the round's sends, [`Broker::poll_round`]).
    pub(crate) fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.batch)
    }
}
