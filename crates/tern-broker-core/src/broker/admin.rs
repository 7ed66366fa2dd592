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
        })
    }
}
