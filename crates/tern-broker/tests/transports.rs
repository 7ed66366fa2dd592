//! TLS (with and without client certificates), WebSocket and WebSocket over TLS, checked
//! with clients nobody here wrote: paho-mqtt (PyPI) over TLS and WebSocket, MQTT.js (npm)
//! over WebSocket and TCP. Certificates are made for each run with rcgen.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Broker, Spec, repo_root};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SerialNumber,
};
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
    // Eve's certificate is the CA's own, and revoked in the CA's CRL.
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "eve");
    p.serial_number = Some(SerialNumber::from(4242u64));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("revoked.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("revoked.key"), key.serialize_pem()).unwrap();
    let crl = CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2026, 1, 1),
        next_update: rcgen::date_time_ymd(2036, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from(4242u64),
            revocation_time: rcgen::date_time_ymd(2026, 6, 1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca)
    .unwrap();
    std::fs::write(dir.join("crl.pem"), crl.pem().unwrap()).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Listeners: 0 tcp, 1 tls, 2 tls requiring a client certificate (CN as username), 3 ws,
/// 4 wss, 5 as 2 with the CA's revocation list. Anonymous clients may use t/#, alice
/// alice/#.
fn broker(dir: &Path) -> Broker {
    certificates(dir);
    let (cert, key, ca) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    let crl = dir.join("crl.pem");
    let files = |client_ca: Option<&Path>, crl: Option<&Path>| {
        Tls::load(&TlsFiles {
            cert: &cert,
            key: &key,
            client_ca,
            require_client_cert: true,
            crl,
        })
        .unwrap()
    };
    let tls = files(None, None);
    let mut client_certs = Spec::new(Transport::Tls(files(Some(&ca), None)));
    client_certs.cert_username = true;
    let mut checked_certs = Spec::new(Transport::Tls(files(Some(&ca), Some(&crl))));
    checked_certs.cert_username = true;
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
            checked_certs,
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

#[test]
fn a_revoked_client_certificate_is_refused_and_a_valid_one_accepted() {
    let dir = temp_dir("crl");
    let b = broker(&dir);
    paho("mtls_accepted_with_cn_as_username", b.ports[5], &dir, "5");
    paho(
        "mtls_with_a_revoked_certificate_is_refused",
        b.ports[5],
        &dir,
        "5",
    );
    paho(
        "mtls_with_a_revoked_certificate_is_refused",
        b.ports[5],
        &dir,
        "4",
    );
    // Without the list, the same certificate is good: the refusal is the CRL's doing.
    paho(
        "mtls_revoked_certificate_without_a_crl_is_accepted",
        b.ports[2],
        &dir,
        "5",
    );
}

#[test]
fn a_revocation_list_file_that_is_not_one_is_named() {
    let dir = temp_dir("crl-bad");
    certificates(&dir);
    let load = |crl: &Path| {
        Tls::load(&TlsFiles {
            cert: &dir.join("server.pem"),
            key: &dir.join("server.key"),
            client_ca: Some(&dir.join("ca.pem")),
            require_client_cert: true,
            crl: Some(crl),
        })
        .err()
        .expect("refused")
    };
    // A certificate where a CRL should be.
    let e = load(&dir.join("ca.pem"));
    assert!(
        e.contains("no PEM revocation list") && e.contains("ca.pem"),
        "{e}"
    );
    let e = load(&dir.join("missing.pem"));
    assert!(e.contains("missing.pem"), "{e}");
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

/// A web page's MQTT over `wss://` (and `ws://`): MQTT.js in headless Chromium (Debian's
/// `chromium`, driven by puppeteer-core; scripts/test installs both), QoS 0/1/2, MQTT 3.1.1
/// and 5. The browser does its own TLS handshake, offering ALPN `h2` and `http/1.1`, which
/// a `wss` listener must accept (it once answered `no_application_protocol` and every page
/// failed with `ERR_SSL_PROTOCOL_ERROR`, while Node clients, sending no ALPN, passed).
#[test]
fn mqtt_js_in_headless_chromium_over_wss_and_ws() {
    let dir = temp_dir("browser");
    let b = broker(&dir);
    let js = repo_root().join("tests/interop/mqttjs");
    assert!(
        js.join("node_modules/puppeteer-core").exists(),
        "puppeteer-core is not installed: run `npm install` in {} (scripts/test does)",
        js.display()
    );
    for url in [
        format!("wss://127.0.0.1:{}/mqtt", b.ports[4]),
        format!("ws://127.0.0.1:{}/mqtt", b.ports[3]),
    ] {
        for version in ["4", "5"] {
            let out = std::process::Command::new("node")
                .current_dir(&js)
                .args(["browser.js", &url, version])
                .output()
                .expect("node (Node 20)");
            assert!(
                out.status.success(),
                "MQTT.js in Chromium ({url}, v{version}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
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

/// A masked binary WebSocket frame from a client.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let mask = [9u8, 8, 7, 6];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn packets_split_across_websocket_frames_and_packed_into_one_are_read() {
    use std::io::{Read, Write};
    use tern_codec::{Connect, Packet, Protocol, Publish, QoS, QosPid, TopicName};
    let dir = temp_dir("wsframes");
    let b = broker(&dir);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", b.ports[3])).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: mqtt"),
        "{head}"
    );
    let v = Protocol::V5;
    let mut connect = bytes::BytesMut::new();
    tern_codec::encode(
        &Packet::Connect(Box::new(Connect::new(v, "framed"))),
        v,
        &mut connect,
    )
    .unwrap();
    // CONNECT in three frames, cut inside the fixed header and inside the payload.
    s.write_all(&ws_frame(&connect[..1])).unwrap();
    s.write_all(&ws_frame(&connect[1..7])).unwrap();
    s.write_all(&ws_frame(&connect[7..])).unwrap();
    // SUBSCRIBE and two QoS 1 PUBLISHes to itself, all in one frame.
    let mut packed = bytes::BytesMut::new();
    let sub = tern_codec::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![tern_codec::Subscription {
            filter: tern_codec::TopicFilter::new("t/#").unwrap(),
            options: tern_codec::SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    };
    tern_codec::encode(&Packet::Subscribe(sub), v, &mut packed).unwrap();
    for i in 1..=2u16 {
        let p = Publish::new(
            TopicName::new(format!("t/{i}")).unwrap(),
            QosPid::new(QoS::AtLeastOnce, std::num::NonZeroU16::new(10 + i).unwrap()),
            "x",
        );
        tern_codec::encode(&Packet::Publish(p), v, &mut packed).unwrap();
    }
    s.write_all(&ws_frame(&packed)).unwrap();
    // The broker's frames, unwrapped into one byte stream (server frames are unmasked).
    let mut stream = bytes::BytesMut::new();
    let mut packets = Vec::new();
    while packets.len() < 6 {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x82, "binary frames only");
        let len = match h[1] {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).unwrap();
                usize::from(u16::from_be_bytes(l))
            }
            n => usize::from(n),
        };
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        stream.extend_from_slice(&body);
        while let Some(p) = tern_codec::decode(&mut stream, v, tern_codec::MAX_PACKET_SIZE).unwrap()
        {
            packets.push(p);
        }
    }
    let kinds: Vec<&str> = packets
        .iter()
        .map(|p| match p {
            Packet::ConnAck(_) => "CONNACK",
            Packet::SubAck(_) => "SUBACK",
            Packet::PubAck(_) => "PUBACK",
            Packet::Publish(_) => "PUBLISH",
            _ => "other",
        })
        .collect();
    let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(
        (kinds[0], kinds[1], count("PUBACK"), count("PUBLISH")),
        ("CONNACK", "SUBACK", 2, 2),
        "{kinds:?}"
    );
}

/// The TLS handshake with `offer` as the client's ALPN list: the protocol the server
/// chose, or the handshake's error.
async fn alpn_handshake(port: u16, ca: &Path, offer: &[&[u8]]) -> Result<Option<Vec<u8>>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = offer.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

/// Browsers always offer `http/1.1` for a WebSocket over TLS; answering with the
/// no_application_protocol alert made every `wss://` connection from a page fail. MQTT
/// clients that offer `mqtt`, and clients that offer nothing, are served as before.
#[test]
fn a_wss_listener_accepts_the_alpn_browsers_offer_and_a_tls_listener_mqtt_or_none() {
    let dir = temp_dir("alpn");
    let b = broker(&dir);
    let ca = dir.join("ca.pem");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tls, wss) = (b.ports[1], b.ports[4]);
    // (listener port, the client's ALPN offer, the protocol the server must pick)
    type Case<'a> = (u16, &'a [&'a [u8]], Option<&'a [u8]>);
    let cases: [Case<'_>; 5] = [
        (wss, &[b"http/1.1"], Some(b"http/1.1")),
        (wss, &[b"h2", b"http/1.1"], Some(b"http/1.1")),
        (wss, &[], None),
        (tls, &[b"mqtt"], Some(b"mqtt")),
        (tls, &[], None),
    ];
    for (port, offer, want) in cases {
        let got = rt.block_on(alpn_handshake(port, &ca, offer));
        assert_eq!(
            got,
            Ok(want.map(<[u8]>::to_vec)),
            "port {port}, offer {offer:?}"
        );
    }
}
