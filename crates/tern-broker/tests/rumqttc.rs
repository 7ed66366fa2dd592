//! Claims about the broker, checked over real TCP with rumqttc (crates.io), the common
//! Rust client, in MQTT 3.1.1 and 5.0.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The same polling helpers for rumqttc's 3.1.1 and 5.0 modules, whose types differ only
/// by module: `AsyncClient`, `EventLoop`, `Event`, `Packet`, `Publish` and `QoS` must be in
/// scope where it is used.
macro_rules! eventloop_helpers {
    () => {
        /// Polls until `f` picks something out of an event; fails on a connection error or
        /// after the timeout.
        async fn until<T>(el: &mut EventLoop, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
            tokio::time::timeout(TIMEOUT, async {
                loop {
                    if let Event::Incoming(p) = el.poll().await.unwrap()
                        && let Some(t) = f(&p)
                    {
                        return t;
                    }
                }
            })
            .await
            .expect("timed out waiting for the broker")
        }

        async fn connected(el: &mut EventLoop) -> bool {
            until(el, |p| match p {
                Packet::ConnAck(a) => Some(a.session_present),
                _ => None,
            })
            .await
        }

        async fn subscribed(client: &AsyncClient, el: &mut EventLoop, filter: &str, qos: QoS) {
            client.subscribe(filter, qos).await.unwrap();
            until(el, |p| matches!(p, Packet::SubAck(_)).then_some(())).await;
        }

        async fn next_publish(el: &mut EventLoop) -> Publish {
            until(el, |p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await
        }
    };
}

/// MQTT 3.1.1 (rumqttc's top-level module).
mod v4 {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};

    fn options(id: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    eventloop_helpers!();

    /// Publishes and drives the publisher until its flow completes.
    async fn publish(port: u16, topic: &str, qos: QoS, retain: bool, payload: &str) {
        let (client, mut el) = AsyncClient::new(options("rumqttc-pub", port), 10);
        connected(&mut el).await;
        client
            .publish(topic, qos, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
        match qos {
            QoS::AtMostOnce => {
                // No ack at QoS 0: the DISCONNECT queued behind it goes out on the same
                // socket, so by the time the broker closes us it has read the PUBLISH.
                client.disconnect().await.unwrap();
                tokio::time::timeout(TIMEOUT, async { while el.poll().await.is_ok() {} })
                    .await
                    .unwrap();
            }
            QoS::AtLeastOnce => {
                until(&mut el, |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
            }
            QoS::ExactlyOnce => {
                until(&mut el, |p| matches!(p, Packet::PubComp(_)).then_some(())).await;
            }
        }
    }

    #[tokio::test]
    async fn rumqttc_3_1_1_messages_at_qos_0_1_2_reach_a_qos_2_subscriber_at_their_own_qos() {
        let broker = common::Broker::start();
        let (sub, mut el) = AsyncClient::new(options("rumqttc-sub", broker.port), 10);
        connected(&mut el).await;
        subscribed(&sub, &mut el, "r/#", QoS::ExactlyOnce).await;
        for (qos, topic) in [
            (QoS::AtMostOnce, "r/0"),
            (QoS::AtLeastOnce, "r/1"),
            (QoS::ExactlyOnce, "r/2"),
        ] {
            let port = broker.port;
            let publisher =
                tokio::spawn(async move { publish(port, topic, qos, false, topic).await });
            let got = next_publish(&mut el).await;
            assert_eq!((got.topic.as_str(), got.qos), (topic, qos));
            assert_eq!(&got.payload[..], topic.as_bytes());
            assert!(!got.retain);
            publisher.await.unwrap();
        }
    }

    #[tokio::test]
    async fn rumqttc_3_1_1_persistent_session_receives_what_was_queued_while_offline() {
        let broker = common::Broker::start();
        let mut o = options("rumqttc-persistent", broker.port);
        o.set_clean_session(false);
        let (sub, mut el) = AsyncClient::new(o.clone(), 10);
        assert!(!connected(&mut el).await, "no session the first time");
        subscribed(&sub, &mut el, "q/+", QoS::AtLeastOnce).await;
        sub.disconnect().await.unwrap();
        tokio::time::timeout(TIMEOUT, async { while el.poll().await.is_ok() {} })
            .await
            .unwrap();

        publish(broker.port, "q/1", QoS::AtLeastOnce, false, "while away").await;

        let (_sub, mut el) = AsyncClient::new(o, 10);
        assert!(connected(&mut el).await, "session present");
        let got = next_publish(&mut el).await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("q/1", &b"while away"[..])
        );
    }

    #[tokio::test]
    async fn rumqttc_3_1_1_unacknowledged_qos_1_is_resent_with_dup_and_the_same_id() {
        let broker = common::Broker::start();
        let mut o = options("rumqttc-noack", broker.port);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        let (sub, mut el) = AsyncClient::new(o.clone(), 10);
        connected(&mut el).await;
        subscribed(&sub, &mut el, "a", QoS::AtLeastOnce).await;
        publish(broker.port, "a", QoS::AtLeastOnce, false, "once").await;
        let first = next_publish(&mut el).await;
        assert!(!first.dup);
        drop((sub, el)); // socket closed, no PUBACK sent

        let (_sub, mut el) = AsyncClient::new(o, 10);
        assert!(connected(&mut el).await);
        let again = next_publish(&mut el).await;
        assert!(again.dup, "resent with DUP");
        assert_eq!(again.pkid, first.pkid, "with the same packet id");
        assert_eq!(again.payload, first.payload);
    }

    #[tokio::test]
    async fn rumqttc_3_1_1_will_is_published_when_the_connection_drops_without_disconnect() {
        let broker = common::Broker::start();
        let (watch, mut wel) = AsyncClient::new(options("rumqttc-watch", broker.port), 10);
        connected(&mut wel).await;
        subscribed(&watch, &mut wel, "wills/#", QoS::AtLeastOnce).await;

        let mut o = options("rumqttc-mortal", broker.port);
        o.set_last_will(LastWill::new(
            "wills/mortal",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        let (mortal, mut el) = AsyncClient::new(o, 10);
        connected(&mut el).await;
        drop((mortal, el));

        let got = next_publish(&mut wel).await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("wills/mortal", &b"gone"[..])
        );
    }
}

/// MQTT 5.0 (rumqttc::v5).
mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    fn options(id: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    eventloop_helpers!();

    async fn publish_qos2(port: u16, topic: &str, retain: bool, payload: &str) {
        let (client, mut el) = AsyncClient::new(options("rumqttc5-pub", port), 10);
        connected(&mut el).await;
        client
            .publish(topic, QoS::ExactlyOnce, retain, payload.as_bytes().to_vec())
            .await
            .unwrap();
        until(&mut el, |p| matches!(p, Packet::PubComp(_)).then_some(())).await;
    }

    #[tokio::test]
    async fn rumqttc_5_session_with_expiry_gets_queued_messages_with_session_present() {
        let broker = common::Broker::start();
        let mut o = options("rumqttc5-persistent", broker.port);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
        let (sub, mut el) = AsyncClient::new(o.clone(), 10);
        assert!(!connected(&mut el).await);
        subscribed(&sub, &mut el, "q/#", QoS::ExactlyOnce).await;
        sub.disconnect().await.unwrap();
        tokio::time::timeout(TIMEOUT, async { while el.poll().await.is_ok() {} })
            .await
            .unwrap();

        publish_qos2(broker.port, "q/x", false, "exactly once").await;

        let (_sub, mut el) = AsyncClient::new(o, 10);
        assert!(connected(&mut el).await, "session present");
        let got = next_publish(&mut el).await;
        assert_eq!(got.qos, QoS::ExactlyOnce);
        assert_eq!(
            (&got.topic[..], &got.payload[..]),
            (&b"q/x"[..], &b"exactly once"[..])
        );
    }

    #[tokio::test]
    async fn rumqttc_5_retained_message_arrives_on_subscribe_with_retain_set() {
        let broker = common::Broker::start();
        publish_qos2(broker.port, "state/door", true, "open").await;
        let (sub, mut el) = AsyncClient::new(options("rumqttc5-late", broker.port), 10);
        connected(&mut el).await;
        sub.subscribe("state/+", QoS::AtLeastOnce).await.unwrap();
        let got = next_publish(&mut el).await;
        assert!(got.retain);
        assert_eq!(got.qos, QoS::AtLeastOnce, "downgraded to the granted QoS");
        assert_eq!(&got.payload[..], b"open");
    }
}
