//! The client over TLS, WebSocket and WebSocket over TLS, against Tern (in process) and
//! Debian's Mosquitto (a child process), both with certificates made here.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Broker, free_port, next_message};
use tern_client::{Client, Error, Options, QoS, ReasonCode, TlsConfig};
use tokio::net::TcpListener;

/// A CA, and a certificate for localhost it signed: (ca.pem, server.pem, server.key).
fn certificates(dir: &Path) -> [PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Tern client test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = ["ca.pem", "server.pem", "server.key"].map(|f| dir.join(f));
    std::fs::write(&paths[0], ca_cert.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    paths
}

/// Publishes to itself at QoS 1 and QoS 2 over `options`' transport.
async fn round_trip(options: Options, what: &str) {
    let (client, mut events) = Client::connect(options).await.unwrap();
    assert_eq!(
        client.subscribe("over/#", QoS::ExactlyOnce).await.unwrap(),
        ReasonCode::GrantedQos2,
        "{what}"
    );
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let payload = format!("{what} {qos:?}");
        let reason = client
            .publish("over/there", payload.clone())
            .qos(qos)
            .await
            .unwrap();
        assert_eq!(reason, ReasonCode::Success, "{what}");
        let m = next_message(&mut events).await;
        assert_eq!(&m.payload[..], payload.as_bytes(), "{what}");
    }
    client.disconnect().await;
}

struct Ports {
    tls: u16,
    ws: u16,
    wss: u16,
}

async fn tern(certs: &[PathBuf; 3]) -> (Ports, tokio::sync::oneshot::Sender<()>) {
    use tern_broker::server::{Listener, Server, Tls, TlsFiles, Transport};
    let tls = Tls::load(&TlsFiles {
        cert: &certs[1],
        key: &certs[2],
        client_ca: None,
        require_client_cert: false,
        crl: None,
    })
    .unwrap();
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for transport in [
        Transport::Tls(tls.clone()),
        Transport::Ws {
            path: "/mqtt".into(),
        },
        Transport::Wss {
            tls,
            path: "/mqtt".into(),
        },
    ] {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(socket.local_addr().unwrap().port());
        let mut l = Listener::tcp(socket);
        l.transport = transport;
        listeners.push(l);
    }
    let server = Server {
        listeners,
        settings: Default::default(),
        persistence: None,
        access: tern_broker::server::AccessControl::new(tern_broker::auth::Access::open()),
        max_connections: None,
        monitor: tern_broker::server::Monitor::new(),
        sys_interval: None,
        cluster: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tern_broker::server::run(server, async {
        let _ = stopped.await;
    }));
    (
        Ports {
            tls: ports[0],
            ws: ports[1],
            wss: ports[2],
        },
        stop,
    )
}

async fn every_transport(ports: &Ports, ca: &Path, name: &str) {
    let tls = TlsConfig::from_files(Some(ca), None, None).unwrap();
    round_trip(
        Options::new("localhost", ports.tls, format!("{name}-tls")).tls(tls.clone()),
        &format!("{name} tls"),
    )
    .await;
    round_trip(
        Options::from_url(
            &format!("ws://127.0.0.1:{}/mqtt", ports.ws),
            format!("{name}-ws"),
        )
        .unwrap(),
        &format!("{name} ws"),
    )
    .await;
    round_trip(
        Options::from_url(
            &format!("wss://localhost:{}", ports.wss),
            format!("{name}-wss"),
        )
        .unwrap()
        .tls(tls),
        &format!("{name} wss"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_websocket_and_secure_websocket_against_tern() {
    let dir = std::env::temp_dir().join(format!("tern-client-tls-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = certificates(&dir);
    let (ports, _stop) = tern(&certs).await;
    every_transport(&ports, &certs[0], "tern").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_websocket_and_secure_websocket_against_mosquitto() {
    let dir = std::env::temp_dir().join(format!("tern-client-tls-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let certs = certificates(&dir);
    let (cert, key) = (certs[1].display(), certs[2].display());
    // A port found free can be taken by another test before Mosquitto binds it, and then
    // Mosquitto exits ("Unable to create websockets listener"): start again on fresh ports.
    let mut started = None;
    for _attempt in 0..5 {
        let ports = Ports {
            tls: free_port(),
            ws: free_port(),
            wss: free_port(),
        };
        if ports.tls == ports.ws || ports.ws == ports.wss || ports.tls == ports.wss {
            continue;
        }
        let mut broker = Broker::mosquitto_with(&format!(
            "listener {} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n\
             listener {} 127.0.0.1\nprotocol websockets\n\
             listener {} 127.0.0.1\nprotocol websockets\ncertfile {cert}\nkeyfile {key}\n",
            ports.tls, ports.ws, ports.wss
        ))
        .await;
        // The helper waits for Mosquitto's first listener only; the others come up after
        // it, or Mosquitto gives up on one and exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut up = true;
        for port in [ports.tls, ports.ws, ports.wss] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                let exited = match &mut broker {
                    Broker::Mosquitto(_, child, _) => child.try_wait().unwrap().is_some(),
                    Broker::Tern(..) => false,
                };
                if exited || std::time::Instant::now() >= deadline {
                    up = false;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        if up {
            started = Some((ports, broker));
            break;
        }
    }
    let (ports, _broker) = started.expect("Mosquitto listening on TLS, WS and WSS ports");
    every_transport(&ports, &certs[0], "mosquitto").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("tern-client-tls-{}", free_port()));
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let certs = certificates(&dir);
    let stranger = certificates(&other);
    let (ports, _stop) = tern(&certs).await;
    let tls = TlsConfig::from_files(Some(&stranger[0]), None, None).unwrap();
    let err = Client::connect(Options::new("localhost", ports.tls, "wary").tls(tls))
        .await
        .err()
        .expect("the connection is refused");
    assert!(
        matches!(&err, Error::Connect { .. }) && err.to_string().contains("certificate"),
        "{err}"
    );
    let missing = TlsConfig::from_files(Some(&dir.join("nope.pem")), None, None)
        .expect_err("a missing CA file is an error");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}
