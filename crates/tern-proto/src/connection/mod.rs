//! One MQTT connection's protocol state, client or server side, after the CONNECT/CONNACK
//! handshake: QoS flows, keepalive, topic aliases, flow control.
//!
//! Methods are grouped as in quinn-proto: getters; `handle_*` for what arrives (packets,
//! timeouts); commands (`publish`, `ack`); `poll_*` for what the driver must do (packets
//! to write, events for the application, the next deadline). Time is always passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tern_codec::properties::AckProperties;
use tern_codec::{
    Ack, ConnAck, Connect, Disconnect, Packet, PacketId, PacketType, Props, Protocol, Publish, QoS,
    QosPid, ReasonCode, TopicName, encoded_len,
};

use crate::Message;
use crate::alias::{self, AliasError, Choice};
use crate::idmap::IdMap;
use crate::session::{Entry, InboundState, MessageId, OutboundState, SessionState};

mod inbound;
mod outbound;

/// Which side of the connection this engine plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends PINGREQ when idle; the side that connects.
    Client,
    /// Answers PINGREQ; closes silent clients after 1.5 x keep alive.
    Server,
}

/// When inbound QoS 1/2 messages are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckMode {
    /// PUBACK/PUBREC go out as soon as the message is delivered to the application.
    Immediate,
    /// The application releases each PUBACK/PUBREC with [`Connection::ack`], for example
    /// once the message is on disk (persist, then acknowledge).
    Manual,
}

/// What was agreed for this connection by CONNECT and CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Client or server.
    pub role: Role,
    /// Protocol version.
    pub protocol: Protocol,
    /// Keep alive in seconds (the client's, or the 5.0 Server Keep Alive); 0 turns it off.
    pub keep_alive: u16,
    /// QoS 1/2 messages we accept from the peer unacknowledged (our Receive Maximum).
    /// Enforced in 5.0, where the peer knows it.
    pub receive_maximum: u16,
    /// QoS 1/2 messages we send before waiting for acknowledgements: the peer's Receive
    /// Maximum in 5.0, a configured default in 3.x.
    pub peer_receive_maximum: u16,
    /// The largest packet the peer accepts; larger messages are dropped for this peer.
    pub peer_maximum_packet_size: u32,
    /// Topic aliases we accept from the peer (our Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// Topic aliases the peer accepts from us.
    pub peer_topic_alias_maximum: u16,
    /// When inbound QoS 1/2 messages are acknowledged.
    pub ack_mode: AckMode,
}

impl Config {
    /// Defaults for `role` and `protocol`: 60 s keep alive, windows of 65,535 in 5.0 and 32
    /// in 3.x outbound, no size limit, no topic aliases, immediate acknowledgements.
    pub fn new(role: Role, protocol: Protocol) -> Config {
        Config {
            role,
            protocol,
            keep_alive: 60,
            receive_maximum: u16::MAX,
            peer_receive_maximum: if protocol.is_v5() { u16::MAX } else { 32 },
            peer_maximum_packet_size: tern_codec::MAX_PACKET_SIZE,
            topic_alias_maximum: 0,
            peer_topic_alias_maximum: 0,
            ack_mode: AckMode::Immediate,
        }
    }
}

impl Config {
    /// What a CONNECT and its CONNACK agreed, from `role`'s side. In 5.0: the Server Keep
    /// Alive replaces the client's keep alive [MQTT-3.2.2-21]; each side's Receive Maximum,
    /// Maximum Packet Size and Topic Alias Maximum bound what the other sends. In 3.x the
    /// packets carry none of that: the outbound window is `window_3x` and nothing else is
    /// limited.
    pub fn negotiate(
        role: Role,
        connect: &Connect,
        connack: &ConnAck,
        ack_mode: AckMode,
        window_3x: u16,
    ) -> Config {
        let protocol = connect.protocol;
        let mut config = Config::new(role, protocol);
        config.ack_mode = ack_mode;
        config.keep_alive = connect.keep_alive;
        if !protocol.is_v5() {
            config.peer_receive_maximum = window_3x;
            return config;
        }
        let (c, s) = (&*connect.properties, &*connack.properties);
        config.keep_alive = s.server_keep_alive.unwrap_or(connect.keep_alive);
        let client_rm = c.receive_maximum.map_or(u16::MAX, |n| n.get());
        let server_rm = s.receive_maximum.map_or(u16::MAX, |n| n.get());
        let client_mps = c
            .maximum_packet_size
            .map_or(tern_codec::MAX_PACKET_SIZE, |n| n.get());
        let server_mps = s
            .maximum_packet_size
            .map_or(tern_codec::MAX_PACKET_SIZE, |n| n.get());
        let client_tam = c.topic_alias_maximum.unwrap_or(0);
        let server_tam = s.topic_alias_maximum.unwrap_or(0);
        let (ours, theirs) = match role {
            Role::Client => ((client_rm, client_tam), (server_rm, server_mps, server_tam)),
            Role::Server => ((server_rm, server_tam), (client_rm, client_mps, client_tam)),
        };
        (config.receive_maximum, config.topic_alias_maximum) = ours;
        (
            config.peer_receive_maximum,
            config.peer_maximum_packet_size,
            config.peer_topic_alias_maximum,
        ) = theirs;
        config
    }
}

/// Why a message was not sent to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its Message Expiry Interval passed before sending started.
    Expired,
    /// Larger than the peer's Maximum Packet Size [MQTT-3.1.2-24]; treated as sent.
    TooLarge,
    /// QoS 0 while the connection is closed.
    NotConnected,
}

/// Something the application must know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message from the peer. QoS 2 messages are delivered once per session however
    /// often the peer resends. With [`AckMode::Manual`], `ack` is the id to pass to
    /// [`Connection::ack`].
    Message {
        /// The message, topic alias resolved.
        message: Message,
        /// Set when the acknowledgement waits for the application.
        ack: Option<PacketId>,
    },
    /// An outbound QoS 1/2 flow ended: PUBACK or PUBCOMP arrived (`reason` Success or
    /// another non-error code), or PUBACK/PUBREC carried an error reason.
    Acknowledged {
        /// The flow's packet id, now free.
        id: PacketId,
        /// The session's number for the message ([`Connection::publish`] returned it).
        message_id: MessageId,
        /// The message.
        message: Message,
        /// The reason code the peer gave.
        reason: ReasonCode,
    },
    /// A message was not sent.
    Dropped {
        /// The session's number for the message ([`Connection::publish`] returned it).
        message_id: MessageId,
        /// The message.
        message: Message,
        /// Why.
        reason: DropReason,
    },
    /// A packet outside the QoS flows (SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, AUTH), for
    /// the broker or client to handle.
    Control(Packet),
    /// The connection is over; close the socket once `poll_transmit` is drained (it may
    /// hold a DISCONNECT).
    Closed {
        /// Why: the peer's DISCONNECT reason, Keep Alive timeout, or our protocol error.
        reason: ReasonCode,
        /// The Session Expiry Interval the peer's 5.0 DISCONNECT set, if it set one (the
        /// broker applies it, or refuses 0 -> non-zero [MQTT-3.14.2-2]).
        session_expiry: Option<u32>,
    },
}

/// A peer broke the protocol. The engine has already queued the DISCONNECT (5.0) and the
/// [`Event::Closed`]; the error says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// CONNECT or CONNACK after the handshake.
    #[error("[MQTT-3.1.0-2] unexpected {0:?} after the handshake")]
    UnexpectedPacket(PacketType),
    /// A QoS 1/2 PUBLISH beyond the Receive Maximum we advertised.
    #[error(
        "[MQTT-3.3.4-7] [MQTT-3.3.4-9] more QoS 1/2 messages in flight than the Receive Maximum of {0}"
    )]
    ReceiveMaximumExceeded(u16),
    /// A topic alias above the Topic Alias Maximum we advertised.
    #[error("[MQTT-3.3.2-9] topic alias {0} exceeds the Topic Alias Maximum")]
    TopicAliasOutOfRange(u16),
    /// An empty topic with an alias that was never bound on this connection.
    #[error("[MQTT-3.3.2-12] topic alias {0} is not bound on this connection")]
    UnknownTopicAlias(u16),
    /// A client sent a Subscription Identifier in PUBLISH.
    #[error("[MQTT-3.3.4-6] PUBLISH from a client must not carry a Subscription Identifier")]
    SubscriptionIdFromClient,
    /// PINGREQ sent to a client or PINGRESP to a server.
    #[error("[MQTT-3.12] {0:?} sent to the wrong side")]
    WrongSide(PacketType),
}

impl ProtocolError {
    /// The reason code for the DISCONNECT.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProtocolError::ReceiveMaximumExceeded(_) => ReasonCode::ReceiveMaximumExceeded,
            ProtocolError::TopicAliasOutOfRange(_) => ReasonCode::TopicAliasInvalid,
            _ => ReasonCode::ProtocolError,
        }
    }
}

/// A packet above the peer's Maximum Packet Size.
struct TooLarge;

/// The protocol state of one connection.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    session: SessionState,
    open: bool,
    transmit: VecDeque<Packet>,
    events: VecDeque<Event>,
    last_received: Instant,
    last_sent: Instant,
    ping_sent_at: Option<Instant>,
    inbound_aliases: alias::Inbound,
    outbound_aliases: alias::Outbound,
    /// Inbound QoS 1 ids delivered but not yet acknowledged (acknowledge-later mode).
    pending_puback: IdMap<()>,
    /// SUBSCRIBE / UNSUBSCRIBE sent and not yet answered (client side): their ids are not
    /// reused meanwhile. Not part of the session: they end with the connection.
    requests: IdMap<()>,
    /// Inbound QoS 2 PUBLISH packets answered without delivering them again.
    duplicates: u64,
}

impl Connection {
    /// Starts a connection once CONNECT/CONNACK are done. With `resume` (a session was
    /// present), unacknowledged PUBLISH packets are resent with DUP set and their original
    /// ids, and PUBREL for flows whose PUBREC arrived, in the original order
    /// [MQTT-4.4.0-1]; queued messages follow as the window allows.
    pub fn new(
        config: Config,
        mut session: SessionState,
        resume: bool,
        now: Instant,
    ) -> Connection {
        if !resume {
            let tracked = session.is_tracked();
            session = SessionState::new();
            if tracked {
                // A new session replaces the stored one whole.
                session.track(false);
            }
        }
        let mut conn = Connection {
            inbound_aliases: alias::Inbound::new(config.topic_alias_maximum),
            outbound_aliases: alias::Outbound::new(if config.protocol.is_v5() {
                config.peer_topic_alias_maximum
            } else {
                0
            }),
            config,
            session,
            open: true,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            last_received: now,
            last_sent: now,
            ping_sent_at: None,
            pending_puback: IdMap::default(),
            requests: IdMap::default(),
            duplicates: 0,
        };
        let resend: Vec<(PacketId, OutboundState)> =
            conn.session.inflight().map(|f| (f.id, f.state)).collect();
        for (id, state) in resend {
            match state {
                OutboundState::Published => conn.send_inflight_publish(id, true, now),
                OutboundState::Released => conn.transmit.push_back(Packet::PubRel(Ack::new(id))),
            }
        }
        conn.pump(now);
        conn
    }

    // ---- getters -------------------------------------------------------------------

    /// The agreed configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The durable session state.
    pub fn session(&self) -> &SessionState {
        &self.session
    }

    /// Stops the change journal of the session (see [`SessionState::untrack`]).
    pub fn untrack(&mut self) {
        self.session.untrack();
    }

    /// Removes the queued (not in flight) messages whose expiry has passed; how many.
    /// For an owner applying its own queue limits.
    pub fn remove_expired_queued(&mut self, now: Instant) -> usize {
        self.session.remove_expired(now)
    }

    /// Drops the oldest queued message, in memory or spilled (see
    /// [`SessionState::drop_oldest`]); false if none waits.
    pub fn drop_oldest(&mut self) -> bool {
        self.session.drop_oldest()
    }

    /// Keeps at most `cap` waiting messages in memory (see [`SessionState::set_window`]).
    pub fn set_window(&mut self, cap: Option<usize>) {
        self.session.set_window(cap);
    }

    /// Notes that the load the session wants ([`SessionState::wants_load`]) is out.
    pub fn begin_load(&mut self, token: u64) {
        self.session.begin_load(token);
    }

    /// The answer to load `token` (see [`SessionState::loaded`]); what the window has
    /// room for goes into flight at once. Returns the ids taken.
    pub fn loaded(&mut self, token: u64, entries: Vec<Entry>, now: Instant) -> Vec<MessageId> {
        let taken = self.session.loaded(token, entries);
        if !taken.is_empty() {
            self.pump(now);
        }
        taken
    }

    /// Starts the change journal of the session (see [`SessionState::track`]).
    pub fn track(&mut self, known: bool) {
        self.session.track(known);
    }

    /// The session's changes since the last call (see [`SessionState::take_changes`]), for
    /// the owner to persist before it sends what they produced.
    pub fn take_changes(&mut self) -> Option<crate::Changes> {
        self.session.take_changes()
    }

    /// Whether a QoS 1/2 message published now would wait in the session's queue: the
    /// peer's Receive Maximum window is full, others wait ahead of it, or the connection
    /// has ended. (A broker applies its queue limits to such a message.)
    pub fn would_wait(&self) -> bool {
        !self.open || self.session.queued_len() > 0 || self.session.inflight_len() >= self.window()
    }

    /// Client side: a PINGREQ went out and nothing has come from the peer since (the driver
    /// must read, or the connection is declared dead a keep alive later).
    pub fn awaits_ping_response(&self) -> bool {
        self.ping_sent_at.is_some()
    }

    /// False once the connection has ended (DISCONNECT, keepalive timeout, protocol error).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Ends the connection (socket closed or lost) and hands back the session state, to
    /// persist or to resume on the next connection.
    pub fn into_session(self) -> SessionState {
        self.session
    }

    // ---- commands --------------------------------------------------------------------

    /// Inbound QoS 2 PUBLISH packets (resends of a message already delivered) answered
    /// without being delivered again, over the connection's life.
    pub fn duplicates_suppressed(&self) -> u64 {
        self.duplicates
    }

    /// Sends a message. QoS 0 goes out now (or is dropped while closed); QoS 1/2 takes a
    /// packet id when the peer's Receive Maximum allows, otherwise waits in order. Returns
    /// the session's number for the message, which the [`Event::Acknowledged`] or
    /// [`Event::Dropped`] that ends it carries.
    pub fn publish(&mut self, message: Message, now: Instant) -> MessageId {
        let message_id = self.session.next_message_id();
        if message.qos == QoS::AtMostOnce {
            let dropped = if !self.open {
                Some(DropReason::NotConnected)
            } else if message.is_expired(now) {
                Some(DropReason::Expired)
            } else {
                let publish = message.to_publish(QosPid::AtMostOnce, false, now);
                self.send_publish(publish)
                    .is_err()
                    .then_some(DropReason::TooLarge)
            };
            if let Some(reason) = dropped {
                self.events.push_back(Event::Dropped {
                    message_id,
                    message,
                    reason,
                });
            }
            return message_id;
        }
        let entry = Entry {
            id: message_id,
            since: now,
            message,
        };
        if self.session.queued_len() == 0
            && self.open
            && self.session.inflight_len() < self.window()
        {
            // Nothing waits ahead of it and the window has room: straight into flight.
            if let Err(entry) = self.launch(entry, false, now) {
                self.session.push_entry(entry);
            }
            return message_id;
        }
        self.session.push_entry(entry);
        self.pump(now);
        message_id
    }

    /// Releases the acknowledgement of an inbound QoS 1/2 message delivered with
    /// `ack: Some(id)`: PUBACK, or PUBREC after which the QoS 2 id is remembered until
    /// PUBREL. Returns false if nothing waited on `id`.
    pub fn ack(&mut self, id: PacketId) -> bool {
        self.ack_with(id, ReasonCode::Success)
    }

    /// As [`Connection::ack`] with a reason code; an error code (for example 0x97 Quota
    /// exceeded) refuses the message and, for QoS 2, ends the flow.
    pub fn ack_with(&mut self, id: PacketId, reason: ReasonCode) -> bool {
        self.ack_with_properties(id, reason, Props::NONE)
    }

    /// As [`Connection::ack_with`], with 5.0 properties on the PUBACK/PUBREC (a Reason
    /// String, User Properties).
    pub fn ack_with_properties(
        &mut self,
        id: PacketId,
        reason: ReasonCode,
        properties: Props<AckProperties>,
    ) -> bool {
        let mut ack = Ack::with_reason(id, reason);
        ack.properties = properties;
        if self.pending_puback.remove(&id).is_some() {
            self.transmit.push_back(Packet::PubAck(ack));
            return true;
        }
        if self.session.inbound(id) == Some(InboundState::Delivered) {
            if reason.is_error() {
                self.session.remove_inbound(id);
            } else {
                self.session.set_inbound(id, InboundState::Received);
            }
            self.transmit.push_back(Packet::PubRec(ack));
            return true;
        }
        false
    }

    /// Client side: sends a SUBSCRIBE for `subscriptions` under a packet id no other flow
    /// uses until the SUBACK comes ([`Event::Control`] with that id); the id, or
    /// `IdsExhausted` if every id is in use.
    pub fn subscribe(
        &mut self,
        subscriptions: Vec<tern_codec::Subscription>,
    ) -> Result<PacketId, crate::IdsExhausted> {
        self.subscribe_with_properties(subscriptions, Default::default())
    }

    /// As [`Connection::subscribe`], with SUBSCRIBE properties (5.0: a Subscription
    /// Identifier, User Properties).
    pub fn subscribe_with_properties(
        &mut self,
        subscriptions: Vec<tern_codec::Subscription>,
        properties: tern_codec::Props<tern_codec::properties::SubscribeProperties>,
    ) -> Result<PacketId, crate::IdsExhausted> {
        let id = self.request_id()?;
        self.transmit
            .push_back(Packet::Subscribe(tern_codec::Subscribe {
                packet_id: id,
                subscriptions,
                properties,
            }));
        Ok(id)
    }

    /// Client side: sends an UNSUBSCRIBE for `filters`, as [`Connection::subscribe`].
    pub fn unsubscribe(
        &mut self,
        filters: Vec<tern_codec::TopicFilter>,
    ) -> Result<PacketId, crate::IdsExhausted> {
        let id = self.request_id()?;
        self.transmit
            .push_back(Packet::Unsubscribe(tern_codec::Unsubscribe {
                packet_id: id,
                filters,
                properties: Default::default(),
            }));
        Ok(id)
    }

    /// SUBSCRIBE / UNSUBSCRIBE sent on this connection and not yet answered.
    pub fn requests_pending(&self) -> usize {
        self.requests.len()
    }

    fn request_id(&mut self) -> Result<PacketId, crate::IdsExhausted> {
        let requests = &self.requests;
        let id = self
            .session
            .allocate_id_skipping(|id| requests.contains_key(&id), requests.len())?;
        self.requests.insert(id, ());
        Ok(id)
    }

    /// Ends the connection from our side: a DISCONNECT with `reason` in 5.0; in 3.x, where
    /// only a client sends DISCONNECT, a server just closes.
    pub fn disconnect(&mut self, reason: ReasonCode) {
        if self.open {
            if self.config.protocol.is_v5() || self.config.role == Role::Client {
                self.transmit
                    .push_back(Packet::Disconnect(Disconnect::new(reason)));
            }
            self.open = false;
        }
    }

    // ---- outputs ---------------------------------------------------------------------

    /// The next packet to write to the peer.
    ///
    /// Nothing larger than the peer's Maximum Packet Size goes out [MQTT-3.1.2-24]: an
    /// acknowledgement, DISCONNECT or AUTH that would be loses its Reason String and User
    /// Properties [MQTT-3.4.2-2] [MQTT-3.4.2-3], and one that still would is not sent.
    /// (A PUBLISH that does not fit is dropped before it takes a packet id.)
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Packet> {
        loop {
            let mut packet = self.transmit.pop_front()?;
            if self.config.peer_maximum_packet_size < tern_codec::MAX_PACKET_SIZE
                && !matches!(packet, Packet::Publish(_))
                && !self.fits(&packet)
            {
                packet.drop_optional_properties();
                if !self.fits(&packet) {
                    continue;
                }
            }
            self.last_sent = now;
            return Some(packet);
        }
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Connection::handle_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.open || self.config.keep_alive == 0 {
            return None;
        }
        let k = Duration::from_secs(u64::from(self.config.keep_alive));
        Some(match (self.config.role, self.ping_sent_at) {
            (Role::Server, _) => self.last_received + k + k / 2,
            (Role::Client, Some(sent)) => sent + k,
            (Role::Client, None) => self.last_sent + k,
        })
    }
}
