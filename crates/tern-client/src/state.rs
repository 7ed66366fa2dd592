//! The client's protocol state across connections, sans-IO: no socket, no clock, no task.
//! The driver ([`crate::driver`]) reads and writes the transport, tells this state what
//! arrived and what the application asked, and writes what it says; the tests drive it
//! against a server engine on a simulated clock.
//!
//! What lives here: the handshake's result (the CONNACK makes the engine, resuming or
//! replacing the session), what the application waits for (publishes by the session's message id, SUBSCRIBE /
//! UNSUBSCRIBE by packet id, QoS 0 writes, idle waiters), the session held between
//! connections with what is published meanwhile, and the reconnection attempts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tern_codec::{ConnAck, Connect, Packet, PacketId, QoS, ReasonCode};
use tern_proto::{AckMode, Changes, Config, Connection, Entry, MessageId, Role, SessionState};
use tokio::sync::oneshot;

use crate::{Backoff, Error, Event};

/// Where the answer to a command goes.
pub(crate) type Done<T> = oneshot::Sender<Result<T, Error>>;

/// Waiting publishes and requests, across connections.
#[derive(Default)]
pub(crate) struct Pending {
    /// QoS 1/2 publishes, by the id the session gave the message: the client's side map
    /// (the engine's `Message` carries nothing of the caller's).
    publishes: HashMap<MessageId, Done<ReasonCode>>,
    /// QoS 0 publishes queued to the socket, resolved after the next write.
    written: Vec<Done<ReasonCode>>,
    /// SUBSCRIBE / UNSUBSCRIBE by packet id.
    requests: HashMap<PacketId, Done<Vec<ReasonCode>>>,
    /// [`crate::Client::wait_idle`] callers.
    idle: Vec<oneshot::Sender<()>>,
}

/// What a command while disconnected comes to.
pub(crate) enum Offline {
    /// Answered (or nothing to do).
    Done,
    /// A QoS 1/2 publish queued in the held session: the driver writes the outbox, then
    /// hands the answer channel to [`ClientState::wait_for`] (kept before the caller
    /// learns it is waiting).
    Queued(MessageId, Done<ReasonCode>),
    /// The application ends the client.
    Quit,
}

/// What the driver does after a command.
pub(crate) enum Then {
    /// Carry on.
    Continue,
    /// The application ends the client: save, flush, close; `done` (if any) is told once
    /// that is done.
    Quit(Option<oneshot::Sender<()>>),
}

/// The client's state: a connection's engine while one is up, the session otherwise.
pub(crate) struct ClientState {
    conn: Option<Connection>,
    /// The session while no connection is up.
    held: SessionState,
    pending: Pending,
    /// Messages of a session the broker no longer had: sent again as new on the next
    /// connection.
    orphans: Vec<Entry>,
    /// Reconnection attempts since the last connection was made.
    attempt: u32,
    /// Most QoS 1/2 publishes waiting for their outcome while disconnected.
    max_pending: usize,
    /// Whether a durable outbox follows the session.
    outbox: bool,
    /// When inbound QoS 1/2 messages are acknowledged (the bridge releases its own).
    ack_mode: AckMode,
}

impl ClientState {
    /// The state before the first connection, from the session an outbox kept (or a new
    /// one).
    pub(crate) fn new(held: SessionState, max_pending: usize, outbox: bool) -> ClientState {
        ClientState {
            conn: None,
            held,
            pending: Pending::default(),
            orphans: Vec::new(),
            attempt: 0,
            max_pending,
            outbox,
            ack_mode: AckMode::Immediate,
        }
    }

    /// Inbound QoS 1/2 messages wait for [`Connection::ack`] (the bridge acknowledges a
    /// message once the other side's copy is stored).
    pub(crate) fn manual_acks(&mut self) {
        self.ack_mode = AckMode::Manual;
    }

    /// The session while no connection is up; `None` while one is.
    pub(crate) fn held(&mut self) -> Option<&mut SessionState> {
        match self.conn {
            Some(_) => None,
            None => Some(&mut self.held),
        }
    }

    /// When the connection's engine next needs [`Connection::handle_timeout`].
    pub(crate) fn conn_timeout(&self) -> Option<Instant> {
        self.conn.as_ref().and_then(Connection::poll_timeout)
    }

    /// The session, whether a connection is up or not.
    pub(crate) fn session(&self) -> &SessionState {
        match &self.conn {
            Some(c) => c.session(),
            None => &self.held,
        }
    }

    /// Whether something of an earlier process or connection waits to be sent.
    pub(crate) fn has_unfinished(&self) -> bool {
        self.held.inflight_len() > 0 || self.held.queued_len() > 0
    }

    /// The connection's engine, while one is up.
    pub(crate) fn conn(&mut self) -> Option<&mut Connection> {
        self.conn.as_mut()
    }

    /// The CONNACK to `connect` arrived. Accepted, the engine takes over the session:
    /// resumed with its in-flight messages resent if the broker kept it, or (for a
    /// session the broker lost, `established` being true after a connection that worked)
    /// replaced, what was in flight or queued going again as new messages. Refused: the
    /// reason. `Ok` carries session present.
    pub(crate) fn handle_connack(
        &mut self,
        connect: &Connect,
        ack: &ConnAck,
        inflight: u16,
        established: bool,
        now: Instant,
    ) -> Result<bool, Error> {
        if ack.reason.is_error() {
            return Err(Error::Refused(ack.reason));
        }
        let config = Config::negotiate(Role::Client, connect, ack, self.ack_mode, inflight);
        let mut state = std::mem::replace(&mut self.held, SessionState::new());
        if established && !ack.session_present {
            // QoS 1: at least once still holds; QoS 2 may be doubled if the broker had
            // it, which the broker's loss makes unknowable.
            self.orphans = state.take_redeliverable(|_| true, true);
            state = SessionState::new();
        }
        let mut conn = Connection::new(config, state, ack.session_present, now);
        if self.outbox {
            // A session that replaced a lost one is written whole.
            conn.track(false);
        }
        if !self.orphans.is_empty() {
            // Sent again as new messages, under the new session's ids: each waiter moves
            // to its message's new id.
            let mut waiting = std::mem::take(&mut self.pending.publishes);
            for e in std::mem::take(&mut self.orphans) {
                let id = conn.publish(e.message, now);
                if let Some(done) = waiting.remove(&e.id) {
                    self.pending.publishes.insert(id, done);
                }
            }
            // What is left had its PUBREC: the lost session's broker had taken it.
            for (_, done) in waiting {
                let _ = done.send(Ok(ReasonCode::Success));
            }
        }
        self.conn = Some(conn);
        self.attempt = 0;
        Ok(ack.session_present)
    }

    /// What the engine reported, acted on: publishes and requests resolved, messages for
    /// the application (in order). `Err` with the reason when the broker ended the
    /// connection.
    pub(crate) fn handle_events(&mut self) -> (Vec<Event>, Option<String>) {
        let mut events = Vec::new();
        let Some(conn) = self.conn.as_mut() else {
            return (events, None);
        };
        while let Some(e) = conn.poll_event() {
            match e {
                tern_proto::Event::Message { message, .. } => events.push(Event::Message(message)),
                tern_proto::Event::Acknowledged {
                    message_id,
                    message,
                    reason,
                    ..
                } => {
                    // PUBCOMP 0x92 answers a PUBREL resent after a cut: the broker had
                    // completed the flow (the session is the one that took the PUBREC),
                    // so the message was delivered, once.
                    let reason = match (message.qos, reason) {
                        (QoS::ExactlyOnce, ReasonCode::PacketIdentifierNotFound) => {
                            ReasonCode::Success
                        }
                        (_, r) => r,
                    };
                    if let Some(done) = self.pending.publishes.remove(&message_id) {
                        let _ = done.send(Ok(reason));
                    }
                }
                tern_proto::Event::Dropped {
                    message_id, reason, ..
                } => {
                    let why = match reason {
                        tern_proto::DropReason::Expired => "expired before it could be sent",
                        tern_proto::DropReason::TooLarge => {
                            "larger than the broker's Maximum Packet Size"
                        }
                        tern_proto::DropReason::NotConnected => "not connected",
                    };
                    if let Some(done) = self.pending.publishes.remove(&message_id) {
                        let _ = done.send(Err(Error::Dropped(why)));
                    }
                }
                tern_proto::Event::Control(Packet::SubAck(a)) => {
                    if let Some(done) = self.pending.requests.remove(&a.packet_id) {
                        let _ = done.send(Ok(a.reasons));
                    }
                }
                tern_proto::Event::Control(Packet::UnsubAck(a)) => {
                    if let Some(done) = self.pending.requests.remove(&a.packet_id) {
                        let _ = done.send(Ok(a.reasons));
                    }
                }
                tern_proto::Event::Control(_) => {}
                tern_proto::Event::Closed { reason, .. } => {
                    let why = format!("closed by the broker: {reason:?} (0x{:02X})", reason as u8);
                    return (events, Some(why));
                }
            }
        }
        self.check_idle();
        (events, None)
    }

    /// Answers the idle waiters if nothing is in flight or waiting.
    fn check_idle(&mut self) {
        let session = match &self.conn {
            Some(c) => c.session(),
            None => &self.held,
        };
        if !self.pending.idle.is_empty() && session.inflight_len() == 0 && session.queued_len() == 0
        {
            for done in self.pending.idle.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// What the session changed since the last call, for the outbox (to be written before
    /// what produced it is sent).
    pub(crate) fn take_changes(&mut self) -> Option<Changes> {
        match &mut self.conn {
            Some(c) => c.take_changes(),
            None => self.held.take_changes(),
        }
    }

    /// A write to the socket completed: the QoS 0 publishes in it are done.
    pub(crate) fn written(&mut self) {
        for done in self.pending.written.drain(..) {
            let _ = done.send(Ok(ReasonCode::Success));
        }
    }

    /// Whether the application waits for something the broker must answer (so reading
    /// goes on even when the application is not taking its messages).
    pub(crate) fn awaited(&self) -> bool {
        !self.pending.publishes.is_empty()
            || !self.pending.requests.is_empty()
            || self
                .conn
                .as_ref()
                .is_some_and(|c| c.session().inflight_len() > 0 || c.awaits_ping_response())
    }

    /// A command of the application while connected.
    pub(crate) fn command(&mut self, c: crate::Command, now: Instant) -> Then {
        let Some(conn) = self.conn.as_mut() else {
            return match self.command_offline(c, now) {
                Offline::Done => Then::Continue,
                Offline::Queued(tag, done) => {
                    self.wait_for(tag, done);
                    Then::Continue
                }
                Offline::Quit => Then::Quit(None),
            };
        };
        match c {
            crate::Command::Disconnect(done) => {
                conn.disconnect(ReasonCode::Success);
                return Then::Quit(Some(done));
            }
            crate::Command::Publish(m, done) => {
                if m.qos == QoS::AtMostOnce {
                    conn.publish(m, now);
                    self.pending.written.push(done);
                } else {
                    let id = conn.publish(m, now);
                    self.pending.publishes.insert(id, done);
                }
            }
            crate::Command::Idle(done) => {
                self.pending.idle.push(done);
                self.check_idle();
            }
            crate::Command::Subscribe(subscriptions, properties, done) => {
                let id = conn.subscribe_with_properties(subscriptions, properties);
                self.request(done, id);
            }
            crate::Command::Unsubscribe(filters, done) => {
                let id = conn.unsubscribe(filters);
                self.request(done, id);
            }
        }
        Then::Continue
    }

    /// The application dropped its client: a normal DISCONNECT.
    pub(crate) fn dropped(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.disconnect(ReasonCode::Success);
        }
    }

    fn request(
        &mut self,
        done: Done<Vec<ReasonCode>>,
        id: Result<PacketId, tern_proto::IdsExhausted>,
    ) {
        match id {
            Ok(id) => {
                self.pending.requests.insert(id, done);
            }
            Err(_) => {
                let _ = done.send(Err(Error::Backlog));
            }
        }
    }

    /// A command while no connection is up: QoS 1/2 publishes wait in the session's queue
    /// (bounded by `max_pending`), QoS 0 and requests fail with [`Error::Closed`].
    pub(crate) fn command_offline(&mut self, c: crate::Command, now: Instant) -> Offline {
        match c {
            crate::Command::Publish(m, done) => {
                if m.qos == QoS::AtMostOnce {
                    let _ = done.send(Err(Error::Closed));
                } else if self.pending.publishes.len() >= self.max_pending {
                    let _ = done.send(Err(Error::Backlog));
                } else {
                    let id = self.held.enqueue(m, now);
                    return Offline::Queued(id, done);
                }
            }
            crate::Command::Subscribe(_, _, done) | crate::Command::Unsubscribe(_, done) => {
                let _ = done.send(Err(Error::Closed));
            }
            crate::Command::Idle(done) => {
                self.pending.idle.push(done);
                self.check_idle();
            }
            crate::Command::Disconnect(done) => {
                self.fail_publishes();
                let _ = done.send(());
                return Offline::Quit;
            }
        }
        Offline::Done
    }

    /// A publish queued while disconnected, now kept: its outcome is awaited.
    pub(crate) fn wait_for(&mut self, id: MessageId, done: Done<ReasonCode>) {
        self.pending.publishes.insert(id, done);
    }

    /// The connection ended: requests and QoS 0 writes fail; the session is held for the
    /// next connection, with its QoS 1/2 publishes still waiting.
    pub(crate) fn connection_lost(&mut self) {
        for (_, done) in self.pending.requests.drain() {
            let _ = done.send(Err(Error::Closed));
        }
        for done in self.pending.written.drain(..) {
            let _ = done.send(Err(Error::Closed));
        }
        if let Some(conn) = self.conn.take() {
            self.held = conn.into_session();
        }
    }

    /// The client ends for good: every publish still waiting fails with
    /// [`Error::Closed`].
    pub(crate) fn fail_publishes(&mut self) {
        for (_, done) in self.pending.publishes.drain() {
            let _ = done.send(Err(Error::Closed));
        }
    }

    /// How long to wait before the next reconnection attempt; `jitter` is any number (the
    /// driver passes the clock's nanoseconds).
    pub(crate) fn next_attempt(&mut self, backoff: Backoff, jitter: u32) -> Duration {
        let wait = crate::driver::delay(backoff, self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        wait
    }
}

/// The client's reconnect and resend claims on a simulated link and clock: the state
/// against a server engine, packets handed over by hand, a cut losing what was in flight.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::num::NonZeroU16;

    use tern_codec::{Protocol, Publish, QosPid, Subscription, TopicName};
    use tern_proto::Message;
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::{Command, Options};

    /// The client's state and the broker's side of its session.
    struct Pair {
        client: ClientState,
        /// The broker's engine while connected; its session while not.
        server: Option<Connection>,
        server_session: SessionState,
        now: Instant,
        options: Options,
        /// PUBLISH packets the broker's engine delivered (first deliveries only).
        delivered: Vec<String>,
        /// Every PUBLISH the client wrote.
        wire: Vec<Publish>,
    }

    impl Pair {
        fn new(max_pending: usize) -> Pair {
            let options = Options::new("127.0.0.1", 1883, "c")
                .protocol(Protocol::V5)
                .persistent(Duration::from_secs(3600));
            Pair {
                client: ClientState::new(SessionState::new(), max_pending, false),
                server: None,
                server_session: SessionState::new(),
                now: Instant::now(),
                options,
                delivered: Vec::new(),
                wire: Vec::new(),
            }
        }

        /// CONNECT and CONNACK; the broker kept the session if `kept`.
        fn connect(&mut self, kept: bool, established: bool) -> bool {
            let connect = self.options.connect_packet(false);
            let ack = ConnAck::new(kept, ReasonCode::Success);
            let present = self
                .client
                .handle_connack(&connect, &ack, 32, established, self.now)
                .unwrap();
            let config = Config::negotiate(Role::Server, &connect, &ack, AckMode::Immediate, 32);
            let session = if kept {
                std::mem::take(&mut self.server_session)
            } else {
                SessionState::new()
            };
            self.server = Some(Connection::new(config, session, kept, self.now));
            present
        }

        /// The connection breaks: whatever is in flight either way is lost.
        fn cut(&mut self) {
            if let Some(c) = self.client.conn() {
                while c.poll_transmit(self.now).is_some() {}
            }
            self.client.connection_lost();
            if let Some(s) = self.server.take() {
                self.server_session = s.into_session();
            }
        }

        /// Moves the client's packets to the broker (`to_server`) and the broker's back
        /// (`to_client`), until nothing moves or a direction is held.
        fn pump(&mut self, to_client: bool) {
            loop {
                let mut moved = false;
                let Some(server) = self.server.as_mut() else {
                    return;
                };
                if let Some(c) = self.client.conn() {
                    while let Some(p) = c.poll_transmit(self.now) {
                        if let Packet::Publish(p) = &p {
                            self.wire.push(p.clone());
                        }
                        server.handle_packet(p, self.now).unwrap();
                        moved = true;
                    }
                }
                while let Some(e) = server.poll_event() {
                    if let tern_proto::Event::Message { message, .. } = e {
                        self.delivered
                            .push(String::from_utf8(message.payload.to_vec()).unwrap());
                    }
                }
                if to_client {
                    while let Some(p) = server.poll_transmit(self.now) {
                        if let Some(c) = self.client.conn() {
                            c.handle_packet(p, self.now).unwrap();
                            moved = true;
                        }
                    }
                }
                let _ = self.client.handle_events();
                if !moved {
                    return;
                }
            }
        }

        fn publish(
            &mut self,
            payload: &str,
            qos: QoS,
        ) -> oneshot::Receiver<Result<ReasonCode, Error>> {
            let (tx, rx) = oneshot::channel();
            let m = Message::new(TopicName::new("t").unwrap(), payload.to_string(), qos);
            match self.client.conn() {
                Some(_) => {
                    let _ = self.client.command(Command::Publish(m, tx), self.now);
                }
                None => match self
                    .client
                    .command_offline(Command::Publish(m, tx), self.now)
                {
                    Offline::Queued(tag, done) => self.client.wait_for(tag, done),
                    Offline::Done | Offline::Quit => {}
                },
            }
            rx
        }
    }

    #[test]
    fn a_qos1_publish_cut_before_its_puback_is_resent_with_dup_and_resolves_on_the_next_puback() {
        let mut pair = Pair::new(100);
        pair.connect(false, false);
        let mut outcome = pair.publish("one", QoS::AtLeastOnce);
        pair.pump(false); // the PUBLISH arrives; the PUBACK is lost in the cut
        pair.cut();
        assert!(
            matches!(outcome.try_recv(), Err(TryRecvError::Empty)),
            "still waiting"
        );
        assert!(pair.connect(true, true), "session present");
        pair.pump(true);
        assert_eq!(outcome.try_recv().unwrap().unwrap(), ReasonCode::Success);
        assert_eq!(pair.wire.len(), 2);
        assert!(!pair.wire[0].dup && pair.wire[1].dup, "resent with DUP");
        assert_eq!(pair.wire[0].qos_pid, pair.wire[1].qos_pid, "same packet id");
        assert_eq!(
            pair.delivered,
            ["one", "one"],
            "at least once: a duplicate is allowed"
        );
    }

    #[test]
    fn a_qos2_publish_cut_after_its_pubrec_resumes_with_pubrel_and_is_delivered_once() {
        let mut pair = Pair::new(100);
        pair.connect(false, false);
        let mut outcome = pair.publish("pay", QoS::ExactlyOnce);
        pair.pump(false); // PUBLISH reaches the broker: delivered once
        let server = pair.server.as_mut().unwrap();
        let pubrec = server.poll_transmit(pair.now).unwrap();
        assert!(matches!(pubrec, Packet::PubRec(_)));
        pair.client
            .conn()
            .unwrap()
            .handle_packet(pubrec, pair.now)
            .unwrap();
        pair.cut(); // the PUBREL the client queued is lost
        pair.connect(true, true);
        let resent: Vec<Packet> =
            std::iter::from_fn(|| pair.client.conn().unwrap().poll_transmit(pair.now)).collect();
        assert!(
            matches!(resent.as_slice(), [Packet::PubRel(_)]),
            "PUBREL again, not the PUBLISH [MQTT-4.4.0-1]: {resent:?}"
        );
        for p in resent {
            pair.server
                .as_mut()
                .unwrap()
                .handle_packet(p, pair.now)
                .unwrap();
        }
        pair.pump(true);
        assert_eq!(outcome.try_recv().unwrap().unwrap(), ReasonCode::Success);
        assert_eq!(pair.delivered, ["pay"], "exactly once");
    }

    #[test]
    fn publishes_made_while_disconnected_wait_in_order_and_beyond_max_pending_are_refused() {
        let mut pair = Pair::new(2);
        pair.connect(false, false);
        pair.cut();
        let mut a = pair.publish("a", QoS::AtLeastOnce);
        let mut b = pair.publish("b", QoS::ExactlyOnce);
        let mut c = pair.publish("c", QoS::AtLeastOnce);
        let mut zero = pair.publish("z", QoS::AtMostOnce);
        assert!(
            matches!(c.try_recv(), Ok(Err(Error::Backlog))),
            "over max_pending"
        );
        assert!(
            matches!(zero.try_recv(), Ok(Err(Error::Closed))),
            "QoS 0 needs a connection"
        );
        pair.connect(true, true);
        pair.pump(true);
        assert_eq!(a.try_recv().unwrap().unwrap(), ReasonCode::Success);
        assert_eq!(b.try_recv().unwrap().unwrap(), ReasonCode::Success);
        assert_eq!(pair.delivered, ["a", "b"]);
    }

    #[test]
    fn a_subscribe_waiting_for_its_suback_at_a_cut_fails_with_closed() {
        let mut pair = Pair::new(100);
        pair.connect(false, false);
        let (tx, mut rx) = oneshot::channel();
        let filter = tern_codec::TopicFilter::new("t/#").unwrap();
        let sub = Subscription {
            filter,
            options: Default::default(),
        };
        let _ = pair.client.command(
            Command::Subscribe(vec![sub], Default::default(), tx),
            pair.now,
        );
        pair.cut();
        assert!(matches!(rx.try_recv(), Ok(Err(Error::Closed))));
    }

    #[test]
    fn what_a_broker_that_lost_the_session_had_in_flight_goes_again_as_new_messages() {
        let mut pair = Pair::new(100);
        pair.connect(false, false);
        let mut outcome = pair.publish("again", QoS::AtLeastOnce);
        pair.pump(false);
        pair.cut();
        assert!(!pair.connect(false, true), "the broker lost the session");
        pair.pump(true);
        assert_eq!(outcome.try_recv().unwrap().unwrap(), ReasonCode::Success);
        assert!(!pair.wire[1].dup, "a new message, not a resend");
        assert_eq!(pair.delivered, ["again", "again"]);
        let id = |p: &Publish| match p.qos_pid {
            QosPid::AtLeastOnce(id) => id,
            _ => NonZeroU16::MAX,
        };
        assert_eq!(
            id(&pair.wire[1]),
            NonZeroU16::new(1).unwrap(),
            "numbered afresh"
        );
    }

    #[test]
    fn reconnection_waits_grow_from_the_last_success() {
        let mut pair = Pair::new(100);
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let waits: Vec<Duration> = (0..3).map(|_| pair.client.next_attempt(b, 0)).collect();
        assert_eq!(waits, [100, 200, 400].map(Duration::from_millis));
        pair.connect(false, false);
        assert_eq!(
            pair.client.next_attempt(b, 0),
            Duration::from_millis(100),
            "reset"
        );
    }
}
