//! The examples, run against Tern in this process: each does what its comment says.

#![allow(clippy::unwrap_used, unreachable_pub)]

mod common;

#[path = "../examples/chat.rs"]
mod chat;
#[path = "../examples/payments.rs"]
mod payments;
#[path = "../examples/telemetry.rs"]
mod telemetry;

use common::{Broker, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_telemetry_example_delivers_readings_at_qos_0() {
    let broker = Broker::tern().await;
    // Loopback and an idle broker: QoS 0 loses nothing here, though it may elsewhere.
    assert_eq!(
        telemetry::run("127.0.0.1", broker.port(), 50)
            .await
            .unwrap(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_example_shows_a_retried_message_once() {
    let broker = Broker::tern().await;
    let shown = chat::run("127.0.0.1", broker.port(), &["hi bob", "lunch?"])
        .await
        .unwrap();
    assert_eq!(shown, ["hi bob", "lunch?", "are you there?"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payments_example_books_every_payment_once() {
    let broker = Broker::tern().await;
    let outbox = std::env::temp_dir().join(format!("tern-example-{}.outbox", free_port()));
    let total = payments::run("127.0.0.1", broker.port(), &[1250, 399, 10_000], &outbox)
        .await
        .unwrap();
    assert_eq!(total, 11_649);
    let _ = std::fs::remove_file(&outbox);
    let _ = std::fs::remove_file(outbox.with_extension("wal"));
}
