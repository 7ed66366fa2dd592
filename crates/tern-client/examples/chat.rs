//! Chat at QoS 1 with deduplication: every message reaches the room at least once, and
//! the receiver drops repeats by the `msg-id` user property the sender stamps on each.
//!
//! ```text
//! tern broker &
//! cargo run -p tern-client --example chat [HOST] [PORT]
//! ```

use std::time::Duration;

use tern_client::{Client, Dedup, Event, Options, PublishProperties, QoS};

/// Alice sends `lines` to the room, one of them twice (an application retry after a
/// timeout, say, with the same `msg-id`); returns what Bob shows, each message once.
pub async fn run(host: &str, port: u16, lines: &[&str]) -> Result<Vec<String>, tern_client::Error> {
    let (bob, mut events) = Client::connect(Options::new(host, port, "bob")).await?;
    bob.subscribe("chat/room-1", QoS::AtLeastOnce).await?;
    // The SDK stamps every message Alice sends with a unique `msg-id`.
    let (alice, _) = Client::connect(Options::new(host, port, "alice").stamp("msg-id")).await?;
    for line in lines {
        // Resolves on the broker's PUBACK; resent after a reconnect until then.
        alice
            .publish("chat/room-1", line.to_string())
            .qos(QoS::AtLeastOnce)
            .await?;
    }
    // A retry of the first line with the key it went out with the first time.
    let mut retry = PublishProperties::default();
    retry
        .user_properties
        .push(("msg-id".into(), "alice-retry-1".into()));
    for _ in 0..2 {
        alice
            .publish("chat/room-1", "are you there?")
            .qos(QoS::AtLeastOnce)
            .properties(retry.clone())
            .await?;
    }
    let mut dedup = Dedup::new(10_000);
    let mut shown = Vec::new();
    let mut received = 0;
    while received < lines.len() + 2 {
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await
        else {
            break;
        };
        if let Event::Message(m) = event {
            received += 1;
            if dedup.is_new(&m) {
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                println!("bob sees: {text}");
                shown.push(text);
            }
        }
    }
    alice.disconnect().await;
    bob.disconnect().await;
    Ok(shown)
}

#[allow(dead_code)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tern_client::Error> {
    let args: Vec<String> = std::env::args().collect();
    let host = args.get(1).map_or("127.0.0.1", String::as_str);
    let port = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(1883);
    run(host, port, &["hi bob", "lunch at noon?"]).await?;
    Ok(())
}
