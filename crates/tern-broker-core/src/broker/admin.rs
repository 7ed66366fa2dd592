//! What the admin API shows of the sessions: a page of summaries (searched by client id or
//! username) and one session whole. Read-only views of the core's state at a moment, like
//! [`Broker::gauges`]; the server turns them into JSON.

use super::*;

/// One session in a [`SessionsPage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    /// Its client.
    pub client_id: Str,
    /// The username of its last connection.
    pub username: Option<Str>,
    /// Whether a connection is up.
    pub online: bool,
    /// Its subscriptions.
    pub subscriptions: usize,
    /// Messages waiting in its queue (in memory and in the store).
    pub queued: usize,
    /// Their payload bytes.
    pub queued_bytes: usize,
    /// Outbound QoS 1/2 flows not yet complete.
    pub inflight_out: usize,
    /// Inbound QoS 2 flows waiting for PUBREL.
    pub inflight_in: usize,
    /// How long it outlives its connection.
    pub expiry: Duration,
    /// For an offline session: how long until it ends.
    pub expires_in: Option<Duration>,
}

/// A page of sessions, in client id order ([`Broker::sessions_page`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsPage {
    /// Sessions matching the search, over all pages.
    pub total: usize,
    /// This page's.
    pub sessions: Vec<SessionSummary>,
}

/// One subscription in a [`SessionView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionView {
    /// The filter (`$share/{group}/...` for a shared one).
    pub filter: Str,
    /// Its options.
    pub options: SubscriptionOptions,
    /// Its 5.0 Subscription Identifier.
    pub id: Option<u32>,
}

/// A will as the admin API shows it (not its payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillView {
    /// Where it goes.
    pub topic: Str,
    /// At what QoS.
    pub qos: QoS,
    /// Retained.
    pub retain: bool,
    /// Its payload's size.
    pub payload_bytes: usize,
    /// Waiting out its Will Delay Interval: how long until it goes.
    pub due_in: Option<Duration>,
}

/// One outbound message in flight, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightView {
    /// Its packet id.
    pub packet_id: u16,
    /// Its topic.
    pub topic: Str,
    /// Its QoS.
    pub qos: QoS,
    /// Waiting for PUBACK/PUBREC (false) or, at QoS 2, for PUBCOMP (true).
    pub released: bool,
    /// Its payload's size.
    pub payload_bytes: usize,
    /// How long since it entered the session.
    pub age: Duration,
}

/// One session whole ([`Broker::session_view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// What the page shows.
    pub summary: SessionSummary,
    /// Its subscriptions, in filter order.
    pub subscriptions: Vec<SubscriptionView>,
    /// The will of its connection, or one waiting out its delay.
    pub will: Option<WillView>,
    /// The connection up, and its peer address.
    pub connection: Option<(ConnId, Str)>,
    /// Its outbound messages in flight, in send order (at most 100).
    pub inflight: Vec<InflightView>,
}

impl Broker {
    fn summary(&self, client_id: &Str, s: &Session, now: Instant) -> SessionSummary {
        let state = s.state();
        SessionSummary {
            client_id: client_id.clone(),
            username: s.username.clone(),
            online: matches!(s.conn, Link::Online(_)),
            subscriptions: s.subscriptions.len(),
            queued: state.queued_len(),
            queued_bytes: state.queued_bytes(),
            inflight_out: state.inflight_len(),
            inflight_in: state.inbound_len(),
            expiry: s.expiry,
            expires_in: s.expires_at.map(|at| at.saturating_duration_since(now)),
        }
    }

    /// The sessions whose client id or username contains `search` (all when it is empty),
    /// in client id order, `limit` of them from `offset`.
    pub fn sessions_page(
        &self,
        search: &str,
        offset: usize,
        limit: usize,
        now: Instant,
    ) -> SessionsPage {
        let mut ids: Vec<&Str> = self
            .sessions
            .iter()
            .filter(|(id, s)| {
                search.is_empty()
                    || id.contains(search)
                    || s.username.as_deref().is_some_and(|u| u.contains(search))
            })
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        let total = ids.len();
        let sessions = ids
            .into_iter()
            .skip(offset)
            .take(limit)
            .filter_map(|id| Some(self.summary(id, self.sessions.get(id)?, now)))
            .collect();
        SessionsPage { total, sessions }
    }

    /// One session whole, if there is one under `client_id`.
    pub fn session_view(&self, client_id: &str, now: Instant) -> Option<SessionView> {
        let (id, s) = self.sessions.get_key_value(client_id)?;
        let will = match (&s.will, &s.pending_will) {
            (Some(w), _) => Some((&**w, None)),
            (None, Some(p)) => Some((&p.1, Some(p.0.saturating_duration_since(now)))),
            (None, None) => None,
        };
        Some(SessionView {
            summary: self.summary(id, s, now),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(filter, (options, sid))| SubscriptionView {
                    filter: Str::from(filter.as_str()),
                    options: *options,
                    id: sid.map(|i| i.get()),
                })
                .collect(),
            will: will.map(|(w, due_in)| WillView {
                topic: Str::from(w.topic.as_str()),
                qos: w.qos,
                retain: w.retain,
                payload_bytes: w.payload.len(),
                due_in,
            }),
            connection: match &s.conn {
                Link::Online((conn, _)) => Some((*conn, Str::from(self.peer(*conn)))),
                Link::Offline(_) => None,
            },
            inflight: s
                .state()
                .inflight()
                .take(100)
                .map(|f| InflightView {
                    packet_id: f.id.get(),
                    topic: Str::from(f.message.topic.as_str()),
                    qos: f.message.qos,
                    released: f.state == tern_proto::OutboundState::Released,
                    payload_bytes: f.message.payload.len(),
                    age: now.saturating_duration_since(f.since),
                })
                .collect(),
        })
    }
}

/// What an operator can do to the broker (the admin API's actions). Each is an input like a
/// packet: its durable effects go into the next round's batch, committed before anything
/// that depends on them is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Closes the client's connection (5.0: DISCONNECT 0x98 Administrative action); its
    /// will goes as for any connection the server ends; the session stays, per its expiry.
    Disconnect(Str),
    /// Ends the session (disconnecting its client first): subscriptions, queue and flows
    /// go, as when a session expires.
    DeleteSession(Str),
    /// Drops the messages waiting in the session's queue (not those in flight).
    PurgeQueue(Str),
    /// Deletes the retained message on a topic.
    DeleteRetained(Str),
}

impl Broker {
    /// What it runs with (the admin API shows the limits).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Durable rounds handed out since this core started: a change made before
    /// [`Broker::poll_round`] is committed once the host has committed this many.
    pub fn durable_rounds(&self) -> u64 {
        self.rounds
    }

    /// Carries out `action`; false if there was nothing to act on (no such session, client
    /// not connected, no retained message there), with nothing changed.
    pub fn handle_admin(&mut self, action: &AdminAction, now: Instant) -> bool {
        let done = match action {
            AdminAction::Disconnect(id) => self.admin_disconnect(id, now),
            AdminAction::DeleteSession(id) => {
                let Some((id, _)) = self.sessions.get_key_value(&**id) else {
                    return false;
                };
                let id = id.clone();
                self.admin_disconnect(&id, now);
                tracing::info!(client_id = %id, "session deleted by an administrator");
                self.end_session(&id, now);
                true
            }
            AdminAction::PurgeQueue(id) => {
                let Some((id, _)) = self.sessions.get_key_value(&**id) else {
                    return false;
                };
                let id = id.clone();
                let Some(s) = self.sessions.get_mut(&id) else {
                    return false;
                };
                let mut purged = 0u64;
                match &mut s.conn {
                    Link::Online((_, c)) => {
                        while c.drop_oldest() {
                            purged += 1;
                        }
                    }
                    Link::Offline(stored) => {
                        while stored.drop_oldest() {
                            purged += 1;
                        }
                    }
                }
                tracing::info!(client_id = %id, purged, "queue purged by an administrator");
                self.touch(&id);
                true
            }
            AdminAction::DeleteRetained(topic) => {
                let Ok(topic) = TopicName::new(&**topic) else {
                    return false;
                };
                if self.retained.remove(&topic).is_none() {
                    return false;
                }
                tracing::info!(%topic, "retained message deleted by an administrator");
                if !routing::is_sys(&topic) {
                    self.batch.push(Op::DeleteRetained { topic });
                }
                true
            }
        };
        self.commit(now);
        done
    }

    fn admin_disconnect(&mut self, client_id: &str, now: Instant) -> bool {
        let Some((id, _)) = self.sessions.get_key_value(client_id) else {
            return false;
        };
        let id = id.clone();
        let Some((conn, c)) = self.sessions.get_mut(&id).and_then(|s| s.conn.as_mut()) else {
            return false;
        };
        let conn = *conn;
        c.disconnect(ReasonCode::AdministrativeAction);
        self.drain(&id, now);
        self.outputs.push_back(Output::Close(conn));
        self.close(conn, now, &"disconnected by an administrator");
        true
    }
}

/// One retained message as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedView {
    /// Its topic.
    pub topic: Str,
    /// Its QoS.
    pub qos: QoS,
    /// Its payload's size.
    pub payload_bytes: usize,
}

impl Broker {
    /// The retained messages whose topics match `filter` (`$SYS` ones only for a filter
    /// that names `$SYS`), in topic order: the total and `limit` of them from `offset`.
    pub fn retained_matching(
        &self,
        filter: &TopicFilter,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<RetainedView>) {
        let all: Vec<&Message> = self
            .retained
            .iter()
            .filter(|(topic, _)| filter.matches(topic))
            .map(|(_, m)| m)
            .collect();
        let page = all
            .iter()
            .skip(offset)
            .take(limit)
            .map(|m| RetainedView {
                topic: Str::from(m.topic.as_str()),
                qos: m.qos,
                payload_bytes: m.payload.len(),
            })
            .collect();
        (all.len(), page)
    }
}
