//! Brokers for the client's tests: Tern in process, Debian's Mosquitto as a child.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tern_client::{Event, Events};
use tokio::net::{TcpListener, TcpStream};

/// A loopback port nobody listens on (yet).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A broker for one test: Tern in this process, or Mosquitto as a child (killed on drop).
pub enum Broker {
    Tern(u16, Option<tokio::sync::oneshot::Sender<()>>),
    Mosquitto(u16, std::process::Child, std::path::PathBuf),
}

impl Broker {
    pub async fn tern() -> Broker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tern_broker::server::serve(
            listener,
            Default::default(),
            None,
            tern_broker::auth::Access::open(),
            async {
                let _ = stopped.await;
            },
        ));
        Broker::Tern(port, Some(stop))
    }

    pub async fn mosquitto() -> Broker {
        Broker::mosquitto_with("").await
    }

    /// Mosquitto with a plain listener on the returned port, then `extra` config lines.
    /// Mosquitto listening on a free port, with `extra` configuration. A port found free can
    /// be taken by another test before Mosquitto binds it (Mosquitto then exits): it is
    /// started again on another.
    pub async fn mosquitto_with(extra: &str) -> Broker {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = free_port();
            let config = std::env::temp_dir().join(format!("tern-client-mosq-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "allow_anonymous true\npersistence false\nlistener {port} 127.0.0.1\n{extra}"
                ),
            )
            .unwrap();
            let mut child = std::process::Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mosquitto (scripts/test installs Debian's mosquitto)");
            for _ in 0..250 {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return Broker::Mosquitto(port, child, config);
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&config);
            assert!(
                attempts < 5,
                "Mosquitto did not start listening in {attempts} attempts"
            );
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Broker::Tern(p, _) | Broker::Mosquitto(p, _, _) => *p,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Broker::Tern(..) => "tern",
            Broker::Mosquitto(..) => "mosquitto",
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        match self {
            Broker::Tern(_, stop) => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
            }
            Broker::Mosquitto(_, child, config) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(config);
            }
        }
    }
}

pub async fn next_message(events: &mut Events) -> tern_client::Message {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("a message within 10 s")
            .expect("the client is running");
        if let Event::Message(m) = e {
            return m;
        }
    }
}
