//! The operators' HTTP endpoint: Prometheus text at `/metrics`, `/healthz` (the process
//! answers) and `/readyz` (the store is loaded and the listeners are bound; not during
//! startup or shutdown); the admin API (`/api/v1/...`, `admin.rs`) and the dashboard at
//! `/` (`dashboard.html`, embedded). A minimal HTTP/1.1 server: GET (POST and DELETE for
//! the admin API's actions), one request per
//! connection, small requests, a few seconds to send them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::ToCore;
use crate::metrics::Metrics;

/// Open connections of one listener by the protocol their CONNECT asked for: none yet,
/// 3.1, 3.1.1, 5.0.
#[derive(Default)]
pub(crate) struct ConnCounts(pub(crate) [AtomicU64; 4]);

impl ConnCounts {
    pub(crate) fn index(level: u8) -> usize {
        match level {
            3 => 1,
            4 => 2,
            5 => 3,
            _ => 0,
        }
    }

    /// Moves one connection from `from` to `to` (indexes as [`ConnCounts::index`]).
    pub(crate) fn shift(&self, from: usize, to: usize) {
        self.0[to].fetch_add(1, Ordering::Relaxed);
        self.0[from].fetch_sub(1, Ordering::Relaxed);
    }
}

struct Inner {
    metrics: Arc<Metrics>,
    ready: AtomicBool,
    core: Mutex<Option<mpsc::UnboundedSender<ToCore>>>,
    listeners: Mutex<Vec<(String, Arc<ConnCounts>)>>,
    /// The admin API's bearer token; `None`: the API is off.
    admin_token: Mutex<Option<String>>,
    /// Parts of the process outside the server (the bridges) that add their own lines.
    extra: Mutex<Vec<Extra>>,
}

/// Appends Prometheus text lines for a part of the process outside the server.
pub type Extra = Box<dyn Fn(&mut String) + Send + Sync>;

/// What the HTTP endpoint reports on: the server's metrics and readiness, and a way to
/// ask the running core for its gauges. Made before the server so the endpoint can answer
/// (not ready) while the store loads; [`super::run`] fills it in.
#[derive(Clone)]
pub struct Monitor(Arc<Inner>);

impl Default for Monitor {
    fn default() -> Self {
        Monitor::new()
    }
}

impl Monitor {
    /// Not ready, nothing counted.
    pub fn new() -> Monitor {
        Monitor(Arc::new(Inner {
            metrics: Arc::new(Metrics::new()),
            ready: AtomicBool::new(false),
            core: Mutex::new(None),
            listeners: Mutex::new(Vec::new()),
            admin_token: Mutex::new(None),
            extra: Mutex::new(Vec::new()),
        }))
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Whether the server is serving: store loaded, listeners bound, not shutting down,
    /// and the store taking commits.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
            && !self.0.metrics.store_failing.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::Release);
    }

    /// Turns the admin API (`/api/v1/...`) on with this bearer token, or off.
    pub fn set_admin_token(&self, token: Option<String>) {
        *self.0.admin_token.lock().unwrap_or_else(|e| e.into_inner()) = token;
    }

    pub(crate) fn admin_token(&self) -> Option<String> {
        self.0
            .admin_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks the core a question of the admin API (`None`: no core, or no answer in 5 s).
    pub(crate) async fn ask(&self, query: super::admin::Query) -> Option<super::admin::Answer> {
        let core = self
            .0
            .core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let (tx, rx) = oneshot::channel();
        core.send(ToCore::Admin(query, tx)).ok()?;
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()?
            .ok()
    }

    pub(crate) fn attach(&self, core: Option<mpsc::UnboundedSender<ToCore>>) {
        *self.0.core.lock().unwrap_or_else(|e| e.into_inner()) = core;
    }

    pub(crate) fn add_listener(&self, name: String, counts: Arc<ConnCounts>) {
        self.0
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, counts));
    }

    /// The Prometheus text: counters, and the core's gauges if it is running.
    pub async fn render(&self) -> String {
        let core = self
            .0
            .core
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let gauges = match core {
            Some(core) => {
                let (tx, rx) = oneshot::channel();
                if core.send(ToCore::Gauges(tx)).is_ok() {
                    tokio::time::timeout(Duration::from_secs(5), rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                }
            }
            None => None,
        };
        let mut text = self.0.metrics.render(gauges.as_ref(), &self.connections());
        for extra in self
            .0
            .extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            extra(&mut text);
        }
        text
    }

    /// Adds lines to every `/metrics` answer (written by `f` after the server's own).
    pub fn add_metrics(&self, f: Extra) {
        self.0
            .extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
    }

    /// Connections open per listener and protocol ("none": no CONNECT yet).
    pub(crate) fn connections(&self) -> Vec<(String, &'static str, u64)> {
        let mut connections = Vec::new();
        for (name, counts) in self
            .0
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (i, protocol) in ["none", "3.1", "3.1.1", "5.0"].iter().enumerate() {
                connections.push((name.clone(), *protocol, counts.0[i].load(Ordering::Relaxed)));
            }
        }
        connections
    }
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve_monitor(
    listener: TcpListener,
    monitor: Monitor,
    shutdown: impl Future<Output = ()>,
) {
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(respond(stream, monitor.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

async fn respond(mut stream: TcpStream, monitor: Monitor) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // The request line and headers; the body (there is none for GET) is not read.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
            _ => return,
        }
        if request.len() > 8192 {
            let _ = reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
            return;
        }
    }
    let line = request
        .split(|b| *b == b'\r')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default()
        .into_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path.starts_with("/api/") {
        let head = String::from_utf8_lossy(&request).into_owned();
        let (status, body) = super::admin::handle(&monitor, method, target, &head).await;
        let _ = reply(&mut stream, status, "application/json", &body).await;
        return;
    }
    if method != "GET" {
        let _ = reply(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        )
        .await;
        return;
    }
    let _ = match path {
        "/metrics" => {
            let body = monitor.render().await;
            reply(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        "/healthz" => reply(&mut stream, "200 OK", "text/plain", "ok\n").await,
        // The dashboard: one page, embedded; it holds no data itself (it reads the admin
        // API with the token the operator types in).
        // MQTT.js for the dashboard's live tail (assets/README.md).
        "/mqtt.min.js" => {
            reply(
                &mut stream,
                "200 OK",
                "text/javascript; charset=utf-8",
                include_str!("assets/mqtt.min.js"),
            )
            .await
        }
        "/" | "/dashboard" => {
            reply(
                &mut stream,
                "200 OK",
                "text/html; charset=utf-8",
                include_str!("dashboard.html"),
            )
            .await
        }
        "/readyz" if monitor.is_ready() => {
            reply(&mut stream, "200 OK", "text/plain", "ready\n").await
        }
        "/readyz" => {
            reply(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found: try /metrics, /healthz, /readyz or /api/v1/overview\n",
            )
            .await
        }
    };
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
