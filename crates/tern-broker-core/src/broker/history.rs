//! Topic histories (docs/history.md): the messages of topics whose `[[topic]]` policy keeps
//! a history stay in the store for a while (`history`), within a size bound
//! (`history_max_bytes`), each under a broker-wide position. A subscriber asks for them
//! with a user property on SUBSCRIBE ([`REPLAY_SINCE`], [`REPLAY_FROM`]) and receives them
//! in order, then the live messages: live messages for the replayed filter that arrive
//! during the replay are held until it ends, so nothing is lost or doubled at the seam
//! (every live message has a position after the last one the replay reads, which is
//! fixed when the SUBSCRIBE is handled).
//!
//! What stays in memory per policy is an index of buckets (up to [`BUCKET`] consecutive
//! messages and a 32nd of the size bound: their last position, newest time and bytes),
//! enough to trim by age and by size (to within about 3 % of the bound);
//! the messages are read back from the store in batches of [`BATCH`] as a replay needs
//! them ([`crate::Load::history`]), the next batch asked for once the subscriber's queue
//! has drained below [`BATCH`].

use super::*;

/// The SUBSCRIBE user property asking for a replay from a time: a duration back from now
/// (`90s`, `10m`, `2h`, `1d`) or a Unix time in milliseconds.
pub const REPLAY_SINCE: &str = "replay-since";
/// The SUBSCRIBE user property asking for a replay from a position (the number a kept
/// message carries in [`POSITION`]), inclusive.
pub const REPLAY_FROM: &str = "replay-from";
/// The user property every kept message carries, live and replayed: its position.
pub const POSITION: &str = "history-position";

/// Messages read from the store per batch of a replay.
pub(super) const BATCH: usize = 500;
/// Messages per bucket of the in-memory index.
const BUCKET: u32 = 16;

/// The index of every policy's kept messages.
#[derive(Default)]
pub(super) struct Histories {
    /// The next position.
    next: u64,
    /// By policy filter.
    logs: HashMap<Str, Log>,
}

#[derive(Default)]
struct Log {
    buckets: VecDeque<Bucket>,
    bytes: u64,
    count: u64,
}

struct Bucket {
    last: u64,
    /// When its newest message was published.
    at: SystemTime,
    count: u32,
    bytes: u64,
}

/// A replay under way for one subscription of a session.
pub(super) struct Replay {
    filter: TopicFilter,
    options: SubscriptionOptions,
    id: Option<SubscriptionId>,
    read: tern_store::HistoryRead,
    /// Live messages for the filter, held until the replay ends: (copy, published QoS).
    held: Vec<(Message, QoS)>,
    /// The load asked for and not yet answered.
    token: Option<u64>,
    /// Waiting for the subscriber's queue to drain before the next batch.
    waiting: bool,
}

/// What a SUBSCRIBE asked for: from a position, and/or since a time.
fn requested(
    props: &tern_codec::properties::SubscribeProperties,
    wall: SystemTime,
) -> Option<(u64, Option<SystemTime>)> {
    let mut from = None;
    let mut since = None;
    for (name, value) in &props.user_properties {
        match &**name {
            REPLAY_FROM => match value.trim().parse::<u64>() {
                Ok(n) => from = Some(n),
                Err(_) => {
                    tracing::warn!(value = %value, "replay-from is not a position: no replay")
                }
            },
            REPLAY_SINCE => match since_time(value, wall) {
                Some(t) => since = Some(t),
                None => {
                    tracing::warn!(value = %value, "replay-since is neither a duration (90s, 10m, 2h, 1d) nor Unix milliseconds: no replay")
                }
            },
            _ => {}
        }
    }
    if from.is_none() && since.is_none() {
        return None;
    }
    Some((from.unwrap_or(0), since))
}

/// `90s`, `10m`, `2h`, `1d` back from `wall`, or Unix milliseconds.
pub fn since_time(value: &str, wall: SystemTime) -> Option<SystemTime> {
    let v = value.trim();
    if let Ok(ms) = v.parse::<u64>() {
        return Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    }
    let back = parse_duration(v)?;
    Some(wall.checked_sub(back).unwrap_or(SystemTime::UNIX_EPOCH))
}

/// A duration written `500ms`, `90s`, `10m`, `2h` or `1d`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

impl Broker {
    /// The index of what the store keeps (at start): policies no longer configured to
    /// keep a history lose theirs.
    pub(super) fn load_history(&mut self, kept: BTreeMap<(Str, u64), tern_store::HistoryMeta>) {
        let mut next = 1;
        let mut gone: Vec<Str> = Vec::new();
        for ((policy, seq), meta) in kept {
            next = next.max(seq + 1);
            if !self.keeps_history(&policy) {
                if gone.last() != Some(&policy) {
                    gone.push(policy);
                }
                continue;
            }
            let cap = self.bucket_bytes(&policy);
            self.histories.logs.entry(policy).or_default().push(
                seq,
                meta.at,
                u64::from(meta.bytes),
                cap,
            );
        }
        for policy in gone {
            tracing::info!(policy = %policy, "a topic history no longer configured: dropped");
            self.batch.push(Op::TrimHistory {
                policy,
                through: u64::MAX,
            });
        }
        self.histories.next = next;
    }

    /// Whether no policy keeps a history (the common case costs one check per message).
    pub(super) fn histories_empty(&self) -> bool {
        self.settings.topics.is_empty() || !self.settings.topics.iter().any(|p| p.history.is_some())
    }

    /// The bytes at which a bucket of `policy`'s index is full: a 32nd of its size bound,
    /// so that trimming by size keeps within about 3 % of the bound.
    fn bucket_bytes(&self, policy: &str) -> u64 {
        self.settings
            .topics
            .iter()
            .find(|p| p.filter.as_str() == policy)
            .and_then(|p| p.history_max_bytes)
            .map_or(u64::MAX, |max| (max / 32).max(1))
    }

    fn keeps_history(&self, policy: &str) -> bool {
        self.settings
            .topics
            .iter()
            .any(|p| p.history.is_some() && p.filter.as_str() == policy)
    }

    /// Keeps `message` in its policy's history, if that policy keeps one: stamps its
    /// position on it and stores it in this round's batch.
    pub(super) fn keep_history(&mut self, message: &mut Message, now: Instant) {
        let Some(p) = self.settings.policy_index(&message.topic) else {
            return;
        };
        let policy = &self.settings.topics[p];
        if policy.history.is_none() {
            return;
        }
        let filter: Str = policy.filter.as_str().into();
        let max_bytes = policy.history_max_bytes;
        let seq = self.histories.next.max(1);
        self.histories.next = seq + 1;
        message
            .properties
            .user_properties
            .push((POSITION.into(), seq.to_string().into()));
        let at = self.wall(now);
        let bytes = tern_store::history_bytes(message);
        self.batch.push(Op::PutHistory {
            policy: filter.clone(),
            seq,
            at,
            message: message.clone(),
        });
        let cap = max_bytes.map_or(u64::MAX, |max| (max / 32).max(1));
        let log = self.histories.logs.entry(filter.clone()).or_default();
        log.push(seq, at, u64::from(bytes), cap);
        if let Some(max) = max_bytes {
            while log.bytes > max && log.buckets.len() > 1 {
                let through = log.pop();
                self.counters.history_trimmed += 1;
                self.batch.push(Op::TrimHistory {
                    policy: filter.clone(),
                    through,
                });
            }
        }
    }

    /// Forgets what has outlived its policy's `history` time.
    pub(super) fn trim_history(&mut self, now: Instant) {
        let wall = self.wall(now);
        for policy in self.settings.topics.iter() {
            let Some(keep) = policy.history else { continue };
            let Some(log) = self.histories.logs.get_mut(policy.filter.as_str()) else {
                continue;
            };
            let mut through = None;
            while log.buckets.front().is_some_and(|b| b.at + keep <= wall) {
                through = Some(log.pop());
            }
            if let Some(through) = through {
                self.counters.history_trimmed += 1;
                self.batch.push(Op::TrimHistory {
                    policy: policy.filter.as_str().into(),
                    through,
                });
            }
        }
    }

    /// When the oldest kept bucket of any history outlives its time.
    pub(super) fn history_deadline(&self) -> Option<Instant> {
        self.settings
            .topics
            .iter()
            .filter_map(|p| {
                let keep = p.history?;
                let front = self
                    .histories
                    .logs
                    .get(p.filter.as_str())?
                    .buckets
                    .front()?;
                Some(self.instant(front.at + keep))
            })
            .min()
    }

    /// Messages and bytes kept, by policy filter (for metrics).
    pub fn history_sizes(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<(String, u64, u64)> = self
            .histories
            .logs
            .iter()
            .map(|(f, l)| (f.to_string(), l.count, l.bytes))
            .collect();
        v.sort();
        v
    }

    /// Starts a replay of the history for a subscription just granted, if the SUBSCRIBE
    /// asked for one. One replay per session at a time; another asked for while one runs
    /// is not started (logged).
    pub(super) fn start_replay(
        &mut self,
        client_id: &Str,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        id: Option<SubscriptionId>,
        props: &tern_codec::properties::SubscribeProperties,
        now: Instant,
    ) {
        if props.user_properties.is_empty() || filter.share_group().is_some() {
            return;
        }
        let Some((from, since)) = requested(props, self.wall(now)) else {
            return;
        };
        let policies: Vec<Str> = self
            .settings
            .topics
            .iter()
            .filter(|p| p.history.is_some())
            .map(|p| Str::from(p.filter.as_str()))
            .collect();
        let through = self.histories.next.saturating_sub(1);
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.replay.is_some() {
            tracing::warn!(client_id = %client_id, filter = %filter.as_str(), "a replay is already under way for this session: not started");
            return;
        }
        if policies.is_empty() || from > through {
            tracing::debug!(client_id = %client_id, filter = %filter.as_str(), "nothing kept to replay");
            return;
        }
        self.counters.replays += 1;
        tracing::info!(client_id = %client_id, filter = %filter.as_str(), from, through, "replay started");
        s.replay = Some(Box::new(Replay {
            filter: filter.clone(),
            options,
            id,
            read: tern_store::HistoryRead {
                policies,
                filter: filter.as_str().into(),
                from,
                through,
                since,
                max: BATCH,
            },
            held: Vec::new(),
            token: None,
            waiting: false,
        }));
        self.replaying.insert(client_id.clone());
        self.next_replay_load(client_id);
    }

    /// Asks for the next batch of `client_id`'s replay.
    fn next_replay_load(&mut self, client_id: &Str) {
        let Some(after) = MessageId::new(1) else {
            return;
        };
        self.last_load += 1;
        let token = self.last_load;
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let born = s.born;
        let Some(r) = s.replay.as_mut() else { return };
        r.token = Some(token);
        r.waiting = false;
        self.loads.push(Load {
            client_id: client_id.clone(),
            token,
            after,
            max: BATCH,
            early: false,
            born,
            history: Some(Box::new(r.read.clone())),
        });
    }

    /// A replay waiting for room asks for its next batch once the queue has drained
    /// (called for sessions whose delivery state changed).
    pub(super) fn resume_replay(&mut self, client_id: &Str) {
        let due = self.sessions.get(client_id).is_some_and(|s| {
            s.replay.as_ref().is_some_and(|r| r.waiting) && s.state().queued_len() < BATCH
        });
        if due {
            self.next_replay_load(client_id);
        }
    }

    /// Holds a live copy for `client_id` if its replay covers the copy's topic; gives the
    /// copy back otherwise (to be delivered now).
    pub(super) fn hold_for_replay(
        &mut self,
        client_id: &Str,
        copy: Message,
        published: QoS,
    ) -> Option<Message> {
        let Some(r) = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.replay.as_mut())
        else {
            return Some(copy);
        };
        if !r.filter.matches(&copy.topic) {
            return Some(copy);
        }
        r.held.push((copy, published));
        None
    }

    /// A batch of a replay read from the store: delivered in order; the next batch asked
    /// for, now or once the queue drains; at the end the held live messages go.
    pub(super) fn history_loaded(
        &mut self,
        load: &Load,
        entries: Vec<(Entry, Option<Str>)>,
        now: Instant,
    ) {
        let client_id = load.client_id.clone();
        let Some(s) = self.sessions.get_mut(&client_id) else {
            self.replaying.remove(&client_id);
            return;
        };
        let Some(r) = s.replay.as_mut() else {
            self.replaying.remove(&client_id);
            return;
        };
        if r.token != Some(load.token) {
            return;
        }
        r.token = None;
        let (granted, id) = (r.options.qos, r.id);
        let done = entries.len() < BATCH
            || entries
                .last()
                .is_some_and(|(e, _)| e.id.get() >= r.read.through);
        if let Some((last, _)) = entries.last() {
            r.read.from = last.id.get() + 1;
        }
        let count = entries.len() as u64;
        for (entry, _) in entries {
            let mut m = entry.message;
            if m.is_expired(now) {
                self.counters.drop_n(DropReason::Expired, 1);
                continue;
            }
            let published = m.qos;
            m.qos = effective_qos(m.qos, granted, QoS::ExactlyOnce);
            m.retain = false;
            if let Some(id) = id {
                m.properties.subscription_identifiers = vec![id];
            }
            self.deliver(&client_id, m, published, None, now);
        }
        self.counters.replayed += count;
        if done {
            let held = self
                .sessions
                .get_mut(&client_id)
                .and_then(|s| s.replay.take())
                .map(|r| r.held)
                .unwrap_or_default();
            self.replaying.remove(&client_id);
            tracing::info!(client_id = %client_id, held = held.len(), "replay done: live from here");
            for (m, published) in held {
                self.deliver(&client_id, m, published, None, now);
            }
        } else if let Some(s) = self.sessions.get_mut(&client_id) {
            if s.state().queued_len() < BATCH {
                self.next_replay_load(&client_id);
            } else if let Some(r) = s.replay.as_mut() {
                r.waiting = true;
            }
        }
        self.list_for_drain(&client_id);
        self.drain(&client_id, now);
    }
}

impl Log {
    /// Adds a message; a bucket takes up to [`BUCKET`] messages and `cap` bytes.
    fn push(&mut self, seq: u64, at: SystemTime, bytes: u64, cap: u64) {
        self.bytes += bytes;
        self.count += 1;
        if let Some(b) = self.buckets.back_mut()
            && b.count < BUCKET
            && b.bytes < cap
        {
            b.last = seq;
            b.at = b.at.max(at);
            b.count += 1;
            b.bytes += bytes;
            return;
        }
        self.buckets.push_back(Bucket {
            last: seq,
            at,
            count: 1,
            bytes,
        });
    }

    /// Drops the oldest bucket: its last position.
    fn pop(&mut self) -> u64 {
        let Some(b) = self.buckets.pop_front() else {
            return 0;
        };
        self.bytes -= b.bytes;
        self.count -= u64::from(b.count);
        b.last
    }
}
