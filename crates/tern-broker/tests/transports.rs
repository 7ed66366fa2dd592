//! TLS (with and without client certificates), WebSocket and WebSocket over TLS, checked
//! with clients nobody here wrote: paho-mqtt (PyPI) over TLS and WebSocket, MQTT.js (npm)
//! over WebSocket and TCP. Certificates are made for each run with rcgen.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Broker, Spec, repo_root};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tern_broker::acl::Acl;
use tern_broker::auth::Access;
use tern_broker::server::{AccessControl, Tls, TlsFiles, Transport};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate (CN alice)
/// it signed, and a client certificate (CN mallory) from another CA, as PEM files.
fn certificates(dir: &Path) {
    let new_ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert, Issuer::new(p, key))
    };
    let leaf = |names: Vec<String>, cn: &str, issuer: &Issuer<'_, KeyPair>, file: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, issuer).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    };
    let (ca_cert, ca) = new_ca("Tern test CA");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        &ca,
        "server",
    );
    leaf(vec![], "alice", &ca, "alice");
    let (_, rogue_ca) = new_ca("Someone else's CA");
    leaf(vec![], "mallory", &rogue_ca, "rogue");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Listeners: 0 tcp, 1 tls, 2 tls requiring a client certificate (CN as username), 3 ws,
/// 4 wss. Anonymous clients may use t/#, alice alice/#.
fn broker(dir: &Path) -> Broker {
    certificates(dir);
    let (cert, key, ca) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    let files = |client_ca: Option<&Path>| {
        Tls::load(&TlsFiles {
            cert: &cert,
            key: &key,
            client_ca,
            require_client_cert: true,
        })
        .unwrap()
    };
    let tls = files(None);
    let mtls = files(Some(&ca));
    let mut client_certs = Spec::new(Transport::Tls(mtls));
    client_certs.cert_username = true;
    let acl = Acl::parse("topic readwrite t/#\nuser alice\ntopic readwrite alice/#\n").unwrap();
    Broker::run(
        Default::default(),
        Box::new(tern_store::MemoryStore::new()),
        AccessControl::new(Access {
            passwords: None,
            allow_anonymous: true,
            acl: Some(Arc::new(acl)),
        }),
        None,
        vec![
            Spec::tcp(),
            Spec::new(Transport::Tls(tls.clone())),
            client_certs,
            Spec::new(Transport::Ws {
                path: "/mqtt".into(),
            }),
            Spec::new(Transport::Wss {
                tls,
                path: "/mqtt".into(),
            }),
        ],
    )
}

fn paho(claim: &str, port: u16, dir: &Path, level: &str) {
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/interop/paho_transports.py"))
        .args([claim, &port.to_string(), dir.to_str().unwrap(), level])
        .output()
        .expect("python3 with paho-mqtt (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{claim} (v{level}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn paho_over_tls_ws_and_wss_round_trips_every_qos() {
    let dir = temp_dir("transports");
    let b = broker(&dir);
    for level in ["4", "5"] {
        paho("tls", b.ports[1], &dir, level);
        paho("ws", b.ports[3], &dir, level);
        paho("wss", b.ports[4], &dir, level);
    }
}

#[test]
fn client_certificates_are_required_checked_and_their_cn_is_the_username() {
    let dir = temp_dir("mtls");
    let b = broker(&dir);
    paho("mtls_accepted_with_cn_as_username", b.ports[2], &dir, "5");
    paho("mtls_without_certificate_is_refused", b.ports[2], &dir, "5");
    paho(
        "mtls_with_a_certificate_from_another_ca_is_refused",
        b.ports[2],
        &dir,
        "5",
    );
}

fn mqttjs(url: &str, version: &str, claim: &str) {
    let dir = repo_root().join("tests/interop/mqttjs");
    assert!(
        dir.join("node_modules/mqtt").exists(),
        "MQTT.js is not installed: run `npm install` in {} (scripts/test does)",
        dir.display()
    );
    let out = std::process::Command::new("node")
        .current_dir(&dir)
        .args(["claims.js", url, version, claim])
        .output()
        .expect("node (Node 20)");
    assert!(
        out.status.success(),
        "{claim} ({url}, v{version}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mqtt_js_over_websocket_and_tcp() {
    let dir = temp_dir("mqttjs");
    let b = broker(&dir);
    for url in [
        format!("mqtt://127.0.0.1:{}", b.ports[0]),
        format!("ws://127.0.0.1:{}/mqtt", b.ports[3]),
    ] {
        for version in ["4", "5"] {
            mqttjs(&url, version, "each_qos_round_trips");
            mqttjs(&url, version, "offline_messages_wait_in_the_session");
        }
    }
}

#[test]
fn a_websocket_upgrade_on_another_path_is_refused() {
    use std::io::{Read, Write};
    let dir = temp_dir("wspath");
    let b = broker(&dir);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", b.ports[3])).unwrap();
    s.write_all(
        b"GET /other HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
}

#[test]
fn the_common_name_is_read_from_a_certificate() {
    let mut p = CertificateParams::new(vec!["x.example".to_string()]).unwrap();
    p.distinguished_name.push(DnType::OrganizationName, "Tern");
    p.distinguished_name.push(DnType::CommonName, "device-42");
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    assert_eq!(
        tern_broker::server::common_name(cert.der()).as_deref(),
        Some("device-42")
    );
    let anonymous = CertificateParams::new(vec!["x.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    // rcgen puts a default CN in; a subject without one has none.
    let _ = tern_broker::server::common_name(anonymous.der());
    assert_eq!(
        tern_broker::server::common_name(b"\x30\x03\x02\x01\x00"),
        None
    );
}
