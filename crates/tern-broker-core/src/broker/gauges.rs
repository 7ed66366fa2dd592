//! What the broker reports about itself: gauges at a moment and its counters.

use super::*;

/// One session's queue in [`Gauges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGauge {
    /// Its client.
    pub client_id: Str,
    /// Messages queued.
    pub queued: usize,
    /// Age of the oldest.
    pub oldest: Duration,
}

/// A snapshot of the broker's state for metrics ([`Broker::gauges`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions with a connection up.
    pub online: usize,
    /// Sessions kept while their client is away.
    pub offline: usize,
    /// Subscriptions over all sessions.
    pub subscriptions: usize,
    /// Retained messages (`$SYS` excluded).
    pub retained: usize,
    /// Messages waiting in session queues.
    pub queued: usize,
    /// Their payload bytes.
    pub queued_bytes: usize,
    /// Age of the oldest queued message.
    pub oldest: Duration,
    /// Outbound QoS 1/2 flows not yet complete.
    pub inflight_out: usize,
    /// Inbound QoS 2 flows waiting for PUBREL.
    pub inflight_in: usize,
    /// The sessions with the deepest queues, deepest first.
    pub largest: Vec<SessionGauge>,
    /// Idempotency keys remembered.
    pub idempotency_keys: usize,
    /// Settled receipts waiting for copies to be acknowledged.
    pub receipts_waiting: usize,
    /// Topic histories: (policy filter, messages kept, their topic and payload bytes).
    pub history: Vec<(String, u64, u64)>,
    /// Replays under way.
    pub replaying: usize,
    /// The core's counters at the same moment.
    pub counters: Counters,
}

impl Broker {
    /// The live delivery state of a session (in flight, queued, inbound QoS 2 ids).
    pub fn session_state(&self, client_id: &str) -> Option<&SessionState> {
        Some(self.sessions.get(client_id)?.state())
    }

    /// The messages the session holds that came through a shared subscription, with the
    /// subscription: the broker's side map, as the store should hold it.
    pub fn shared_copies(&self, client_id: &str) -> Option<BTreeMap<MessageId, Str>> {
        let s = self.sessions.get(client_id)?;
        let state = s.state();
        Some(
            s.via_shared
                .iter()
                .filter(|(id, _)| state.holds(**id))
                .map(|(id, key)| (*id, key.clone()))
                .collect(),
        )
    }

    /// Sessions, subscriptions, queues and flows as they are at `now`, with the `top`
    /// sessions whose queues are deepest.
    pub fn gauges(&self, now: Instant, top: usize) -> Gauges {
        let mut g = Gauges::default();
        let mut largest: Vec<SessionGauge> = Vec::new();
        for (client_id, s) in &self.sessions {
            let state = match &s.conn {
                Link::Online((_, c)) => {
                    g.online += 1;
                    c.session()
                }
                Link::Offline(stored) => {
                    g.offline += 1;
                    stored
                }
            };
            g.subscriptions += s.subscriptions.len();
            g.inflight_out += state.inflight_len();
            g.inflight_in += state.inbound_len();
            let queued = state.queued_len();
            if queued == 0 {
                continue;
            }
            g.queued += queued;
            g.queued_bytes += state.queued_bytes();
            // The queue is in arrival order; messages loaded from the store count from
            // the broker's start.
            let oldest = state
                .oldest_since()
                .map(|since| now.saturating_duration_since(since))
                .unwrap_or_default();
            g.oldest = g.oldest.max(oldest);
            largest.push(SessionGauge {
                client_id: client_id.clone(),
                queued,
                oldest,
            });
        }
        largest.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.client_id.cmp(&b.client_id)));
        largest.truncate(top);
        g.largest = largest;
        g.counters = self.counters.clone();
        g.idempotency_keys = self.keys.len();
        g.receipts_waiting = self.receipts.waiting();
        g.history = self.history_sizes();
        g.replaying = self
            .sessions
            .values()
            .filter(|s| s.replay.is_some())
            .count();
        // The broker's own $SYS messages are not counted.
        g.retained = self.retained.keys().filter(|t| !routing::is_sys(t)).count();
        g
    }

    /// What this broker has counted.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts on from `counters` (those of the broker this one replaces, so that the
    /// exported counters never go back).
    pub fn set_counters(&mut self, counters: Counters) {
        self.counters = counters;
    }
}
