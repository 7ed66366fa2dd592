//! A simulated link and clock for two engines (quinn-proto's `Pair` idea), shared by the
//! tests, the property test and the fuzz target: a client and a server [`Connection`]
//! exchange real encoded bytes through tern-codec; the driver decides when packets arrive,
//! cuts the connection (everything in flight is lost, as when TCP breaks), reconnects with
//! or without the session, advances time, duplicates packets. [`check_ops`] runs a sequence
//! of [`Op`]s and checks the QoS invariants.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::{
    AckMode, Config, Connection, DropReason, Event, Message, MessageId, Role, SessionState,
};
use bytes::BytesMut;
use tern_codec::{
    MAX_PACKET_SIZE, Packet, PacketId, PacketType, Protocol, QoS, ReasonCode, TopicName,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToServer,
    ToClient,
}

#[derive(Debug)]
pub struct Side {
    pub config: Config,
    pub conn: Option<Connection>,
    pub stored: SessionState,
    pub delivered: Vec<Message>,
    /// Manual-mode ids waiting for the application, with the message's QoS.
    pub to_ack: Vec<(PacketId, QoS)>,
    pub acknowledged: Vec<(PacketId, Message, ReasonCode)>,
    pub dropped: Vec<(Message, DropReason)>,
    /// The ids the session gave this side's publishes, with their QoS (since the last
    /// clean start: a new session numbers afresh).
    pub numbered: Vec<(MessageId, QoS)>,
    /// The ids carried by the `Acknowledged` and `Dropped` events that ended them.
    pub ended: Vec<MessageId>,
    pub closed: Vec<ReasonCode>,
    pub control: Vec<Packet>,
    pub errors: Vec<String>,
}

impl Side {
    fn new(config: Config, now: Instant) -> Side {
        Side {
            conn: Some(Connection::new(
                config.clone(),
                SessionState::new(),
                false,
                now,
            )),
            config,
            stored: SessionState::new(),
            delivered: vec![],
            to_ack: vec![],
            acknowledged: vec![],
            dropped: vec![],
            numbered: vec![],
            ended: vec![],
            closed: vec![],
            control: vec![],
            errors: vec![],
        }
    }

    pub fn conn(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("connected")
    }

    pub fn session(&self) -> &SessionState {
        self.conn.as_ref().map_or(&self.stored, |c| c.session())
    }

    fn collect(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        while let Some(e) = conn.poll_event() {
            match e {
                Event::Message { message, ack } => {
                    self.to_ack.extend(ack.map(|id| (id, message.qos)));
                    self.delivered.push(message);
                }
                Event::Acknowledged {
                    id,
                    message_id,
                    message,
                    reason,
                } => {
                    self.ended.push(message_id);
                    self.acknowledged.push((id, message, reason));
                }
                Event::Dropped {
                    message_id,
                    message,
                    reason,
                } => {
                    self.ended.push(message_id);
                    self.dropped.push((message, reason));
                }
                Event::Closed { reason, .. } => self.closed.push(reason),
                Event::Control(p) => self.control.push(p),
            }
        }
    }

    /// Payloads delivered, as strings.
    pub fn delivered_payloads(&self) -> Vec<String> {
        self.delivered
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect()
    }
}

pub struct Pair {
    pub now: Instant,
    pub client: Side,
    pub server: Side,
    to_server: VecDeque<BytesMut>,
    to_client: VecDeque<BytesMut>,
    /// Every packet put on the wire, in order, with its direction.
    pub wire: Vec<(Dir, Packet)>,
}

pub fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

pub fn msg(payload: &str, qos: QoS) -> Message {
    Message::new(topic("t/x"), payload.to_string(), qos)
}

impl Pair {
    pub fn new(protocol: Protocol) -> Pair {
        Pair::with(
            Config::new(Role::Client, protocol),
            Config::new(Role::Server, protocol),
        )
    }

    pub fn with(client: Config, server: Config) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            client: Side::new(client, now),
            server: Side::new(server, now),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            wire: vec![],
        }
    }

    pub fn side(&mut self, dir: Dir) -> &mut Side {
        match dir {
            Dir::ToServer => &mut self.server,
            Dir::ToClient => &mut self.client,
        }
    }

    /// The sending side for a direction.
    pub fn sender(&mut self, dir: Dir) -> &mut Side {
        match dir {
            Dir::ToServer => &mut self.client,
            Dir::ToClient => &mut self.server,
        }
    }

    pub fn publish(&mut self, from_client: bool, message: Message) {
        let now = self.now;
        let side = if from_client {
            &mut self.client
        } else {
            &mut self.server
        };
        let qos = message.qos;
        if let Some(c) = side.conn.as_mut() {
            side.numbered.push((c.publish(message, now), qos));
        } else if message.qos == QoS::AtMostOnce {
            side.dropped.push((message, DropReason::NotConnected));
        } else {
            // Offline: the message waits in the session, as the broker queues it.
            side.numbered.push((side.stored.enqueue(message, now), qos));
        }
        side.collect();
        self.flush();
    }

    /// Moves everything both engines want to send onto the link.
    pub fn flush(&mut self) {
        let now = self.now;
        for (side, queue, dir) in [
            (&mut self.client, &mut self.to_server, Dir::ToServer),
            (&mut self.server, &mut self.to_client, Dir::ToClient),
        ] {
            let Some(conn) = side.conn.as_mut() else {
                continue;
            };
            let v = side.config.protocol;
            while let Some(p) = conn.poll_transmit(now) {
                let mut bytes = BytesMut::new();
                tern_codec::encode(&p, v, &mut bytes).unwrap();
                self.wire.push((dir, p));
                queue.push_back(bytes);
            }
            side.collect();
        }
    }

    /// The next packet waiting on the link in `dir`, decoded.
    pub fn peek(&self, dir: Dir) -> Option<Packet> {
        let queue = match dir {
            Dir::ToServer => &self.to_server,
            Dir::ToClient => &self.to_client,
        };
        let mut bytes = queue.front()?.clone();
        tern_codec::decode(&mut bytes, self.server.config.protocol, MAX_PACKET_SIZE).unwrap()
    }

    /// Delivers the next packet in `dir`; returns false if none was waiting.
    pub fn deliver(&mut self, dir: Dir) -> bool {
        let now = self.now;
        let (queue, side) = match dir {
            Dir::ToServer => (&mut self.to_server, &mut self.server),
            Dir::ToClient => (&mut self.to_client, &mut self.client),
        };
        let Some(mut bytes) = queue.pop_front() else {
            return false;
        };
        let v = side.config.protocol;
        let packet = tern_codec::decode(&mut bytes, v, MAX_PACKET_SIZE)
            .unwrap()
            .unwrap();
        if let Some(conn) = side.conn.as_mut()
            && let Err(e) = conn.handle_packet(packet, now)
        {
            side.errors.push(e.to_string());
        }
        side.collect();
        self.flush();
        true
    }

    /// Delivers the next packet in `dir` twice in a row, standing for a peer's resend of a
    /// flow still open on its side. TCP never duplicates, and a real peer resends only
    /// packets with an id, only while their flow is open, so the copy arrives at once
    /// (not after the receiver has acknowledged the original and the sender has moved on),
    /// and a QoS 0 PUBLISH, which nothing could deduplicate, is not duplicated.
    pub fn duplicate_next(&mut self, dir: Dir) {
        match self.peek(dir) {
            None => return,
            Some(Packet::Publish(p)) if p.qos_pid.packet_id().is_none() => return,
            Some(_) => {}
        }
        let queue = match dir {
            Dir::ToServer => &mut self.to_server,
            Dir::ToClient => &mut self.to_client,
        };
        if let Some(front) = queue.front().cloned() {
            queue.push_front(front);
        }
        self.deliver(dir);
        self.deliver(dir);
    }

    /// Delivers everything, alternating directions, until the link is quiet.
    pub fn drive(&mut self) {
        self.flush();
        for _ in 0..100_000 {
            let a = self.deliver(Dir::ToServer);
            let b = self.deliver(Dir::ToClient);
            if !a && !b {
                return;
            }
        }
        panic!("link never went quiet");
    }

    /// Delivers packets (alternating directions) until the next one waiting in `dir`
    /// satisfies `pred`, which is left undelivered. False if the link went quiet first.
    pub fn run_until(&mut self, dir: Dir, pred: impl Fn(&Packet) -> bool) -> bool {
        self.flush();
        for _ in 0..100_000 {
            if self.peek(dir).is_some_and(|p| pred(&p)) {
                return true;
            }
            let other = match dir {
                Dir::ToServer => Dir::ToClient,
                Dir::ToClient => Dir::ToServer,
            };
            let a = self.deliver(dir);
            let b = self.deliver(other);
            if !a && !b {
                return false;
            }
        }
        false
    }

    /// The connection breaks: everything on the link is lost; both sides keep their
    /// session state.
    pub fn cut(&mut self) {
        self.to_server.clear();
        self.to_client.clear();
        for side in [&mut self.client, &mut self.server] {
            side.collect();
            if let Some(conn) = side.conn.take() {
                side.stored = conn.into_session();
            }
            // Manual-mode QoS 1 acks die with the connection (the peer resends); a QoS 2 id
            // delivered but not yet released lives in the session and still awaits `ack`.
            side.to_ack.retain(|(_, qos)| *qos == QoS::ExactlyOnce);
        }
    }

    /// Both sides reconnect, resuming their sessions or starting clean.
    pub fn reconnect(&mut self, resume: bool) {
        let now = self.now;
        for side in [&mut self.client, &mut self.server] {
            let stored = std::mem::take(&mut side.stored);
            if !resume {
                side.numbered.clear();
                side.ended.clear();
            }
            side.conn = Some(Connection::new(side.config.clone(), stored, resume, now));
        }
        self.flush();
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        for side in [&mut self.client, &mut self.server] {
            if let Some(conn) = side.conn.as_mut() {
                conn.handle_timeout(now);
            }
            side.collect();
        }
        self.flush();
    }

    /// Packets of a type put on the wire in a direction.
    pub fn sent(&self, dir: Dir, kind: PacketType) -> Vec<&Packet> {
        self.wire
            .iter()
            .filter(|(d, p)| *d == dir && p.packet_type() == kind)
            .map(|(_, p)| p)
            .collect()
    }
}

pub fn is(kind: PacketType) -> impl Fn(&Packet) -> bool {
    move |p| p.packet_type() == kind
}

pub fn assert_quiet(pair: &Pair) {
    for side in [&pair.client, &pair.server] {
        let s = side.session();
        assert_eq!(
            s.inflight_len(),
            0,
            "flows left in flight: {:?}",
            s.inflight().collect::<Vec<_>>()
        );
        assert_eq!(s.queued().count(), 0, "messages left queued");
        assert_eq!(s.inbound_qos2().count(), 0, "inbound QoS 2 ids left");
        assert!(side.errors.is_empty(), "protocol errors: {:?}", side.errors);
    }
}

pub fn v(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

pub const SECOND: Duration = Duration::from_secs(1);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

/// One step of a random run.
#[derive(Debug, Clone)]
pub enum Op {
    Publish { from_client: bool, qos: QoS },
    Deliver { to_server: bool, n: u8 },
    Duplicate { to_server: bool },
    Cut,
    Reconnect { resume: bool },
    AckPending,
    Advance { secs: u8 },
}

/// A store's copy of one side's session, kept by applying its recorded changes: after
/// every step it must equal the live state.
fn sync_copy(side: &mut Side, copy: &mut SessionState) -> Result<(), String> {
    let changes = match side.conn.as_mut() {
        Some(c) => c.take_changes(),
        None => side.stored.take_changes(),
    };
    match changes {
        Some(crate::Changes::Some(list)) => {
            for change in &list {
                copy.apply(change);
            }
        }
        Some(crate::Changes::All(all)) => *copy = all,
        None => return Err("the session stopped being tracked".into()),
    }
    ensure!(
        copy == side.session(),
        "the copy kept from recorded changes differs from the session:\n{copy:?}\n{:?}",
        side.session()
    );
    Ok(())
}

struct Published {
    payload: String,
    qos: QoS,
    from_client: bool,
    epoch: u32,
}

/// Checks after every step: ids of open flows are not reused by a new PUBLISH, inflight
/// stays within the window, no protocol error on either side.
struct StepCheck {
    open_ids: HashSet<(bool, PacketId)>,
    wire_seen: usize,
    acks_seen: [usize; 2],
}

impl StepCheck {
    fn check(&mut self, pair: &Pair, window: u16) -> Result<(), String> {
        for (i, side) in [&pair.client, &pair.server].into_iter().enumerate() {
            for (id, _, _) in &side.acknowledged[self.acks_seen[i]..] {
                self.open_ids.remove(&(i == 0, *id));
            }
            self.acks_seen[i] = side.acknowledged.len();
        }
        for (dir, packet) in &pair.wire[self.wire_seen..] {
            if let Packet::Publish(p) = packet
                && let Some(id) = p.packet_id()
                && !p.dup
            {
                let fresh = self.open_ids.insert((*dir == Dir::ToServer, id));
                ensure!(fresh, "id {id} reused while its flow is open");
            }
        }
        self.wire_seen = pair.wire.len();
        for side in [&pair.client, &pair.server] {
            let inflight = side.session().inflight_len();
            ensure!(
                inflight <= usize::from(window),
                "{inflight} in flight, window {window}"
            );
            ensure!(side.errors.is_empty(), "protocol error: {:?}", side.errors);
        }
        Ok(())
    }
}

fn ack_pending(pair: &mut Pair) -> bool {
    let mut acked = false;
    for side in [&mut pair.client, &mut pair.server] {
        for (id, _) in std::mem::take(&mut side.to_ack) {
            if let Some(c) = side.conn.as_mut() {
                acked |= c.ack(id);
            }
        }
    }
    pair.flush();
    acked
}

/// Runs `ops` on a fresh pair (window of 3 both ways, 30 s keep alive), then resumes the
/// session and drives to quiet. Invariants: QoS 0 and QoS 2 at most once; QoS 1 at least
/// once and QoS 2 exactly once for messages published since the last clean start; first
/// deliveries of QoS 1/2 in publish order per sender; and the per-step checks. `Err` names
/// the first invariant broken.
pub fn check_ops(protocol: Protocol, manual: bool, ops: &[Op]) -> Result<(), String> {
    const WINDOW: u16 = 3;
    let mut client = Config::new(Role::Client, protocol);
    let mut server = Config::new(Role::Server, protocol);
    for c in [&mut client, &mut server] {
        c.peer_receive_maximum = WINDOW;
        c.receive_maximum = WINDOW;
        c.keep_alive = 30;
        if manual {
            c.ack_mode = AckMode::Manual;
        }
    }
    let mut pair = Pair::with(client, server);
    for side in [&mut pair.client, &mut pair.server] {
        side.conn().track(false);
    }
    let mut copies = [SessionState::new(), SessionState::new()];
    let mut published: Vec<Published> = vec![];
    let mut epoch = 0;
    let mut steps = StepCheck {
        open_ids: HashSet::new(),
        wire_seen: 0,
        acks_seen: [0; 2],
    };

    for op in ops.iter().cloned() {
        match op {
            Op::Publish { from_client, qos } => {
                let tag = if from_client { 'c' } else { 's' };
                let payload = format!("{tag}{}", published.len());
                pair.publish(from_client, msg(&payload, qos));
                published.push(Published {
                    payload,
                    qos,
                    from_client,
                    epoch,
                });
            }
            Op::Deliver { to_server, n } => {
                let dir = if to_server {
                    Dir::ToServer
                } else {
                    Dir::ToClient
                };
                for _ in 0..n {
                    pair.deliver(dir);
                }
            }
            Op::Duplicate { to_server } => {
                pair.duplicate_next(if to_server {
                    Dir::ToServer
                } else {
                    Dir::ToClient
                });
            }
            Op::Cut => {
                pair.cut();
                pair.reconnect(true);
            }
            Op::Reconnect { resume } => {
                pair.cut();
                pair.reconnect(resume);
                if !resume {
                    epoch += 1;
                    steps.open_ids.clear();
                }
            }
            Op::AckPending => {
                ack_pending(&mut pair);
            }
            Op::Advance { secs } => pair.advance(Duration::from_secs(u64::from(secs))),
        }
        steps.check(&pair, WINDOW)?;
        sync_copy(&mut pair.client, &mut copies[0])?;
        sync_copy(&mut pair.server, &mut copies[1])?;
    }

    pair.cut();
    pair.reconnect(true);
    // Acknowledge-later: each round releases what arrived, which opens the window for more.
    // Every message needs at most one round, so this bound is never the limit.
    for _ in 0..=published.len() {
        pair.drive();
        if !ack_pending(&mut pair) {
            break;
        }
    }
    pair.drive();
    steps.check(&pair, WINDOW)?;

    let mut count: HashMap<String, usize> = HashMap::new();
    let mut first_order: [Vec<String>; 2] = [vec![], vec![]];
    for (i, side) in [&pair.server, &pair.client].into_iter().enumerate() {
        for p in side.delivered_payloads() {
            let n = count.entry(p.clone()).or_default();
            *n += 1;
            if *n == 1 {
                first_order[i].push(p);
            }
        }
    }
    for m in &published {
        let n = count.get(&m.payload).copied().unwrap_or(0);
        let guaranteed = m.epoch == epoch;
        match m.qos {
            QoS::AtMostOnce => ensure!(n <= 1, "QoS 0 {} delivered {n} times", m.payload),
            QoS::AtLeastOnce => ensure!(!guaranteed || n >= 1, "QoS 1 {} lost", m.payload),
            QoS::ExactlyOnce => {
                ensure!(n <= 1, "QoS 2 {} delivered {n} times", m.payload);
                ensure!(!guaranteed || n == 1, "QoS 2 {} lost", m.payload);
            }
        }
    }
    // Every message the session numbered is ended by one event at most; each QoS 1/2 one,
    // all completed by now, by exactly one: the id a caller keys its side map by comes
    // back, once.
    for side in [&pair.client, &pair.server] {
        let mut ended: HashMap<MessageId, usize> = HashMap::new();
        for id in &side.ended {
            *ended.entry(*id).or_default() += 1;
        }
        for (id, qos) in &side.numbered {
            let n = ended.remove(id).unwrap_or(0);
            match qos {
                QoS::AtMostOnce => ensure!(n <= 1, "QoS 0 message {id} ended {n} times"),
                _ => ensure!(n == 1, "QoS {qos:?} message {id} ended {n} times"),
            }
        }
        ensure!(
            ended.is_empty(),
            "events ended messages the session never numbered: {ended:?}"
        );
    }
    for (i, from_client) in [(0, true), (1, false)] {
        let expected: Vec<&String> = published
            .iter()
            .filter(|m| m.from_client == from_client && m.epoch == epoch)
            .filter(|m| m.qos != QoS::AtMostOnce)
            .map(|m| &m.payload)
            .collect();
        let got: Vec<&String> = first_order[i]
            .iter()
            .filter(|p| expected.contains(p))
            .collect();
        ensure!(
            got == expected,
            "order from sender {from_client}: {got:?} != {expected:?}"
        );
    }
    Ok(())
}

/// Decodes fuzzer bytes into operations, two bytes an operation.
pub fn ops_from_bytes(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(2)
        .map(|c| {
            let arg = c[1];
            match c[0] % 19 {
                0..=5 => Op::Publish {
                    from_client: arg & 1 == 0,
                    qos: QoS::from_bits((arg >> 1) % 3).unwrap_or_default(),
                },
                6..=11 => Op::Deliver {
                    to_server: arg & 1 == 0,
                    n: 1 + (arg >> 1) % 5,
                },
                12 => Op::Duplicate {
                    to_server: arg & 1 == 0,
                },
                13 => Op::Cut,
                14 => Op::Reconnect {
                    resume: arg % 5 != 0,
                },
                15 | 16 => Op::AckPending,
                _ => Op::Advance { secs: arg % 40 },
            }
        })
        .collect()
}

/// The fuzz target's body: any byte string is a run that must keep every invariant.
pub fn fuzz_ops(data: &[u8]) {
    let (mode, rest) = data.split_first().unwrap_or((&0, &[]));
    let protocol = if mode & 1 == 0 {
        Protocol::V5
    } else {
        Protocol::V3_1_1
    };
    let ops = ops_from_bytes(rest);
    if let Err(e) = check_ops(protocol, mode & 2 != 0, &ops) {
        panic!("{e}\n{protocol} manual={} ops={ops:?}", mode & 2 != 0);
    }
}
