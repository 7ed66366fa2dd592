//! What carries the client's MQTT bytes: TCP, TLS (rustls), WebSocket, or WebSocket over
//! TLS. Each ends up as one byte stream, so the rest of the client does not know which.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;

use crate::Error;

/// How the client reaches the broker.
///
/// ```
/// use tern_client::{Options, Transport};
/// let options = Options::new("127.0.0.1", 8080, "dashboard").websocket("/mqtt");
/// assert!(matches!(options.transport, Transport::Ws { .. }));
/// ```
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// MQTT straight on TCP (default).
    #[default]
    Tcp,
    /// MQTT on TLS.
    Tls(TlsConfig),
    /// MQTT in WebSocket binary frames; the upgrade request asks for `path`.
    Ws {
        /// HTTP path of the upgrade request (`/mqtt` is the usual one).
        path: String,
    },
    /// MQTT in WebSocket binary frames, on TLS.
    Wss {
        /// The TLS side.
        tls: TlsConfig,
        /// HTTP path of the upgrade request.
        path: String,
    },
}

impl Transport {
    /// `tcp`, `tls`, `ws` or `wss`.
    ///
    /// ```
    /// assert_eq!(tern_client::Transport::Tcp.name(), "tcp");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws { .. } => "ws",
            Transport::Wss { .. } => "wss",
        }
    }
}

/// A TLS client configuration: the CA certificates the broker's certificate is checked
/// against and, optionally, a client certificate.
///
/// ```no_run
/// use std::path::Path;
/// use tern_client::{Options, TlsConfig};
/// let tls = TlsConfig::from_files(Some(Path::new("ca.pem")), None, None)?;
/// let options = Options::new("broker.example", 8883, "meter-7").tls(tls);
/// # Ok::<(), tern_client::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsConfig(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// Where Debian, Fedora and the BSDs keep the system's CA bundle.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

impl TlsConfig {
    /// Loads PEM files: `ca` (the system's CA bundle when `None`), and a client
    /// certificate chain with its key when the broker asks for one. An error names the
    /// file and what is wrong with it.
    ///
    /// ```no_run
    /// use std::path::Path;
    /// let tls = tern_client::TlsConfig::from_files(
    ///     Some(Path::new("ca.pem")),
    ///     Some(Path::new("client.pem")),
    ///     Some(Path::new("client.key")),
    /// )?;
    /// # Ok::<(), tern_client::Error>(())
    /// ```
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<TlsConfig, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, Error> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::Tls(format!(
                        "cannot read certificates from {}: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(Error::Tls(format!(
                    "no PEM certificate in {}",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let ca = match ca {
            Some(p) => p,
            None => SYSTEM_CA_BUNDLES
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    Error::Tls("no CA file given and no system CA bundle found".into())
                })?,
        };
        let mut roots = rustls::RootCertStore::empty();
        let (_, rejected) = roots.add_parsable_certificates(certs(ca)?);
        if roots.is_empty() {
            return Err(Error::Tls(format!(
                "{}: no usable CA certificate ({rejected} rejected)",
                ca.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (cert, key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certs(cert)?;
                let k = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    Error::Tls(format!(
                        "cannot read a private key from {}: {e}",
                        key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, k).map_err(|e| {
                    Error::Tls(format!(
                        "{} and {} do not make a certificate and key: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => {
                return Err(Error::Tls(
                    "a client certificate needs both a certificate and a key file".into(),
                ));
            }
        };
        Ok(TlsConfig(Arc::new(config)))
    }

    /// Uses a rustls configuration built by the application.
    ///
    /// ```no_run
    /// # fn get() -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> { unimplemented!() }
    /// let tls = tern_client::TlsConfig::from_rustls(get());
    /// ```
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> TlsConfig {
        TlsConfig(config)
    }
}

/// A connected byte stream, whatever carries it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Opens the transport to `host:port`; errors are [`Error::Connect`] naming the address.
pub(crate) async fn open(
    transport: &Transport,
    host: &str,
    port: u16,
) -> Result<Box<dyn Io>, Error> {
    let addr = format!("{host}:{port}");
    let fail = |source: io::Error| Error::Connect {
        addr: addr.clone(),
        source,
    };
    let tcp = TcpStream::connect((host, port)).await.map_err(fail)?;
    let _ = tcp.set_nodelay(true);
    let tls = |tls: &TlsConfig, tcp: TcpStream| {
        let connector = tokio_rustls::TlsConnector::from(tls.0.clone());
        let name = rustls::pki_types::ServerName::try_from(host.to_string());
        async move {
            let name = name.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            connector.connect(name, tcp).await
        }
    };
    Ok(match transport {
        Transport::Tcp => Box::new(tcp),
        Transport::Tls(t) => Box::new(tls(t, tcp).await.map_err(fail)?),
        Transport::Ws { path } => {
            let url = format!("ws://{addr}{path}");
            Box::new(websocket(&url, tcp).await.map_err(fail)?)
        }
        Transport::Wss { tls: t, path } => {
            let url = format!("wss://{addr}{path}");
            let stream = tls(t, tcp).await.map_err(fail)?;
            Box::new(websocket(&url, stream).await.map_err(fail)?)
        }
    })
}

/// The WebSocket upgrade, asking for the `mqtt` subprotocol ([MQTT-6.0.0-3]).
async fn websocket<S: AsyncRead + AsyncWrite + Unpin>(
    url: &str,
    stream: S,
) -> io::Result<tern_ws::WsBytes<WebSocketStream<S>>> {
    use tungstenite::client::IntoClientRequest;
    let mut request = url
        .into_client_request()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tungstenite::http::HeaderValue::from_static("mqtt"),
    );
    let (ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| io::Error::other(format!("WebSocket upgrade failed: {e}")))?;
    Ok(tern_ws::WsBytes::new(ws))
}
