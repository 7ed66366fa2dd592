//! The byte form of stored records. Messages and wills reuse the MQTT 5.0 wire format
//! (a PUBLISH, a CONNECT carrying the will), so every property survives without a second
//! serializer; the rest is a small length-prefixed layout. Every record starts with a
//! format version byte.

use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tern_codec::{
    Connect, LastWill, MAX_PACKET_SIZE, Packet, PacketId, Protocol, Publish, QoS, QosPid,
    RetainHandling, Str, SubscriptionId, SubscriptionOptions, TopicFilter,
};
use tern_proto::{Entry, InboundState, Message, MessageId, OutboundState};

use crate::{PendingWill, SessionRecord, StoreError, Subscription};

mod batch;
pub(crate) use batch::{batch, read_batch};

const VERSION: u8 = 2;

/// An `Instant` and the `SystemTime` of the same moment: messages carry monotonic expiry
/// instants in memory and wall-clock ones on disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Anchor {
    pub(crate) instant: Instant,
    pub(crate) wall: SystemTime,
}

impl Anchor {
    fn to_wall(self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.instant) {
            Some(d) => self.wall + d,
            None => self.wall - self.instant.duration_since(t),
        }
    }

    pub(crate) fn to_instant(self, t: SystemTime) -> Instant {
        match t.duration_since(self.wall) {
            Ok(d) => self.instant + d,
            Err(e) => self
                .instant
                .checked_sub(e.duration())
                .unwrap_or(self.instant),
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!(
        "stored {what} is unreadable (corrupt or from a newer Tern)"
    ))
}

#[derive(Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Writer {
        Writer(vec![VERSION])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn duration(&mut self, d: Duration) {
        self.u64(d.as_secs());
        self.u32(d.subsec_nanos());
    }
    fn time(&mut self, t: SystemTime) {
        // Before 1970 cannot happen for a deadline computed from a real clock.
        self.duration(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    }
    fn opt_time(&mut self, t: Option<SystemTime>) {
        match t {
            Some(t) => {
                self.u8(1);
                self.time(t);
            }
            None => self.u8(0),
        }
    }
    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn at_end(&self) -> bool {
        self.buf.is_empty()
    }

    fn new(buf: &'a [u8], what: &'static str) -> Result<Reader<'a>, StoreError> {
        let mut r = Reader { buf, what };
        if r.u8()? != VERSION {
            return Err(corrupt(what));
        }
        Ok(r)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(corrupt(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, StoreError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<&'a str, StoreError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| corrupt(self.what))
    }
    fn duration(&mut self) -> Result<Duration, StoreError> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(corrupt(self.what));
        }
        Ok(Duration::new(secs, nanos))
    }
    fn time(&mut self) -> Result<SystemTime, StoreError> {
        Ok(SystemTime::UNIX_EPOCH + self.duration()?)
    }
    fn opt_time(&mut self) -> Result<Option<SystemTime>, StoreError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.time()?)),
            _ => Err(corrupt(self.what)),
        }
    }
}

fn qos_from(b: u8, what: &str) -> Result<QoS, StoreError> {
    match b {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(corrupt(what)),
    }
}

// ---- messages ------------------------------------------------------------------------

/// A message in the store's format: its PUBLISH (5.0) and what the store keeps beside it.
/// A message no PUBLISH can carry is refused ([`StoreError::Unencodable`]), never a panic:
/// the broker drops such copies before they reach a session, but the store does not count
/// on it.
pub(crate) fn message(m: &Message, anchor: Anchor) -> Result<Vec<u8>, StoreError> {
    let one = PacketId::new(1).expect("non-zero");
    let mut p = Publish::new(m.topic.clone(), QosPid::new(m.qos, one), m.payload.clone());
    p.retain = m.retain;
    p.properties = m.properties.clone();
    let mut wire = BytesMut::new();
    // A message that arrived as a PUBLISH always encodes as one.
    tern_codec::encode(&Packet::Publish(p), Protocol::V5, &mut wire)
        .map_err(|e| StoreError::Unencodable(format!("message on {}: {e}", m.topic.as_str())))?;
    let mut w = Writer::new();
    w.bytes(&wire);
    w.opt_time(m.expires_at.map(|t| anchor.to_wall(t)));
    // Bodies written before message ids carried the shared tag and the queue time here;
    // both now go with each copy (its reference), and the tag byte stays for the layout.
    shared_tag(&mut w, None);
    Ok(w.finish())
}

/// The shared-subscription group a copy was delivered through, if any.
fn shared_tag(w: &mut Writer, shared: Option<&Str>) {
    match shared {
        Some(s) => {
            w.u8(1);
            w.bytes(s.as_bytes());
        }
        None => w.u8(0),
    }
}

fn read_shared_tag(r: &mut Reader<'_>) -> Result<Option<Str>, StoreError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(Str::from(r.str()?))),
        _ => Err(corrupt(r.what)),
    }
}

pub(crate) fn read_message(buf: &[u8], anchor: Anchor) -> Result<Message, StoreError> {
    Ok(read_body(buf, anchor)?.message)
}

/// A stored message body, with what bodies written before message ids held beside it.
pub(crate) struct Body {
    pub(crate) message: Message,
    /// The shared-subscription tag an old body carried.
    pub(crate) shared: Option<Str>,
    /// The queue time an old body carried.
    pub(crate) queued_at: Option<Instant>,
}

pub(crate) fn read_body(buf: &[u8], anchor: Anchor) -> Result<Body, StoreError> {
    let mut r = Reader::new(buf, "message")?;
    let mut wire = BytesMut::from(r.bytes()?);
    let Ok(Some(Packet::Publish(p))) = tern_codec::decode(&mut wire, Protocol::V5, MAX_PACKET_SIZE)
    else {
        return Err(corrupt("message"));
    };
    let expires_at = r.opt_time()?.map(|t| anchor.to_instant(t));
    let shared = read_shared_tag(&mut r)?;
    let queued_at = if r.at_end() {
        None
    } else {
        Some(anchor.to_instant(r.time()?))
    };
    let mut message = Message::from_publish(p, anchor.instant);
    message.expires_at = expires_at;
    Ok(Body {
        message,
        shared,
        queued_at,
    })
}

// ---- session records -----------------------------------------------------------------

fn will(w: &mut Writer, will: &LastWill) -> Result<(), StoreError> {
    let mut c = Connect::new(Protocol::V5, "w");
    c.will = Some(will.clone());
    let mut wire = BytesMut::new();
    tern_codec::encode(&Packet::Connect(Box::new(c)), Protocol::V5, &mut wire)
        .map_err(|e| StoreError::Unencodable(format!("will on {}: {e}", will.topic.as_str())))?;
    w.bytes(&wire);
    Ok(())
}

/// A connected client's will as its own record.
pub(crate) fn will_record(lw: &LastWill) -> Result<Vec<u8>, StoreError> {
    let mut w = Writer::new();
    will(&mut w, lw)?;
    Ok(w.finish())
}

pub(crate) fn read_will_record(buf: &[u8]) -> Result<LastWill, StoreError> {
    read_will(&mut Reader::new(buf, "will")?)
}

fn read_will(r: &mut Reader<'_>) -> Result<LastWill, StoreError> {
    let mut wire = BytesMut::from(r.bytes()?);
    match tern_codec::decode(&mut wire, Protocol::V5, MAX_PACKET_SIZE) {
        Ok(Some(Packet::Connect(c))) => c.will.ok_or_else(|| corrupt("will")),
        _ => Err(corrupt("will")),
    }
}

pub(crate) fn record(rec: &SessionRecord) -> Result<Vec<u8>, StoreError> {
    let mut w = Writer::new();
    w.duration(rec.expiry);
    w.opt_time(rec.expires_at);
    w.u32(rec.subscriptions.len() as u32);
    for s in &rec.subscriptions {
        w.bytes(s.filter.as_str().as_bytes());
        let o = s.options;
        w.u8(o.qos as u8);
        w.u8(u8::from(o.no_local));
        w.u8(u8::from(o.retain_as_published));
        w.u8(match o.retain_handling {
            RetainHandling::SendAtSubscribe => 0,
            RetainHandling::SendIfNew => 1,
            RetainHandling::DoNotSend => 2,
        });
        w.u32(s.id.map_or(0, SubscriptionId::get));
    }
    match &rec.pending_will {
        Some(p) => {
            w.u8(1);
            w.time(p.at);
            will(&mut w, &p.will)?;
        }
        None => w.u8(0),
    }
    // Added after version 2 shipped: a record that ends before it has no username; one
    // that goes on after the username (length u32::MAX: none) is a cluster session fed
    // from the stream.
    match (&rec.username, &rec.fed) {
        (Some(u), _) => w.bytes(u.as_bytes()),
        (None, Some(_)) => w.u32(u32::MAX),
        (None, None) => {}
    }
    if let Some(f) = &rec.fed {
        w.u64(f.after);
        w.bytes(f.from.as_bytes());
        w.u64(f.through);
    }
    Ok(w.finish())
}

pub(crate) fn read_record(buf: &[u8]) -> Result<SessionRecord, StoreError> {
    let what = "session";
    let mut r = Reader::new(buf, what)?;
    let expiry = r.duration()?;
    let expires_at = r.opt_time()?;
    let n = r.u32()?;
    let mut subscriptions = Vec::new();
    for _ in 0..n {
        let filter = TopicFilter::new(r.str()?).map_err(|_| corrupt(what))?;
        let qos = qos_from(r.u8()?, what)?;
        let no_local = r.u8()? != 0;
        let retain_as_published = r.u8()? != 0;
        let retain_handling = match r.u8()? {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(corrupt(what)),
        };
        let id = SubscriptionId::new(r.u32()?);
        subscriptions.push(Subscription {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
            id,
        });
    }
    let pending_will = match r.u8()? {
        0 => None,
        1 => Some(PendingWill {
            at: r.time()?,
            will: read_will(&mut r)?,
        }),
        _ => return Err(corrupt(what)),
    };
    let username = if r.at_end() {
        None
    } else if r.buf.starts_with(&u32::MAX.to_le_bytes()) {
        r.u32()?;
        None
    } else {
        Some(Str::from(r.str()?))
    };
    let fed = if r.at_end() {
        None
    } else {
        Some(crate::Fed {
            after: r.u64()?,
            from: Str::from(r.str()?),
            through: r.u64()?,
        })
    };
    Ok(SessionRecord {
        expiry,
        expires_at,
        subscriptions,
        pending_will,
        username,
        fed,
    })
}

// ---- delivery state: one row per session, one per flow, one per inbound id -----------

/// The session's row: the last packet id handed out and the next flow sequence number.
pub(crate) fn delivery_row(last_id: u16, next_seq: u64) -> Vec<u8> {
    let mut w = Writer::new();
    w.u16(last_id);
    w.u64(next_seq);
    w.finish()
}

pub(crate) fn read_delivery_row(buf: &[u8]) -> Result<(u16, u64), StoreError> {
    let mut r = Reader::new(buf, "delivery state")?;
    Ok((r.u16()?, r.u64()?))
}

/// Released flows rewritten in place: the state byte follows the version and the sequence.
pub(crate) const FLOW_STATE_OFFSET: usize = 1 + 8;

pub(crate) fn inbound(state: InboundState) -> u8 {
    match state {
        InboundState::Delivered => 0,
        InboundState::Received => 1,
    }
}

pub(crate) fn read_inbound(b: u8) -> Result<InboundState, StoreError> {
    match b {
        0 => Ok(InboundState::Delivered),
        1 => Ok(InboundState::Received),
        _ => Err(corrupt("inbound QoS 2 id")),
    }
}

// ---- a message held by a queue or a flow: its stored body, and what differs per session --

/// What a queued or in-flight copy adds to the stored body it shares with the other copies
/// of the same message: the QoS it goes out at, its RETAIN flag, its Subscription
/// Identifiers, its shared-subscription tag, and the session's id for it and when it
/// entered the session.
pub(crate) fn reference(key: u64, c: CopyOf<'_>, anchor: Anchor) -> Vec<u8> {
    let m = c.message;
    let mut w = Writer::new();
    w.u64(key);
    w.u8(m.qos as u8);
    w.u8(u8::from(m.retain));
    let ids = &m.properties.subscription_identifiers;
    w.u32(ids.len() as u32);
    for id in ids {
        w.u32(id.get());
    }
    shared_tag(&mut w, c.shared);
    // Added after version 2 shipped: a reference that ends here has neither.
    w.u64(c.id.get());
    w.time(anchor.to_wall(c.since));
    w.finish()
}

/// A copy held by a session, as the store is given it: from an [`Entry`] or an in-flight
/// flow, with the shared subscription the broker says it came through.
#[derive(Clone, Copy)]
pub(crate) struct CopyOf<'a> {
    pub(crate) message: &'a Message,
    pub(crate) id: MessageId,
    pub(crate) since: Instant,
    pub(crate) shared: Option<&'a Str>,
}

impl<'a> CopyOf<'a> {
    pub(crate) fn entry(e: &'a Entry, shared: Option<&'a Str>) -> CopyOf<'a> {
        CopyOf {
            message: &e.message,
            id: e.id,
            since: e.since,
            shared,
        }
    }
}

/// Reads a reference: the body's key, and a function making this copy from the body.
pub(crate) fn read_reference(buf: &[u8]) -> Result<(u64, Copy), StoreError> {
    let what = "queued message";
    let mut r = Reader::new(buf, what)?;
    let key = r.u64()?;
    let qos = qos_from(r.u8()?, what)?;
    let retain = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(corrupt(what)),
    };
    let n = r.u32()?;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(SubscriptionId::new(r.u32()?).ok_or_else(|| corrupt(what))?);
    }
    let shared = read_shared_tag(&mut r)?;
    let (id, since) = if r.at_end() {
        (None, None)
    } else {
        (MessageId::new(r.u64()?), Some(r.time()?))
    };
    Ok((
        key,
        Copy {
            qos,
            retain,
            ids,
            shared,
            id,
            since,
        },
    ))
}

/// The per-session part of a stored copy.
pub(crate) struct Copy {
    qos: QoS,
    retain: bool,
    ids: Vec<SubscriptionId>,
    pub(crate) shared: Option<Str>,
    /// The session's id for the copy (`None` in references written before ids).
    pub(crate) id: Option<MessageId>,
    pub(crate) since: Option<SystemTime>,
}

impl Copy {
    /// The copy as the session held it, made from its body. A reference from before
    /// message ids takes its queue time from the old body (or `fallback`); its id is
    /// given by the caller.
    pub(crate) fn of(&self, body: &Body, anchor: Anchor, fallback: Instant) -> (Message, Instant) {
        let mut m = body.message.clone();
        m.qos = self.qos;
        m.retain = self.retain;
        if m.properties.subscription_identifiers != self.ids {
            m.properties.subscription_identifiers = self.ids.clone();
        }
        let since = match self.since {
            Some(t) => anchor.to_instant(t),
            None => body.queued_at.unwrap_or(fallback),
        };
        (m, since)
    }
}

/// Whether two copies share a body: the same message, whatever their per-session parts.
pub(crate) fn same_body(a: &Message, b: &Message) -> bool {
    if a.topic != b.topic || a.payload != b.payload || a.expires_at != b.expires_at {
        return false;
    }
    if a.properties.subscription_identifiers == b.properties.subscription_identifiers {
        return a.properties == b.properties;
    }
    let mut pa = a.properties.clone();
    let mut pb = b.properties.clone();
    pa.subscription_identifiers.clear();
    pb.subscription_identifiers.clear();
    pa == pb
}

/// One outbound flow row: send order, state, then the reference to its message.
pub(crate) fn flow_ref(seq: u64, state: OutboundState, reference: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(seq);
    w.u8(match state {
        OutboundState::Published => 0,
        OutboundState::Released => 1,
    });
    w.0.extend_from_slice(reference);
    w.finish()
}

pub(crate) fn read_flow_ref(buf: &[u8]) -> Result<(u64, OutboundState, &[u8]), StoreError> {
    let what = "in-flight message";
    let mut r = Reader::new(buf, what)?;
    let seq = r.u64()?;
    let state = match r.u8()? {
        0 => OutboundState::Published,
        1 => OutboundState::Released,
        _ => return Err(corrupt(what)),
    };
    Ok((seq, state, r.buf))
}

#[cfg(test)]
mod tests;
