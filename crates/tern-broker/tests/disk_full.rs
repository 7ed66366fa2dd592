//! A store that runs out of space: publishers get no acknowledgement (their connection
//! closes, so they resend), nothing acknowledged before is lost, and the broker carries
//! on once space returns, without a restart. The space is simulated by the store (a
//! commit fails as redb fails on ENOSPC); a real tiny filesystem needs a mount this
//! machine's tests cannot make.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::Raw;
use tern_codec::properties::ConnectProperties;
use tern_codec::{Connect, Disconnect, Packet, Protocol, Publish, QoS, QosPid, ReasonCode};
use tern_store::{MemoryStore, Op, Snapshot, Store, StoreError};

/// A store whose disk can be made full.
struct Flaky {
    inner: MemoryStore,
    full: Arc<AtomicBool>,
}

impl Store for Flaky {
    fn commit(&mut self, batch: &[Op]) -> Result<tern_store::Committed, StoreError> {
        if self.full.load(Ordering::Acquire) {
            return Err(StoreError::Backend(
                "No space left on device (os error 28)".into(),
            ));
        }
        self.inner.commit(batch)
    }
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn read_queue(
        &self,
        client_id: &str,
        after: tern_store::MessageId,
        max: usize,
    ) -> Result<Vec<(tern_store::Entry, Option<tern_codec::Str>)>, StoreError> {
        self.inner.read_queue(client_id, after, max)
    }
    fn read_history(
        &self,
        read: &tern_store::HistoryRead,
    ) -> Result<Vec<tern_store::HistoryMessage>, StoreError> {
        self.inner.read_history(read)
    }
}

fn persistent(id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V5, id);
    c.clean_start = false;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        ..Default::default()
    }
    .into();
    c
}

fn publish(raw: &mut Raw, id: u16, payload: &str) {
    raw.send(Packet::Publish(Publish::new(
        tern_codec::TopicName::new("t").unwrap(),
        QosPid::AtLeastOnce(std::num::NonZeroU16::new(id).unwrap()),
        payload.to_string(),
    )));
}

#[test]
fn a_full_disk_withholds_acknowledgements_loses_nothing_acknowledged_and_recovers() {
    let full = Arc::new(AtomicBool::new(false));
    let broker = common::Broker::with_store(
        tern_broker::core::Settings::default(),
        Box::new(Flaky {
            inner: MemoryStore::new(),
            full: full.clone(),
        }),
    );
    let (mut sub, _) = Raw::connect(broker.port, persistent("sub"));
    sub.subscribe("t", QoS::AtLeastOnce);
    sub.send(Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert_eq!(sub.recv(), None);

    let (mut p, _) = Raw::connect(broker.port, Connect::new(Protocol::V3_1_1, "p"));
    publish(&mut p, 1, "before");
    assert!(matches!(p.recv(), Some(Packet::PubAck(_))));

    full.store(true, Ordering::Release);
    publish(&mut p, 2, "during");
    assert_eq!(
        p.recv(),
        None,
        "no PUBACK for what could not be written: the connection closes"
    );

    full.store(false, Ordering::Release);
    let (mut p, _) = Raw::connect(broker.port, Connect::new(Protocol::V3_1_1, "p"));
    publish(&mut p, 3, "after");
    assert!(
        matches!(p.recv(), Some(Packet::PubAck(_))),
        "space is back: acknowledged again"
    );

    let (mut sub, ack) = Raw::connect(broker.port, persistent("sub"));
    assert!(ack.session_present);
    let mut got = vec![];
    for _ in 0..2 {
        match sub.recv() {
            Some(Packet::Publish(m)) => {
                got.push(String::from_utf8(m.payload.to_vec()).unwrap());
                if let Some(id) = m.packet_id() {
                    sub.send(Packet::PubAck(tern_codec::Ack::new(id)));
                }
            }
            other => panic!("want PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(
        got,
        ["before", "after"],
        "the acknowledged messages, and not the one that was never acknowledged"
    );
}
