//! A simulated link and clock for two engines (quinn-proto's `Pair` idea): a client and a
//! server `Connection` exchange real encoded bytes through tern-codec; the test decides
//! when packets arrive, cuts the connection (everything in flight is lost, as when TCP
//! breaks), reconnects with or without the session, advances time, duplicates packets.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_codec::{
    MAX_PACKET_SIZE, Packet, PacketId, PacketType, Protocol, QoS, ReasonCode, TopicName,
};
use tern_proto::{Config, Connection, DropReason, Event, Message, Role, SessionState};

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
                    message,
                    reason,
                } => self.acknowledged.push((id, message, reason)),
                Event::Dropped { message, reason } => self.dropped.push((message, reason)),
                Event::Closed { reason } => self.closed.push(reason),
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
        if let Some(c) = side.conn.as_mut() {
            c.publish(message, now);
        } else if message.qos == QoS::AtMostOnce {
            side.dropped.push((message, DropReason::NotConnected));
        } else {
            // Offline: the message waits in the session, as the broker queues it.
            side.stored.enqueue(message);
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

    /// Makes the next packet in `dir` arrive twice, standing for a peer's resend. TCP
    /// itself never duplicates, and only packets with a packet id can be resent, so a
    /// QoS 0 PUBLISH (which nothing could deduplicate) is left alone.
    pub fn duplicate_next(&mut self, dir: Dir) {
        if let Some(Packet::Publish(p)) = self.peek(dir)
            && p.qos_pid.packet_id().is_none()
        {
            return;
        }
        let queue = match dir {
            Dir::ToServer => &mut self.to_server,
            Dir::ToClient => &mut self.to_client,
        };
        if let Some(front) = queue.front().cloned() {
            queue.push_front(front);
        }
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
