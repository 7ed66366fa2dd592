//! Payments at QoS 2: exactly once, across reconnects and restarts. The till keeps what
//! the broker has not acknowledged in an outbox file and a persistent session, so a
//! payment sent just before a crash is neither lost nor doubled; the ledger's persistent
//! session receives each payment once.
//!
//! ```text
//! tern broker &
//! cargo run -p tern-client --example payments [HOST] [PORT]
//! ```

use std::time::Duration;

use tern_client::{Client, Event, Options, QoS};

/// The till pays `amounts` (cents); returns the ledger's total.
pub async fn run(
    host: &str,
    port: u16,
    amounts: &[u64],
    outbox: &std::path::Path,
) -> Result<u64, tern_client::Error> {
    let day = Duration::from_secs(86_400);
    let (ledger, mut events) =
        Client::connect(Options::new(host, port, "ledger").persistent(day)).await?;
    ledger.subscribe("payments/#", QoS::ExactlyOnce).await?;
    let (till, _) = Client::connect(
        Options::new(host, port, "till-3")
            .persistent(day)
            .outbox(outbox),
    )
    .await?;
    // Sent in order, all under way at once; each resolves on PUBCOMP.
    let mut outcomes = Vec::new();
    for (i, cents) in amounts.iter().enumerate() {
        let payment = till
            .publish(format!("payments/till-3/{i}"), cents.to_string())
            .qos(QoS::ExactlyOnce)
            .send()?;
        outcomes.push(payment);
    }
    for o in outcomes {
        o.await?;
    }
    till.wait_idle().await?; // the outbox is empty now
    let mut total = 0;
    let mut received = 0;
    while received < amounts.len() {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Message(m))) => {
                received += 1;
                let cents: u64 = String::from_utf8_lossy(&m.payload).parse().unwrap_or(0);
                total += cents;
                println!("ledger: {} {cents}", m.topic.as_str());
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    till.disconnect().await;
    ledger.disconnect().await;
    Ok(total)
}

#[allow(dead_code)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tern_client::Error> {
    let args: Vec<String> = std::env::args().collect();
    let host = args.get(1).map_or("127.0.0.1", String::as_str);
    let port = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(1883);
    let outbox = std::env::temp_dir().join("tern-example-till-3.outbox");
    let total = run(host, port, &[1250, 399, 10_000], &outbox).await?;
    println!("ledger total: {total} cents");
    Ok(())
}
