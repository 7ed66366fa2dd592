//! A durable bridge between two brokers: messages on chosen topics go from the local
//! broker to a remote one (`out`), from the remote to the local (`in`), or both, each
//! taken from its source as a subscriber with a persistent session and passed on as a
//! publisher with another.
//!
//! What makes it durable: the two sessions (the bridge's subscriber-and-publisher state
//! towards the local broker and towards the remote) live in one file, and a message's
//! acknowledgement to the broker it came from (PUBACK, or PUBREC for QoS 2) goes out only
//! after the commit that stored the copy for the other broker and, for QoS 2, the id the
//! source must not deliver twice. So a QoS 1/2 message the source broker has handed over
//! is, at every moment, either still the source's to resend or in the file, and the copy
//! travels under the publishing session's packet id until the other broker completes it:
//! nothing acknowledged is lost across restarts of either broker or of the bridge, and a
//! QoS 2 message reaches the other broker once (a broker that loses its own session state,
//! which a persistent broker does not, may receive a QoS 2 message it had again).
//!
//! Flow control: at most [`Bridge::max_waiting`] messages wait for a side; beyond it the
//! bridge holds back its acknowledgements to the other, so that broker stops sending (its
//! Receive Maximum towards the bridge is [`RECEIVE_MAXIMUM`]) and keeps the rest in its
//! own queue for the bridge's session.
//!
//! Loops: subscriptions are made with No Local (5.0), so the bridge does not get back what
//! it published on the same broker. A 3.1.1 remote has no No Local; a route in both
//! directions to one is refused ([`Bridge::check`]).

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_codec::{ConnAck, Connect, Packet, PacketId, QoS, ReasonCode, TopicFilter};
use tern_codec::{RetainHandling, Subscription, SubscriptionOptions, TopicName};
use tern_proto::Message;
use tokio::io::AsyncReadExt;

use crate::driver::{Link, flush};
use crate::outbox::Outbox;
use crate::state::ClientState;
use crate::{Backoff, Error, Options};

/// The bridge's Receive Maximum towards each broker (5.0): QoS 1/2 messages a broker may
/// have sent it unacknowledged.
pub const RECEIVE_MAXIMUM: u16 = 256;

/// Which way a route carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local broker to remote broker.
    Out,
    /// Remote broker to local broker.
    In,
    /// Both ways.
    Both,
}

/// One of the two brokers a bridge joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The broker the bridge belongs to.
    Local = 0,
    /// The other one.
    Remote = 1,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// A topic mapping, Mosquitto's `topic PATTERN DIRECTION QOS LOCAL-PREFIX REMOTE-PREFIX`:
/// messages on `local_prefix + PATTERN` at the local broker go to `remote_prefix + the
/// same rest` at the remote (and the other way for `in`), at most at `qos`.
///
/// ```
/// use tern_client::bridge::{Direction, Route, Side, map_topic};
/// use tern_client::QoS;
/// let routes = vec![
///     Route::new("sensors/#", Direction::Out, QoS::AtLeastOnce).prefixes("", "site-7/"),
///     Route::new("commands/#", Direction::In, QoS::ExactlyOnce).prefixes("", "site-7/"),
/// ];
/// assert_eq!(
///     map_topic(&routes, Side::Local, "sensors/t1"),
///     Some(("site-7/sensors/t1".to_string(), QoS::AtLeastOnce))
/// );
/// assert_eq!(
///     map_topic(&routes, Side::Remote, "site-7/commands/reboot"),
///     Some(("commands/reboot".to_string(), QoS::ExactlyOnce))
/// );
/// assert_eq!(map_topic(&routes, Side::Remote, "site-7/sensors/t1"), None); // not `in`
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The topic filter below the prefixes.
    pub pattern: String,
    /// Which way.
    pub direction: Direction,
    /// The highest QoS messages travel at (a message keeps a lower one).
    pub qos: QoS,
    /// Put before the pattern at the local broker.
    pub local_prefix: String,
    /// Put before the pattern at the remote broker.
    pub remote_prefix: String,
}

impl Route {
    /// A route with no prefixes.
    pub fn new(pattern: impl Into<String>, direction: Direction, qos: QoS) -> Route {
        Route {
            pattern: pattern.into(),
            direction,
            qos,
            local_prefix: String::new(),
            remote_prefix: String::new(),
        }
    }

    /// With the local and remote prefixes.
    pub fn prefixes(mut self, local: impl Into<String>, remote: impl Into<String>) -> Route {
        self.local_prefix = local.into();
        self.remote_prefix = remote.into();
        self
    }

    /// Whether it carries messages that come from `from`.
    pub fn carries(&self, from: Side) -> bool {
        matches!(
            (self.direction, from),
            (Direction::Both, _) | (Direction::Out, Side::Local) | (Direction::In, Side::Remote)
        )
    }

    fn prefix(&self, side: Side) -> &str {
        match side {
            Side::Local => &self.local_prefix,
            Side::Remote => &self.remote_prefix,
        }
    }

    /// The filter the bridge subscribes to at `side`.
    pub fn filter(&self, side: Side) -> String {
        format!("{}{}", self.prefix(side), self.pattern)
    }

    /// Why the route cannot work, if it cannot: a pattern or prefixed filter MQTT does not
    /// allow, a wildcard in a prefix, a shared subscription.
    pub fn check(&self) -> Result<(), String> {
        if self.pattern.is_empty() {
            return Err("a route needs a topic pattern".into());
        }
        for side in [Side::Local, Side::Remote] {
            let prefix = self.prefix(side);
            if prefix.contains(['+', '#']) {
                return Err(format!(
                    "the {} prefix '{prefix}' holds a wildcard (prefixes are topic levels)",
                    side.name()
                ));
            }
            let filter = self.filter(side);
            let parsed = TopicFilter::new(filter.as_str())
                .map_err(|e| format!("'{filter}' is not a topic filter: {e}"))?;
            if parsed.share_group().is_some() {
                return Err(format!("'{filter}' is a shared subscription"));
            }
        }
        Ok(())
    }
}

/// The topic and QoS a message on `topic` from `from` takes on the other side, by the
/// first route that carries it; `None` if no route does.
pub fn map_topic(routes: &[Route], from: Side, topic: &str) -> Option<(String, QoS)> {
    let to = match from {
        Side::Local => Side::Remote,
        Side::Remote => Side::Local,
    };
    routes.iter().filter(|r| r.carries(from)).find_map(|r| {
        let rest = topic.strip_prefix(r.prefix(from))?;
        tern_codec::matches_with(&r.pattern, rest, |f, t| f == t)
            .then(|| (format!("{}{rest}", r.prefix(to)), r.qos))
    })
}

/// What a running bridge has done, for metrics (index 0 the local side, 1 the remote).
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Whether the bridge is connected to each broker.
    pub connected: [AtomicBool; 2],
    /// Connections made to each broker.
    pub connects: [AtomicU64; 2],
    /// Messages taken from each broker and passed to the other (`[0]` is local to remote).
    pub forwarded: [AtomicU64; 2],
    /// Messages waiting for each broker (queued, or sent and not yet acknowledged).
    pub waiting: [AtomicU64; 2],
    /// QoS 0 messages not passed on because the other broker was not connected.
    pub dropped: AtomicU64,
    /// Messages a broker refused (an error reason code in PUBACK/PUBREC).
    pub refused: AtomicU64,
}

/// A bridge: the two brokers, the routes, and the file that keeps both sessions.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// Its name, in logs and metrics.
    pub name: String,
    /// How to reach the local broker (its client id names the bridge's session there).
    pub local: Options,
    /// How to reach the remote broker.
    pub remote: Options,
    /// What goes where.
    pub routes: Vec<Route>,
    /// The file that keeps both sessions (redb).
    pub store: PathBuf,
    /// Messages that may wait for one broker before the bridge stops taking more from the
    /// other.
    pub max_waiting: usize,
}

impl Bridge {
    /// Why the bridge cannot work, if it cannot: a bad route, no route, a route both ways
    /// to a 3.1.1 remote (no No Local: messages would come back and loop).
    pub fn check(&self) -> Result<(), String> {
        if self.routes.is_empty() {
            return Err(format!("bridge '{}' has no topic routes", self.name));
        }
        for r in &self.routes {
            r.check()
                .map_err(|e| format!("bridge '{}', topic '{}': {e}", self.name, r.pattern))?;
            if r.direction == Direction::Both && !self.remote.protocol.is_v5() {
                return Err(format!(
                    "bridge '{}', topic '{}': a route in both directions needs an MQTT 5.0 remote \
                     (3.1.1 has no No Local, so messages would loop); use two routes on \
                     different topics",
                    self.name, r.pattern
                ));
            }
        }
        if self.local.client_id.is_empty() || self.remote.client_id.is_empty() {
            return Err(format!("bridge '{}' needs client identifiers", self.name));
        }
        Ok(())
    }

    /// Runs the bridge until `shutdown` completes (then disconnects from both brokers,
    /// keeping both sessions). Reconnects to either broker with its backoff for as long
    /// as it runs. Fails only if its file cannot be opened or written.
    pub async fn run(
        self,
        stats: Arc<BridgeStats>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        self.check().map_err(Error::Outbox)?;
        let (mut outbox, states) =
            Outbox::open_many(self.store.clone(), &["local", "remote"]).await?;
        let mut ends = Vec::with_capacity(2);
        for ((side, mut options), mut state) in [
            (Side::Local, self.local.clone()),
            (Side::Remote, self.remote.clone()),
        ]
        .into_iter()
        .zip(states)
        {
            // A QoS 2 message delivered but not passed on before a stop: the broker sends
            // it again, and it is a new message to this process.
            state.drop_unreleased_inbound();
            let mut state = ClientState::new(state, usize::MAX, true);
            state.manual_acks();
            options.clean_start = false;
            if options.session_expiry.is_zero() {
                options.session_expiry = Duration::from_secs(u64::from(u32::MAX));
            }
            options.receive_maximum = NonZeroU16::new(RECEIVE_MAXIMUM);
            ends.push(End {
                side,
                backoff: options.reconnect.unwrap_or_default(),
                options,
                state,
                link: None,
                dialing: None,
                retry_at: None,
                taken: VecDeque::new(),
                closing: None,
            });
        }
        let Ok::<[End; 2], _>(mut ends) = ends.try_into() else {
            return Err(Error::Outbox("two sides".into()));
        };
        for end in &mut ends {
            end.dial();
        }
        let mut out = BytesMut::new();
        tokio::pin!(shutdown);
        let name = self.name.as_str();
        loop {
            let now = Instant::now();
            for end in &mut ends {
                end.take_events(name, &stats);
            }
            pass(&mut ends, &self.routes, self.max_waiting, &stats, now);
            // Persist, then send: no acknowledgement leaves before what it promises is
            // in the file.
            let [l, r] = &mut ends;
            outbox
                .save_many([l.state.take_changes(), r.state.take_changes()])
                .await?;
            for end in &mut ends {
                let i = end.side as usize;
                if let Some(link) = &mut end.link {
                    let v = end.options.protocol;
                    if flush(link, &mut end.state, &mut out, v).await.is_err() {
                        end.lose(name, "write failed", &stats);
                    } else if let Some(why) = end.closing.take() {
                        end.lose(name, &why, &stats);
                    }
                }
                let s = end.state.session();
                stats.waiting[i].store(
                    (s.queued_len() + s.inflight_len()) as u64,
                    Ordering::Relaxed,
                );
            }
            let wake = {
                let [l, r] = &mut ends;
                let at = [l.next_timer(), r.next_timer()].into_iter().flatten().min();
                tokio::select! {
                    n = read(&mut l.link) => Wake::Read(Side::Local, n),
                    n = read(&mut r.link) => Wake::Read(Side::Remote, n),
                    d = dialed(&mut l.dialing) => Wake::Dialed(Side::Local, Box::new(d)),
                    d = dialed(&mut r.dialing) => Wake::Dialed(Side::Remote, Box::new(d)),
                    () = sleep_until(at) => Wake::Timer,
                    () = &mut shutdown => Wake::Stop,
                }
            };
            let now = Instant::now();
            match wake {
                Wake::Read(side, n) => {
                    let end = &mut ends[side as usize];
                    match n {
                        Ok(n) if n > 0 => end.read_packets(name, now, &stats),
                        _ => end.lose(name, "connection lost", &stats),
                    }
                }
                Wake::Dialed(side, result) => {
                    let end = &mut ends[side as usize];
                    end.dialing = None;
                    end.connected(name, *result, &self.routes, now, &stats);
                }
                Wake::Timer => {
                    for end in &mut ends {
                        if let Some(conn) = end.state.conn() {
                            conn.handle_timeout(now);
                        }
                        if end.retry_at.is_some_and(|at| at <= now) {
                            end.retry_at = None;
                            end.dial();
                        }
                    }
                }
                Wake::Stop => {
                    for end in &mut ends {
                        if let Some(conn) = end.state.conn() {
                            conn.disconnect(ReasonCode::Success);
                        }
                    }
                    let [l, r] = &mut ends;
                    outbox
                        .save_many([l.state.take_changes(), r.state.take_changes()])
                        .await?;
                    for end in &mut ends {
                        if let Some(link) = &mut end.link {
                            let _ =
                                flush(link, &mut end.state, &mut out, end.options.protocol).await;
                        }
                    }
                    tracing::info!(bridge = name, "bridge stopped");
                    return Ok(());
                }
            }
        }
    }
}

type Dial = Pin<Box<dyn Future<Output = Result<(Link, Connect, ConnAck), Error>> + Send>>;

enum Wake {
    Read(Side, std::io::Result<usize>),
    Dialed(Side, Box<Result<(Link, Connect, ConnAck), Error>>),
    Timer,
    Stop,
}

/// One broker's side of the bridge.
struct End {
    side: Side,
    options: Options,
    backoff: Backoff,
    state: ClientState,
    link: Option<Link>,
    dialing: Option<Dial>,
    retry_at: Option<Instant>,
    /// Messages taken from this broker, in order, not yet passed on; each with the id
    /// whose acknowledgement waits until it is.
    taken: VecDeque<(Message, Option<PacketId>)>,
    /// The engine ended the connection (the broker's DISCONNECT, a keep alive timeout).
    closing: Option<String>,
}

impl End {
    fn dial(&mut self) {
        let options = self.options.clone();
        self.dialing = Some(Box::pin(
            async move { Link::dial(&options, false, 0).await },
        ));
    }

    fn next_timer(&self) -> Option<Instant> {
        [self.state.conn_timeout(), self.retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    fn connected(
        &mut self,
        name: &str,
        result: Result<(Link, Connect, ConnAck), Error>,
        routes: &[Route],
        now: Instant,
        stats: &BridgeStats,
    ) {
        let i = self.side as usize;
        let side = self.side.name();
        let accepted = result.and_then(|(link, connect, ack)| {
            // `established`: whatever the session held goes again, as new messages, to a
            // broker that no longer has it.
            let present =
                self.state
                    .handle_connack(&connect, &ack, self.options.inflight, true, now)?;
            Ok((link, present))
        });
        let (link, present) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(bridge = name, side, error = %e, "cannot connect");
                self.retry(now);
                return;
            }
        };
        self.link = Some(link);
        stats.connected[i].store(true, Ordering::Relaxed);
        stats.connects[i].fetch_add(1, Ordering::Relaxed);
        tracing::info!(bridge = name, side, session_present = present, "connected");
        // A broker that kept the session kept its subscriptions; a 5.0 one is asked again
        // (routes may have changed), without its retained messages a second time.
        let v5 = self.options.protocol.is_v5();
        if present && !v5 {
            return;
        }
        let subscriptions: Vec<Subscription> = routes
            .iter()
            .filter(|r| r.carries(self.side))
            .filter_map(|r| {
                Some(Subscription {
                    filter: TopicFilter::new(r.filter(self.side)).ok()?,
                    options: SubscriptionOptions {
                        qos: r.qos,
                        no_local: v5,
                        retain_as_published: v5,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                })
            })
            .collect();
        if let (false, Some(conn)) = (subscriptions.is_empty(), self.state.conn()) {
            let _ = conn.subscribe(subscriptions);
        }
    }

    fn retry(&mut self, now: Instant) {
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        self.retry_at = Some(now + self.state.next_attempt(self.backoff, jitter));
    }

    fn lose(&mut self, name: &str, why: &str, stats: &BridgeStats) {
        if self.link.take().is_none() {
            return;
        }
        tracing::warn!(bridge = name, side = self.side.name(), why, "disconnected");
        stats.connected[self.side as usize].store(false, Ordering::Relaxed);
        self.state.connection_lost();
        // What was taken and not passed on was not acknowledged: the broker sends it again
        // on the next connection (QoS 2 ones as new to this process).
        self.taken.clear();
        if let Some(held) = self.state.held() {
            held.drop_unreleased_inbound();
        }
        self.closing = None;
        self.retry(Instant::now());
    }

    fn read_packets(&mut self, name: &str, now: Instant, stats: &BridgeStats) {
        let Some(link) = &mut self.link else { return };
        let v = self.options.protocol;
        loop {
            match tern_codec::decode(&mut link.read, v, tern_codec::MAX_PACKET_SIZE) {
                Ok(Some(p)) => {
                    if let Some(conn) = self.state.conn() {
                        let _ = conn.handle_packet(p, now);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let why = format!("malformed packet: {e}");
                    self.lose(name, &why, stats);
                    return;
                }
            }
        }
    }

    fn take_events(&mut self, name: &str, stats: &BridgeStats) {
        let side = self.side.name();
        let Some(conn) = self.state.conn() else {
            return;
        };
        while let Some(event) = conn.poll_event() {
            match event {
                tern_proto::Event::Message { message, ack } => {
                    self.taken.push_back((message, ack));
                }
                tern_proto::Event::Acknowledged {
                    message, reason, ..
                } => {
                    // PUBCOMP 0x92 after a resent PUBREL: the broker had completed it.
                    let fine = !reason.is_error()
                        || (message.qos == QoS::ExactlyOnce
                            && reason == ReasonCode::PacketIdentifierNotFound);
                    if !fine {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(bridge = name, side, topic = message.topic.as_str(),
                            reason = ?reason, "the broker refused a bridged message");
                    }
                }
                tern_proto::Event::Dropped {
                    message, reason, ..
                } => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(bridge = name, side, topic = message.topic.as_str(),
                        reason = ?reason, "a bridged message was not sent");
                }
                tern_proto::Event::Control(Packet::SubAck(a)) => {
                    let refused = a.reasons.iter().filter(|r| r.is_error()).count();
                    for r in a.reasons.iter().filter(|r| r.is_error()) {
                        tracing::error!(bridge = name, side, reason = ?r,
                            "the broker refused a bridge subscription");
                    }
                    tracing::info!(
                        bridge = name,
                        side,
                        granted = a.reasons.len() - refused,
                        refused,
                        "bridge subscribed"
                    );
                }
                tern_proto::Event::Control(_) => {}
                tern_proto::Event::Closed { reason, .. } => {
                    self.closing = Some(format!(
                        "closed by the broker: {reason:?} (0x{:02X})",
                        reason as u8
                    ));
                }
            }
        }
    }
}

/// Passes what each side has taken to the other, in order, as far as the other has room,
/// and releases each one's acknowledgement (sent after the next commit).
fn pass(
    ends: &mut [End; 2],
    routes: &[Route],
    max_waiting: usize,
    stats: &BridgeStats,
    now: Instant,
) {
    for from in [Side::Local, Side::Remote] {
        let [l, r] = ends;
        let (src, dst) = match from {
            Side::Local => (l, r),
            Side::Remote => (r, l),
        };
        while let Some((message, _)) = src.taken.front() {
            if let Some((topic, qos)) = map_topic(routes, from, message.topic.as_str()) {
                let qos = message.qos.min(qos);
                let s = dst.state.session();
                if qos != QoS::AtMostOnce && s.queued_len() + s.inflight_len() >= max_waiting {
                    // No room: this and what follows wait, unacknowledged.
                    break;
                }
                if let Ok(topic) = TopicName::new(topic.as_str()) {
                    let mut m = message.clone();
                    m.topic = topic;
                    m.qos = qos;
                    if !m.properties.subscription_identifiers.is_empty() {
                        m.properties.subscription_identifiers.clear();
                    }
                    if let Some(conn) = dst.state.conn() {
                        conn.publish(m, now);
                        stats.forwarded[from as usize].fetch_add(1, Ordering::Relaxed);
                    } else if let (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(held)) =
                        (qos, dst.state.held())
                    {
                        held.enqueue(m, now);
                        stats.forwarded[from as usize].fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Some((_, Some(id))) = src.taken.pop_front()
                && let Some(conn) = src.state.conn()
            {
                conn.ack(id);
            }
        }
    }
}

async fn read(link: &mut Option<Link>) -> std::io::Result<usize> {
    match link {
        Some(l) => l.stream.read_buf(&mut l.read).await,
        None => std::future::pending().await,
    }
}

async fn dialed(dialing: &mut Option<Dial>) -> Result<(Link, Connect, ConnAck), Error> {
    match dialing {
        Some(d) => d.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
