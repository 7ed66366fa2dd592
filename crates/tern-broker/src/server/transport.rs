//! What carries MQTT bytes: TCP, TLS (rustls), WebSocket and WebSocket over TLS. Each
//! connection ends up as a byte reader and a byte writer, so the MQTT side does not know
//! which: over WebSocket, binary frames are read as one stream (a packet may span frames,
//! a frame may hold many packets) and each write of the connection goes out as one frame.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;

/// How a listener's connections are carried.
#[derive(Clone)]
pub enum Transport {
    /// MQTT straight on TCP.
    Tcp,
    /// MQTT on TLS.
    Tls(Tls),
    /// MQTT in WebSocket binary frames; the upgrade must ask for this path.
    Ws {
        /// HTTP path of the upgrade request, `/mqtt` by default.
        path: String,
    },
    /// MQTT in WebSocket binary frames, on TLS.
    Wss {
        /// The TLS side.
        tls: Tls,
        /// HTTP path of the upgrade request.
        path: String,
    },
}

impl Transport {
    /// The name used in logs and config: `tcp`, `tls`, `ws` or `wss`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws { .. } => "ws",
            Transport::Wss { .. } => "wss",
        }
    }

    pub(super) fn tls(&self) -> Option<&Tls> {
        match self {
            Transport::Tls(t) | Transport::Wss { tls: t, .. } => Some(t),
            _ => None,
        }
    }

    pub(super) fn ws_path(&self) -> Option<&str> {
        match self {
            Transport::Ws { path } | Transport::Wss { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// A TLS server configuration. Clones share it: [`Tls::replace`] on one puts new
/// certificates in force for every listener holding a clone.
#[derive(Clone)]
pub struct Tls {
    current: Arc<std::sync::RwLock<tokio_rustls::TlsAcceptor>>,
}

/// Certificate files for a TLS listener, all PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles<'a> {
    /// The server's certificate chain, leaf first.
    pub cert: &'a Path,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: &'a Path,
    /// CA certificates client certificates are checked against; `None`: clients are not
    /// asked for one.
    pub client_ca: Option<&'a Path>,
    /// With a `client_ca`: whether a client without a valid certificate is refused
    /// (otherwise a certificate is optional, but checked if given).
    pub require_client_cert: bool,
    /// With a `client_ca`: certificate revocation lists (PEM, one or more); a client
    /// certificate listed in its issuer's CRL is refused, and so is one whose issuer has
    /// no CRL here (as OpenSSL's CRL check in Mosquitto's `crlfile`). Only the client's
    /// own certificate is checked, not the CAs above it.
    pub crl: Option<&'a Path>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: &TlsFiles<'_>) -> Result<Tls, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, String> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("no PEM certificate in {}", path.display()));
            }
            Ok(certs)
        };
        let chain = certs(files.cert)?;
        let key = PrivateKeyDer::from_pem_file(files.key).map_err(|e| {
            format!(
                "cannot read a private key from {}: {e}",
                files.key.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        if files.crl.is_some() && files.client_ca.is_none() {
            return Err(
                "a revocation list needs the CA certificates of client certificates".into(),
            );
        }
        let builder = match files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: not a CA certificate: {e}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = if files.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = match files.crl {
                    None => verifier,
                    Some(path) => {
                        use rustls::pki_types::CertificateRevocationListDer;
                        let crls = CertificateRevocationListDer::pem_file_iter(path)
                            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                            .map_err(|e| {
                                format!("cannot read revocation lists from {}: {e}", path.display())
                            })?;
                        if crls.is_empty() {
                            return Err(format!(
                                "no PEM revocation list (X509 CRL) in {}",
                                path.display()
                            ));
                        }
                        verifier.with_crls(crls).only_check_end_entity_revocation()
                    }
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            format!(
                "{} and {} do not make a certificate and key: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
        // ALPN: `mqtt` for MQTT clients that offer it, `http/1.1` for browsers, which
        // always offer it for a WebSocket over TLS (answering them with the
        // no_application_protocol alert failed every `wss://` connection from a page).
        // Clients that offer nothing are served without; a client offering only other
        // protocols gets that alert, as RFC 7301 says. The same certificates may serve a
        // TLS and a WSS listener, so both names are offered on both.
        config.alpn_protocols = vec![b"mqtt".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            current: Arc::new(std::sync::RwLock::new(tokio_rustls::TlsAcceptor::from(
                Arc::new(config),
            ))),
        })
    }

    /// What handshakes starting now use.
    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `other`'s certificates (and client CAs, revocation lists) in force for the
    /// handshakes that start from now on; connections already up keep theirs. For a
    /// certificate renewed on disk: [`Tls::load`] the files again and replace.
    pub fn replace(&self, other: &Tls) {
        let acceptor = other.acceptor();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = acceptor;
    }
}

/// The Common Name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, ... } ... }
    let (_, cert, _) = der_item(der)?;
    let (_, mut tbs, _) = der_item(cert)?;
    let mut skip = 4; // serial, signature algorithm, issuer, validity
    let (tag, _, rest) = der_item(tbs)?;
    if tag == 0xA0 {
        tbs = rest;
    }
    while skip > 0 {
        tbs = der_item(tbs)?.2;
        skip -= 1;
    }
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    let (_, mut name, _) = der_item(tbs)?;
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    while !name.is_empty() {
        let (_, mut set, rest) = der_item(name)?;
        name = rest;
        while !set.is_empty() {
            let (_, attr, rest) = der_item(set)?;
            set = rest;
            let (tag, oid, value) = der_item(attr)?;
            if tag == 0x06 && oid == CN {
                let (_, text, _) = der_item(value)?;
                return String::from_utf8(text.to_vec()).ok();
            }
        }
    }
    None
}

/// One DER item: its tag, its contents and what follows it.
fn der_item(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The WebSocket upgrade: the path must be the listener's (404 otherwise); the `mqtt`
/// subprotocol is chosen when offered ([MQTT-6.0.0-3]; clients that offer none are let
/// in, as most brokers do).
// The callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
pub(super) async fn upgrade<S>(
    stream: S,
    path: &str,
    max_message: usize,
) -> Result<WebSocketStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let path = path.to_string();
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            let mut e = ErrorResponse::new(Some(format!("no MQTT endpoint at {}", req.uri())));
            *e.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
            return Err(e);
        }
        let offered = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| matches!(*p, "mqtt" | "mqttv3.1"))
            .map(str::to_string);
        if let Some(p) = offered
            && let Ok(v) = p.parse()
        {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
        }
        Ok(resp)
    };
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config))
        .await
        .map_err(|e| e.to_string())
}
