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

use crate::{Broker, ConnId, Output, Round, Settings};

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
    /// Every output released so far (committed before release), in order.
    pub outputs: Vec<Output>,
    /// The last connection id handed out.
    next: ConnId,
    store: MemoryStore,
    /// The next commit fails (the store refuses it).
    fail_next: bool,
    /// Commits the store refused.
    pub failed_commits: u64,
}

impl Sim {
    /// A broker on an empty store; the wall clock starts at a fixed moment.
    pub fn new(settings: Settings) -> Sim {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let store = MemoryStore::new();
        let broker = Broker::resume(settings.clone(), store.load().unwrap(), now, wall);
        Sim {
            broker,
            settings,
            now,
            anchor: (now, wall),
            outputs: vec![],
            next: 0,
            store,
            fail_next: false,
            failed_commits: 0,
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
            self.store.load().unwrap(),
            self.now,
            wall,
        );
        self.broker.set_counters(counters);
        self.anchor = (self.now, wall);
        self.outputs.clear();
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

    /// Commits what the last input changed, then releases what it produced.
    pub fn pump(&mut self) {
        let sends = match self.broker.poll_round(|_| 0) {
            Round::Ready(sends) => sends,
            Round::Durable(ops, sealed) => {
                if std::mem::take(&mut self.fail_next) {
                    let error = StoreError::Backend("injected failure".into());
                    let _closed = sealed.failed(&error);
                    self.failed_commits += 1;
                    self.restart(Duration::ZERO);
                    return;
                }
                let receipt = self.store.commit(&ops).unwrap();
                sealed.open(&receipt)
            }
        };
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
    /// the end.
    pub fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        while let Some(at) = self.broker.poll_timeout()
            && at <= end
        {
            self.now = self.now.max(at);
            self.broker.handle_timeout(self.now);
            self.pump();
        }
        self.now = end;
        self.broker.handle_timeout(self.now);
        self.pump();
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
