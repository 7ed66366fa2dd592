//! Telemetry at QoS 0: a sensor publishes readings, a dashboard prints them. Nothing is
//! acknowledged or stored; a reading lost on the way is replaced by the next one.
//!
//! ```text
//! tern broker &
//! cargo run -p tern-client --example telemetry [HOST] [PORT]
//! ```

use std::time::Duration;

use tern_client::{Client, Event, Options, QoS};

/// Publishes `count` readings and returns how many the dashboard saw.
pub async fn run(host: &str, port: u16, count: usize) -> Result<usize, tern_client::Error> {
    let (dashboard, mut events) = Client::connect(Options::new(host, port, "dashboard")).await?;
    dashboard
        .subscribe("telemetry/+/temperature", QoS::AtMostOnce)
        .await?;
    let (sensor, _) = Client::connect(Options::new(host, port, "sensor-7")).await?;
    for i in 0..count {
        let celsius = 20.0 + (i % 10) as f64 / 10.0;
        // QoS 0 (the default): resolves once written to the socket.
        sensor
            .publish("telemetry/sensor-7/temperature", format!("{celsius:.1}"))
            .await?;
    }
    let mut seen = 0;
    while seen < count {
        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
            Ok(Some(Event::Message(m))) => {
                seen += 1;
                println!(
                    "{} = {}",
                    m.topic.as_str(),
                    String::from_utf8_lossy(&m.payload)
                );
            }
            Ok(Some(_)) => {}
            // QoS 0 promises nothing: stop waiting when the readings stop.
            Ok(None) | Err(_) => break,
        }
    }
    sensor.disconnect().await;
    dashboard.disconnect().await;
    Ok(seen)
}

#[allow(dead_code)]
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tern_client::Error> {
    let args: Vec<String> = std::env::args().collect();
    let host = args.get(1).map_or("127.0.0.1", String::as_str);
    let port = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(1883);
    let seen = run(host, port, 20).await?;
    println!("the dashboard saw {seen} of 20 readings");
    Ok(())
}
