//! A simulated broker host for tests and fuzzing (feature `testing`; never in a default
//! build): one [`Broker`], any number of clients given as [`ConnId`]s, one simulated
//! clock, and a [`MemoryStore`] written the way the server's storage writer writes it.
//!
//! The persistence path is production's: after every input the host takes the core's
//! ops ([`Broker::take_ops`]), commits them as one batch, and only then releases the
//! outputs produced with them. A crash ([`Sim::restart`]) loses the process (every
//! connection and everything not committed) and resumes a new broker from what the
//! store holds, as the server does at start. [`Sim::fail_next_commit`] injects a store
//! failure: the batch is not written and what waited on it is never sent, and the host
//! restarts from the last commit, as the server does after `StoreFailed`.

// A harness: a failed unwrap is a failed test, with the value in the message.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::num::NonZeroU16;
use std::time::{Duration, Instant, SystemTime};

use tern_codec::{
    Connect, Packet, Publish, QoS, QosPid, Subscribe, Subscription, SubscriptionOptions,
    TopicFilter, TopicName,
};
use tern_store::{MemoryStore, Snapshot, Store, StoreError};

use crate::{Broker, ConnId, Output, Round, Send, Settings};

/// The simulated host.
pub struct Sim {
    /// The broker under test.
    pub broker: Broker,
    /// What it was started with (and is restarted with).
    pub settings: Settings,
    /// The simulated monotonic clock.
    pub now: Instant,
    /// An instant and the wall-clock time it corresponds to.
    anchor: (Instant, SystemTime),
    /// Every output released so far by this process (committed before release, but for
    /// the round's early sends), in order.
    pub outputs: Vec<Output>,
    /// What the previous process had released when it died (a client saw all of it).
    pub died_with: Vec<Output>,
    /// The last connection id handed out.
    next: ConnId,
    store: MemoryStore,
    /// The next commit fails (the store refuses it).
    fail_next: bool,
    /// Commits the store refused.
    pub failed_commits: u64,
    /// Restarts so far (crashes and failed commits).
    pub restarts: u64,
    /// Loads committed and not yet answered.
    pending_loads: std::collections::VecDeque<crate::Load>,
    /// Loads answered so far.
    pub loads_answered: u64,
    /// Durable rounds of this process committed so far.
    committed_rounds: u64,
    /// Loads read before their round's commit, answered after it.
    read_early: std::collections::VecDeque<(crate::Load, tern_store::QueuePart)>,
}

/// What a broker starts from, read as the server reads it: with its queues left in the
/// store when it keeps a memory window.
fn read_back(store: &MemoryStore, settings: &Settings) -> Snapshot {
    if settings.queue_window.is_some() {
        store.load_spilled().unwrap()
    } else {
        store.load().unwrap()
    }
}

impl Sim {
    /// A broker on an empty store; the wall clock starts at a fixed moment.
    pub fn new(settings: Settings) -> Sim {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let store = MemoryStore::new();
        let broker = Broker::resume(settings.clone(), read_back(&store, &settings), now, wall);
        Sim {
            broker,
            settings,
            now,
            anchor: (now, wall),
            outputs: vec![],
            died_with: vec![],
            next: 0,
            store,
            fail_next: false,
            failed_commits: 0,
            restarts: 0,
            pending_loads: Default::default(),
            loads_answered: 0,
            committed_rounds: 0,
            read_early: Default::default(),
        }
    }

    /// The broker process ends (every connection with it) and a new one starts on the
    /// same store `down_for` later. The new process's monotonic clock has nothing to do
    /// with the old one's, so only wall-clock deadlines can carry over.
    pub fn restart(&mut self, down_for: Duration) {
        let wall = self.anchor.1 + (self.now - self.anchor.0) + down_for;
        self.now += Duration::from_secs(100_000);
        let counters = self.broker.counters().clone();
        self.broker = Broker::resume(
            self.settings.clone(),
            read_back(&self.store, &self.settings),
            self.now,
            wall,
        );
        self.broker.set_counters(counters);
        self.anchor = (self.now, wall);
        self.pending_loads.clear();
        self.read_early.clear();
        self.committed_rounds = 0;
        self.died_with = std::mem::take(&mut self.outputs);
        self.restarts += 1;
        // Connection ids start again with the process, as the server's do.
        self.next = 0;
    }

    /// Makes the next commit fail: its outputs are never sent and the broker restarts
    /// from the last commit (no time passes), as the server does when its store fails.
    pub fn fail_next_commit(&mut self) {
        self.fail_next = true;
    }

    /// What the store holds.
    pub fn stored(&self) -> Snapshot {
        self.store.load().unwrap()
    }

    /// Releases what needs no commit, commits what the last input changed, then
    /// releases the rest of what it produced.
    pub fn pump(&mut self) {
        let sends = match self.broker.poll_round(|_| 0) {
            Round::Ready(sends) => sends,
            Round::Durable {
                ops,
                early,
                sealed,
                mut loads,
            } => {
                // Out before the commit, as the server sends them: a commit that fails
                // next finds them delivered.
                self.release(early);
                // Loads that may be read from what is committed: read now, before this
                // round's commit, as the server's writer does; answered after it.
                let mut read_early = Vec::new();
                for load in loads.early(self.committed_rounds) {
                    let messages = self
                        .store
                        .read_queue(&load.client_id, load.after, load.max)
                        .unwrap();
                    read_early.push((load, messages));
                }
                if std::mem::take(&mut self.fail_next) {
                    let error = StoreError::Backend("injected failure".into());
                    let _closed = sealed.failed(&error);
                    let _unread = loads.failed(&error);
                    self.failed_commits += 1;
                    self.restart(Duration::ZERO);
                    return;
                }
                let receipt = self.store.commit(&ops).unwrap();
                self.committed_rounds += 1;
                self.pending_loads.extend(loads.open(&receipt));
                self.read_early.extend(read_early);
                sealed.open(&receipt)
            }
        };
        self.release(sends);
        while let Some((load, messages)) = self.read_early.pop_front() {
            self.loads_answered += 1;
            self.broker.handle_loaded(&load, messages, self.now);
            self.pump();
        }
        // Loads are read after the commit and answered as the next inputs, as the
        // server's storage writer does.
        while let Some(load) = self.pending_loads.pop_front() {
            let messages = self
                .store
                .read_queue(&load.client_id, load.after, load.max)
                .unwrap();
            self.loads_answered += 1;
            self.broker.handle_loaded(&load, messages, self.now);
            self.pump();
        }
    }

    fn release(&mut self, sends: Vec<Send>) {
        for send in sends {
            let conn = send.conn;
            self.outputs
                .extend(send.packets.into_iter().map(|p| Output::Send(conn, p)));
            if send.close {
                self.outputs.push(Output::Close(conn));
            }
        }
    }

    /// A new connection whose first packet is `connect`.
    pub fn connect(&mut self, connect: Connect) -> ConnId {
        self.next += 1;
        self.broker
            .handle_packet(self.next, Packet::Connect(Box::new(connect)), self.now);
        self.pump();
        self.next
    }

    /// A packet from `conn`.
    pub fn send(&mut self, conn: ConnId, p: Packet) {
        self.broker.handle_packet(conn, p, self.now);
        self.pump();
    }

    /// `conn`'s socket closes.
    pub fn close(&mut self, conn: ConnId) {
        self.broker.handle_closed(conn, self.now);
        self.pump();
    }

    /// Time passes; the broker is woken at every deadline it asks for on the way, and at
    /// the end. A restart on the way (a failed commit) moves to the new process's clock
    /// and the rest of the time passes there.
    pub fn advance(&mut self, by: Duration) {
        let mut left = by;
        for _ in 0..100_000 {
            let Some(at) = self
                .broker
                .poll_timeout()
                .filter(|at| *at <= self.now + left)
            else {
                self.now += left;
                self.broker.handle_timeout(self.now);
                self.pump();
                return;
            };
            let step = at.saturating_duration_since(self.now);
            self.now += step;
            left -= step;
            self.broker.handle_timeout(self.now);
            self.pump();
        }
        panic!("the broker's deadlines do not move on: poll_timeout keeps asking for the past");
    }

    /// `conn` subscribes to `filter` at `qos` (packet id 1).
    pub fn subscribe(&mut self, conn: ConnId, filter: &str, qos: QoS) {
        let s = Subscribe {
            packet_id: NonZeroU16::new(1).unwrap(),
            subscriptions: vec![Subscription {
                filter: TopicFilter::new(filter).unwrap(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        };
        self.send(conn, Packet::Subscribe(s));
    }

    /// `conn` publishes `payload` on `topic` at QoS 1 with packet id `id`.
    pub fn publish(&mut self, conn: ConnId, topic: &str, payload: &str, id: u16) {
        let p = Publish::new(
            TopicName::new(topic).unwrap(),
            QosPid::AtLeastOnce(NonZeroU16::new(id).unwrap()),
            payload.to_string(),
        );
        self.send(conn, Packet::Publish(p));
    }

    /// The PUBLISH packets sent to `conn`, in order.
    pub fn publishes(&self, conn: ConnId) -> Vec<Publish> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send(c, Packet::Publish(p)) if *c == conn => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Payloads of the PUBLISH packets sent to `conn`, in order.
    pub fn received(&self, conn: ConnId) -> Vec<String> {
        self.publishes(conn)
            .iter()
            .map(|p| String::from_utf8(p.payload.to_vec()).unwrap())
            .collect()
    }

    /// Connects `connect`, subscribes it to `filter` and disconnects it: a persistent
    /// session waiting offline.
    pub fn offline_subscriber(&mut self, connect: Connect, filter: &str, qos: QoS) {
        let c = self.connect(connect);
        self.subscribe(c, filter, qos);
        self.close(c);
    }
}

// ---- random operation sequences: the property test and the fuzz target -------------

/// Clients of [`check_steps`]: persistent 5.0 sessions subscribed to `t/#` at QoS 2.
const CLIENTS: [&str; 3] = ["a", "b", "c"];

/// One step of a random run over the simulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Client `i` connects (resuming its session) if it is not connected.
    Connect(usize),
    /// Client `i`'s connection breaks; what was sent to it and not yet answered is lost
    /// (so a PUBREC it never read makes it resend the PUBLISH).
    Close(usize),
    /// Client `from` publishes a new message on `t/x` at `qos` (0, 1 or 2); it sends
    /// PUBREL when it answers the PUBREC ([`Step::AckAll`]), and resends what it has not
    /// finished when it reconnects.
    Publish {
        /// The publishing client.
        from: usize,
        /// Its QoS.
        qos: u8,
    },
    /// Client `i` answers everything it was sent before this step (PUBACK, PUBREC,
    /// PUBCOMP to the broker's deliveries, PUBREL to the PUBREC of its own publishes).
    AckAll(usize),
    /// Client `i` acknowledges nothing and sends nothing for `secs` seconds of simulated
    /// time (its keep alive is 10 s: long silences end its connection).
    Silence(usize, u8),
    /// The broker process is killed and restarted on its store.
    Crash,
    /// The next commit fails (the store refuses it); the host restarts from the last
    /// commit, as the server does.
    FailCommit,
}

/// Reads bytes as steps (two bytes each), for the fuzz target.
pub fn steps_from_bytes(data: &[u8]) -> Vec<Step> {
    data.chunks(2)
        .map(|c| {
            let (op, arg) = (c[0], c.get(1).copied().unwrap_or(0));
            let i = usize::from(arg % 3);
            match op % 16 {
                0..=2 => Step::Connect(i),
                3 => Step::Close(i),
                4..=8 => Step::Publish {
                    from: i,
                    qos: (arg / 3) % 3,
                },
                9..=12 => Step::AckAll(i),
                13 => Step::Silence(i, arg / 3 % 30),
                14 => Step::Crash,
                _ => Step::FailCommit,
            }
        })
        .collect()
}

/// The fuzz target's body: runs `data` as steps and panics if an invariant breaks.
pub fn fuzz_ops(data: &[u8]) {
    if let Err(e) = check_steps(&steps_from_bytes(data)) {
        panic!("{e}");
    }
}

/// Runs `steps`, then lets every client connect and acknowledge until nothing more
/// comes, and checks after every step and at the end:
/// - the store holds exactly the live delivery state of every session (nothing sent
///   with a packet id or acknowledged exists only in memory);
/// - no QoS 2 message reaches a client twice as a new delivery (DUP clear);
/// - every QoS 1/2 message the broker acknowledged (PUBACK/PUBREC 0x00) reaches every
///   client whose subscription existed when it was published.
///
/// `Err` names the invariant and the step. Runs the steps twice: with every queued
/// message in memory, and with a memory window of two messages per session (the rest in
/// the store, read back as the window drains).
pub fn check_steps(steps: &[Step]) -> Result<(), String> {
    check_steps_with(steps, None)?;
    check_steps_with(steps, Some(2)).map_err(|e| format!("with a memory window of 2: {e}"))
}

/// [`check_steps`] with one [`Settings::queue_window`].
pub fn check_steps_with(steps: &[Step], window: Option<usize>) -> Result<(), String> {
    let mut run = Run::new(window);
    for (n, step) in steps.iter().enumerate() {
        run.step(step);
        run.check_store()
            .map_err(|e| format!("step {n} ({step:?}): {e}"))?;
        run.check_once()
            .map_err(|e| format!("step {n} ({step:?}): {e}"))?;
    }
    // Everyone comes back and takes everything: answering until nothing more is owed (a
    // queue of any length drains, Receive Maximum 2 at a time; 16 rounds of answers were
    // not enough for a client that queued 45 messages to itself, which the fuzz target
    // found).
    for _ in 0..4 {
        for i in 0..CLIENTS.len() {
            run.step(&Step::Connect(i));
        }
        for _ in 0..100_000 {
            for i in 0..CLIENTS.len() {
                run.step(&Step::AckAll(i));
            }
            if run.to_answer.iter().all(Vec::is_empty) {
                break;
            }
        }
    }
    run.check_store().map_err(|e| format!("at the end: {e}"))?;
    run.check_once().map_err(|e| format!("at the end: {e}"))?;
    run.check_delivered()
}

/// One run's host and what the clients saw.
struct Run {
    sim: Sim,
    conns: [Option<ConnId>; 3],
    /// Whether each client has subscribed yet.
    subscribed: [bool; 3],
    next_id: [u16; 3],
    /// Messages published so far (payload `m{n}`): QoS, and who was subscribed then.
    published: Vec<(QoS, [bool; 3])>,
    /// Each client's unfinished QoS 1/2 publishes by packet id: the message number,
    /// its QoS, and whether PUBREL was sent (PUBREC seen). A client resends them when it
    /// reconnects: the PUBLISH with DUP, or the PUBREL [MQTT-4.4.0-1].
    outgoing: [std::collections::BTreeMap<u16, (usize, QoS, bool)>; 3],
    /// Messages the broker acknowledged to their publisher.
    acknowledged: std::collections::HashSet<usize>,
    /// New (DUP clear) deliveries per client and message.
    delivered: std::collections::HashMap<(usize, usize), u32>,
    /// Outputs already looked at.
    seen: usize,
    /// The host's restarts when last looked at.
    restarts: u64,
    /// What each client owes the broker (PUBACK, PUBREC, PUBCOMP), in order.
    to_answer: [Vec<Packet>; 3],
    /// Simulated seconds of silence so far (bounded, so sessions never expire).
    silent: u32,
}

impl Run {
    fn new(window: Option<usize>) -> Run {
        let settings = Settings {
            receive_maximum: 3,
            queue_window: window,
            // Nothing acknowledged is dropped for room in a run of any length.
            max_queued_messages: usize::MAX,
            max_queued_bytes: usize::MAX,
            ..Settings::default()
        };
        Run {
            sim: Sim::new(settings),
            conns: [None; 3],
            subscribed: [false; 3],
            next_id: [1; 3],
            published: Vec::new(),
            outgoing: Default::default(),
            acknowledged: std::collections::HashSet::new(),
            delivered: std::collections::HashMap::new(),
            seen: 0,
            restarts: 0,
            to_answer: Default::default(),
            silent: 0,
        }
    }

    fn client_of(&self, conn: ConnId) -> Option<usize> {
        self.conns.iter().position(|c| *c == Some(conn))
    }

    /// Reads what the broker sent since the last look: acknowledgements to publishers,
    /// deliveries, closes.
    fn observe(&mut self) {
        if self.sim.restarts != self.restarts {
            // What the dying process sent last (a round's early sends before its commit
            // failed, say) reached its clients all the same.
            let last = std::mem::take(&mut self.sim.died_with);
            let unseen = last[self.seen.min(last.len())..].to_vec();
            self.take_outputs(unseen);
            // The process died: every connection with it, and what it was owed.
            self.restarts = self.sim.restarts;
            self.conns = [None; 3];
            self.to_answer = Default::default();
            self.seen = 0;
        }
        let outputs: Vec<Output> = self.sim.outputs[self.seen..].to_vec();
        self.seen = self.sim.outputs.len();
        self.take_outputs(outputs);
    }

    /// What the clients make of the broker's outputs.
    fn take_outputs(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send(conn, Packet::PubAck(a)) => {
                    let Some(i) = self.client_of(conn) else {
                        continue;
                    };
                    if let Some((n, _, _)) = self.outgoing[i].remove(&a.packet_id.get())
                        && a.reason == tern_codec::ReasonCode::Success
                    {
                        self.acknowledged.insert(n);
                    }
                }
                Output::Send(conn, Packet::PubRec(a)) => {
                    let Some(i) = self.client_of(conn) else {
                        continue;
                    };
                    let id = a.packet_id.get();
                    if let Some((n, _, released)) = self.outgoing[i].get_mut(&id) {
                        if (a.reason as u8) >= 0x80 {
                            self.outgoing[i].remove(&id);
                            continue;
                        }
                        self.acknowledged.insert(*n);
                        *released = true;
                        self.to_answer[i].push(Packet::PubRel(tern_codec::Ack::new(a.packet_id)));
                    }
                }
                Output::Send(conn, Packet::PubComp(a)) => {
                    if let Some(i) = self.client_of(conn) {
                        self.outgoing[i].remove(&a.packet_id.get());
                    }
                }
                Output::Send(conn, Packet::Publish(p)) => {
                    let (Some(i), Some(n)) = (
                        self.client_of(conn),
                        std::str::from_utf8(&p.payload)
                            .ok()
                            .and_then(|s| s.strip_prefix('m'))
                            .and_then(|s| s.parse::<usize>().ok()),
                    ) else {
                        continue;
                    };
                    if !p.dup {
                        *self.delivered.entry((i, n)).or_default() += 1;
                    }
                    match p.qos_pid {
                        QosPid::AtLeastOnce(id) => {
                            self.to_answer[i].push(Packet::PubAck(tern_codec::Ack::new(id)));
                        }
                        QosPid::ExactlyOnce(id) => {
                            self.to_answer[i].push(Packet::PubRec(tern_codec::Ack::new(id)));
                        }
                        QosPid::AtMostOnce => {}
                    }
                }
                Output::Send(conn, Packet::SubAck(a)) => {
                    if let Some(i) = self.client_of(conn)
                        && a.reasons.iter().all(|r| (*r as u8) < 0x80)
                    {
                        self.subscribed[i] = true;
                    }
                }
                Output::Send(conn, Packet::PubRel(r)) => {
                    if let Some(i) = self.client_of(conn) {
                        self.to_answer[i].push(Packet::PubComp(tern_codec::Ack::new(r.packet_id)));
                    }
                }
                Output::Close(conn) => {
                    if let Some(i) = self.client_of(conn) {
                        self.conns[i] = None;
                        self.to_answer[i].clear();
                    }
                }
                _ => {}
            }
        }
    }

    fn step(&mut self, step: &Step) {
        self.observe();
        match *step {
            Step::Connect(i) => {
                if self.conns[i].is_none() {
                    let mut c = Connect::new(tern_codec::Protocol::V5, CLIENTS[i]);
                    c.clean_start = false;
                    c.keep_alive = 10;
                    c.properties = tern_codec::properties::ConnectProperties {
                        session_expiry_interval: Some(3600),
                        receive_maximum: NonZeroU16::new(2),
                        ..Default::default()
                    }
                    .into();
                    let conn = self.sim.connect(c);
                    self.conns[i] = Some(conn);
                    self.observe();
                    // What it had not finished publishing, again, in order.
                    let unfinished: Vec<(u16, (usize, QoS, bool))> =
                        self.outgoing[i].iter().map(|(k, v)| (*k, *v)).collect();
                    for (id, (n, qos, released)) in unfinished {
                        let Some(conn) = self.conns[i] else { break };
                        let id = NonZeroU16::new(id).unwrap();
                        let packet = if released {
                            Packet::PubRel(tern_codec::Ack::new(id))
                        } else {
                            let qos_pid = match qos {
                                QoS::ExactlyOnce => QosPid::ExactlyOnce(id),
                                _ => QosPid::AtLeastOnce(id),
                            };
                            let topic = TopicName::new("t/x").unwrap();
                            let mut p = Publish::new(topic, qos_pid, format!("m{n}"));
                            p.dup = true;
                            Packet::Publish(p)
                        };
                        self.sim.send(conn, packet);
                        self.observe();
                    }
                    if !self.subscribed[i]
                        && let Some(conn) = self.conns[i]
                    {
                        // Subscribed once its SUBACK is seen (the commit may fail).
                        self.sim.subscribe(conn, "t/#", QoS::ExactlyOnce);
                    }
                }
            }
            Step::Close(i) => {
                if let Some(c) = self.conns[i].take() {
                    // The connection breaks with what the client had not yet answered
                    // still in flight to it: a PUBREC it never read means it will send
                    // the PUBLISH again, with DUP (the broker must not deliver it twice).
                    for p in std::mem::take(&mut self.to_answer[i]) {
                        if let Packet::PubRel(r) = p
                            && let Some(entry) = self.outgoing[i].get_mut(&r.packet_id.get())
                        {
                            entry.2 = false;
                        }
                    }
                    self.sim.close(c);
                }
            }
            Step::Publish { from, qos } => {
                if let Some(c) = self.conns[from] {
                    let n = self.published.len();
                    let id = NonZeroU16::new(self.next_id[from]).unwrap();
                    self.next_id[from] = self.next_id[from] % 60_000 + 1;
                    let (qos, qos_pid) = match qos {
                        0 => (QoS::AtMostOnce, QosPid::AtMostOnce),
                        1 => (QoS::AtLeastOnce, QosPid::AtLeastOnce(id)),
                        _ => (QoS::ExactlyOnce, QosPid::ExactlyOnce(id)),
                    };
                    if self.outgoing[from].contains_key(&id.get())
                        || (qos != QoS::AtMostOnce && self.outgoing[from].len() >= 3)
                    {
                        // The id is still in use, or the broker's Receive Maximum (3) is
                        // reached: this client publishes nothing now.
                        return;
                    }
                    self.published.push((qos, self.subscribed));
                    if qos != QoS::AtMostOnce {
                        self.outgoing[from].insert(id.get(), (n, qos, false));
                    }
                    let topic = TopicName::new("t/x").unwrap();
                    self.sim.send(
                        c,
                        Packet::Publish(Publish::new(topic, qos_pid, format!("m{n}"))),
                    );
                }
            }
            Step::AckAll(i) => {
                // What is owed now; what these answers bring (PUBREL after PUBREC) waits
                // for the next step, so a crash can fall between.
                let answers = std::mem::take(&mut self.to_answer[i]);
                for answer in answers {
                    let Some(c) = self.conns[i] else { break };
                    self.sim.send(c, answer);
                    self.observe();
                }
            }
            Step::Silence(i, secs) => {
                // The others keep talking (a PINGREQ each second); `i` says nothing.
                let secs = u32::from(secs).min(3000u32.saturating_sub(self.silent));
                self.silent += secs;
                for _ in 0..secs {
                    self.sim.advance(Duration::from_secs(1));
                    self.observe();
                    for j in 0..CLIENTS.len() {
                        if j != i
                            && let Some(c) = self.conns[j]
                        {
                            self.sim.send(c, Packet::PingReq);
                        }
                    }
                }
            }
            Step::Crash => self.sim.restart(Duration::from_secs(1)),
            Step::FailCommit => self.sim.fail_next_commit(),
        }
        self.observe();
    }

    fn check_store(&self) -> Result<(), String> {
        let stored = self.sim.stored();
        for name in CLIENTS {
            let live = self.sim.broker.session_state(name);
            let kept = stored.sessions.get(name).map(|s| &s.delivery);
            let same = match (live, kept) {
                (Some(live), Some(kept)) => live.matches_full(kept),
                (live, kept) => live == kept,
            };
            if !same {
                return Err(format!(
                    "the store does not hold session {name}'s live state:\nlive {live:?}\nstored {kept:?}"
                ));
            }
            let live = self.sim.broker.shared_copies(name);
            // What the session holds in memory; the store also has the spilled ones'.
            let state = self.sim.broker.session_state(name);
            let kept = stored.sessions.get(name).map(|s| {
                let mut shared = s.shared.clone();
                if let Some(state) = state {
                    shared.retain(|id, _| state.holds(*id));
                }
                shared
            });
            if live != kept {
                return Err(format!(
                    "the store does not hold session {name}'s shared-subscription side map:\nlive {live:?}\nstored {kept:?}"
                ));
            }
        }
        Ok(())
    }

    fn check_once(&self) -> Result<(), String> {
        for (&(i, n), &times) in &self.delivered {
            if self.published[n].0 == QoS::ExactlyOnce && times > 1 {
                return Err(format!(
                    "QoS 2 message m{n} reached {} {times} times as new",
                    CLIENTS[i]
                ));
            }
        }
        Ok(())
    }

    fn check_delivered(&self) -> Result<(), String> {
        for &n in &self.acknowledged {
            let (_, subscribers) = self.published[n];
            for (i, subscribed) in subscribers.iter().enumerate() {
                if *subscribed && !self.delivered.contains_key(&(i, n)) {
                    return Err(format!(
                        "acknowledged message m{n} never reached subscriber {}",
                        CLIENTS[i]
                    ));
                }
            }
        }
        Ok(())
    }
}
