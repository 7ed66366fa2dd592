//! The tokio server around the sans-IO core: listeners (TCP, TLS, WebSocket, both), one
//! task per connection that reads and decodes, and one core task that owns the [`Broker`]
//! and tells connections what to write. Each connection writes everything queued for it
//! in one buffer, one write per wakeup.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use tern_codec::{DecodeError, Packet, Protocol};
use tern_store::{Store, StoreError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::auth::Access;
use crate::core::{Admission, Broker, ConnId, ConnMap, Output, Refusal, Settings};

mod line;
mod monitor;
mod transport;
mod writer;

pub use monitor::{Monitor, serve_monitor};
pub use transport::{Tls, TlsFiles, Transport, common_name};

use crate::core::Gauges;
use crate::metrics::Metrics;
use monitor::ConnCounts;

/// One listening socket and how its connections are served.
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// TCP, TLS, WebSocket or WebSocket over TLS.
    pub transport: Transport,
    /// Most connections open at once on this listener; the next ones are refused at
    /// CONNECT (0x97 Quota exceeded, 3.x return code 3). `None`: no limit.
    pub max_connections: Option<usize>,
    /// Whether clients without a username are let in here; `None`: as [`Access`] says.
    pub allow_anonymous: Option<bool>,
    /// TLS with client certificates: the certificate's Common Name becomes the username
    /// (and no password is asked for), as Mosquitto's `use_identity_as_username`. A
    /// client without a certificate is anonymous.
    pub cert_username: bool,
    /// Write coalescing: a write due within this long of a small write (under
    /// [`COALESCE_BELOW`] bytes) waits until this long after it, and goes out with
    /// whatever else is due by then. Fewer, fuller writes, so fewer segments and fewer
    /// wake-ups of the receiving client, for up to this much added latency, and only on
    /// connections written to more often than once per window. `None`: every write goes
    /// out at once.
    pub write_coalesce: Option<Duration>,
}

impl Listener {
    /// Plain MQTT on TCP, no limits of its own.
    pub fn tcp(socket: TcpListener) -> Listener {
        Listener {
            socket,
            transport: Transport::Tcp,
            max_connections: None,
            allow_anonymous: None,
            cert_username: false,
            write_coalesce: None,
        }
    }
}

/// Who may connect and what they may do, replaceable while the server runs (SIGHUP):
/// new connections check the new password file, and the core applies the new ACL from
/// the next packet on. Nobody is disconnected.
#[derive(Clone)]
pub struct AccessControl(watch::Sender<Arc<Access>>);

impl AccessControl {
    /// Starts with `access`.
    pub fn new(access: Access) -> AccessControl {
        AccessControl(watch::Sender::new(Arc::new(access)))
    }

    /// Puts `access` in force.
    pub fn replace(&self, access: Access) {
        self.0.send_replace(Arc::new(access));
    }

    /// What is in force.
    pub fn current(&self) -> Arc<Access> {
        self.0.borrow().clone()
    }
}

/// Everything [`run`] needs.
pub struct Server {
    /// Where to accept connections; at least one.
    pub listeners: Vec<Listener>,
    /// The core's settings.
    pub settings: Settings,
    /// The store, if state is kept.
    pub persistence: Option<Persistence>,
    /// Passwords and ACL.
    pub access: AccessControl,
    /// Most connections open at once over all listeners; `None`: no limit.
    pub max_connections: Option<usize>,
    /// Where the server counts and reports readiness (see [`serve_monitor`]).
    pub monitor: Monitor,
    /// How often `$SYS/broker/...` is published; `None`: never.
    pub sys_interval: Option<Duration>,
}

pub(crate) enum ToCore {
    Accepted(ConnId, SocketAddr, line::Sender<ToConn>),
    /// A packet, and when the read that brought it completed.
    Packet(ConnId, Packet, Instant),
    /// The packets of one read, in order, when it brought more than one: one message on
    /// the core's channel per read rather than per packet.
    Packets(ConnId, Vec<Packet>, Instant),
    DecodeError(ConnId, Option<Protocol>, DecodeError),
    /// The CONNECT phase's answer: the CONNECT, admitted, or why not.
    Admission(ConnId, Admission, Instant),
    Closed(ConnId),
    /// The storage writer could not commit; see [`writer`].
    StoreFailed,
    /// The metrics endpoint asks for the core's gauges.
    Gauges(tokio::sync::oneshot::Sender<Gauges>),
    Shutdown,
}

/// What a connection task is told, through its [`line`]. Kept to one pointer, so a queue
/// of them stays small.
pub(crate) enum ToConn {
    /// Packets to write, when the earliest input of the core round that produced them
    /// was read (for the latency histogram), and the bytes of their topics and payloads
    /// (what they weigh in the connection's backlog).
    Packets(Box<(Vec<Packet>, Instant, usize)>),
    Close,
}

impl line::Weigh for ToConn {
    fn weight(&self) -> usize {
        match self {
            ToConn::Packets(batch) => batch.2,
            ToConn::Close => 0,
        }
    }
}

/// Where and how the server keeps its state.
pub struct Persistence {
    /// The store, loaded at start and written by the storage writer thread.
    pub store: Box<dyn Store>,
    /// `None`: every commit is durable before anything waiting on it is sent (the store
    /// syncs each commit). `Some(every)`: acknowledgements go out once a commit is
    /// applied, and the store is flushed at most this often (`durability = "batched"`).
    pub flush_every: Option<Duration>,
}

/// Serves MQTT on `listener` until `shutdown` completes; then tells every client (5.0:
/// DISCONNECT 0x8B), flushes, and returns. With `persistence`, state is loaded from its
/// store first, and every output of the core (acknowledgements, deliveries) is written
/// only after the ops produced with it are committed, by one storage writer thread that
/// commits everything queued at once (group commit). Without, state lives in memory only.
/// An error here means the store could not be read.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    persistence: Option<Persistence>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let server = Server {
        listeners: vec![Listener::tcp(listener)],
        settings,
        persistence,
        access: AccessControl::new(access),
        max_connections: None,
        monitor: Monitor::new(),
        sys_interval: None,
    };
    run(server, shutdown).await
}

/// Serves MQTT on every listener of `server` until `shutdown` completes, as [`serve`].
pub async fn run(server: Server, shutdown: impl Future<Output = ()>) -> Result<(), StoreError> {
    let Server {
        listeners,
        settings,
        persistence,
        access,
        max_connections,
        monitor,
        sys_interval,
    } = server;
    let metrics = monitor.metrics().clone();
    let mut acl_changes = access.0.subscribe();
    let (to_core, mut from_conns) = mpsc::unbounded_channel::<ToCore>();
    let connect_timeout = settings.connect_timeout;
    let max_packet_size = settings.max_packet_size;
    let snapshot = match &persistence {
        Some(p) => p.store.load()?,
        None => Default::default(),
    };
    let core_settings = settings.clone();
    let backlog_limit = settings.max_queued_bytes;
    let mut broker = Broker::resume(settings, snapshot, Instant::now(), SystemTime::now());
    broker.set_acl(acl_changes.borrow_and_update().acl.clone());
    let mut writer =
        persistence.map(|p| writer::Writer::spawn(p, to_core.clone(), metrics.clone()));
    let core_metrics = metrics.clone();
    let core = tokio::spawn(async move {
        let mut writers: ConnMap<line::Sender<ToConn>> = ConnMap::default();
        // One timer, moved to whatever the core says is due next (keep alive, session
        // expiry, will delay): nothing wakes the core while nothing is due.
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(3600)));
        let mut armed: Option<Instant> = None;
        let mut sys_tick = tokio::time::interval(sys_interval.unwrap_or(Duration::MAX / 4));
        'run: loop {
            let mut first = None;
            let due = broker.poll_timeout();
            if due != armed {
                if let Some(at) = due {
                    timer.as_mut().reset(tokio::time::Instant::from_std(at));
                }
                armed = due;
            }
            tokio::select! {
                msg = from_conns.recv() => match msg {
                    Some(msg) => first = Some(msg),
                    None => break 'run,
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    broker.handle_timeout(Instant::now());
                }
                _ = sys_tick.tick(), if sys_interval.is_some() => broker.publish_sys(Instant::now(), &core_metrics.traffic()),
                Ok(()) = acl_changes.changed() => {
                    broker.set_acl(acl_changes.borrow_and_update().acl.clone());
                    tracing::info!("ACL reloaded");
                }
            }
            // What this round sends is timed from the earliest read it answers (lowered
            // below), or from now for what the core does on its own (timers, $SYS). Not
            // from before the wait above: that would count the idle time.
            let mut since = Instant::now();
            // Everything already waiting is handled before one batch goes to the writer.
            let mut next = first;
            let mut handled = 0;
            let mut closed = Vec::new();
            while let Some(msg) = next {
                let now = Instant::now();
                match msg {
                    ToCore::Accepted(conn, peer, tx) => {
                        writers.insert(conn, tx);
                        broker.handle_accepted(conn, &peer);
                    }
                    ToCore::Packet(conn, p, read_at) => {
                        since = since.min(read_at);
                        broker.handle_packet(conn, p, now);
                    }
                    ToCore::Packets(conn, packets, read_at) => {
                        since = since.min(read_at);
                        handled += packets.len().saturating_sub(1);
                        for p in packets {
                            broker.handle_packet(conn, p, now);
                        }
                    }
                    ToCore::Gauges(reply) => {
                        let _ = reply.send(broker.gauges(now, 10));
                    }
                    ToCore::DecodeError(conn, v, e) => {
                        broker.handle_decode_error(conn, v, &e, now);
                    }
                    ToCore::Admission(conn, admission, read_at) => {
                        since = since.min(read_at);
                        broker.handle_admission(conn, admission, now);
                    }
                    ToCore::Closed(conn) => {
                        broker.handle_closed(conn, now);
                        // Its writer goes after this round's outputs: a DISCONNECT for
                        // a bad packet comes in the same round as the close.
                        closed.push(conn);
                    }
                    ToCore::StoreFailed => {
                        // The store refused a commit: what the core holds is ahead of the
                        // disk. Every connection goes (nothing they were owed was sent),
                        // and the core starts again from the last commit.
                        let Some(w) = writer.as_mut() else {
                            unreachable!("only the storage writer reports store failures")
                        };
                        for (_, tx) in writers.drain() {
                            let _ = tx.send(ToConn::Close);
                        }
                        let _ = broker.take_ops();
                        while broker.poll_output().is_some() {}
                        match w.reset().await {
                            Some(snapshot) => {
                                let counters = broker.counters().clone();
                                broker = Broker::resume(
                                    core_settings.clone(),
                                    snapshot,
                                    Instant::now(),
                                    SystemTime::now(),
                                );
                                broker.set_acl(acl_changes.borrow().acl.clone());
                                broker.set_counters(counters);
                                tracing::warn!(
                                    "state reloaded from the last commit; accepting connections again"
                                );
                            }
                            None => {
                                tracing::error!("the store cannot be read back; stopping");
                                break 'run;
                            }
                        }
                    }
                    ToCore::Shutdown => break 'run,
                }
                handled += 1;
                next = if handled < 256 {
                    from_conns.try_recv().ok()
                } else {
                    None
                };
            }
            dispatch(
                &mut broker,
                &mut writers,
                writer.as_ref(),
                since,
                backlog_limit,
                &core_metrics,
            );
            for conn in closed {
                writers.remove(&conn);
            }
        }
        broker.shutdown(Instant::now());
        dispatch(
            &mut broker,
            &mut writers,
            writer.as_ref(),
            Instant::now(),
            backlog_limit,
            &core_metrics,
        );
        if let Some(w) = writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
    });

    let next_conn = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let mut accepting = Vec::new();
    for l in listeners {
        let name = match l.socket.local_addr() {
            Ok(a) => format!("{} {a}", l.transport.name()),
            Err(_) => l.transport.name().to_string(),
        };
        let listener = Arc::new(ListenerCtx {
            transport: l.transport,
            allow_anonymous: l.allow_anonymous,
            cert_username: l.cert_username,
            write_coalesce: l.write_coalesce,
            access: access.0.subscribe(),
            connect_timeout,
            max_packet_size,
            open: AtomicUsize::new(0),
            max_connections: l.max_connections,
            name: name.clone(),
            counts: Arc::new(ConnCounts::default()),
            metrics: metrics.clone(),
            to_core: to_core.clone(),
        });
        monitor.add_listener(name, listener.counts.clone());
        let (next_conn, total) = (next_conn.clone(), total.clone());
        let socket = l.socket;
        accepting.push(tokio::spawn(async move {
            loop {
                let (stream, peer) = match socket.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let conn = next_conn.fetch_add(1, Ordering::Relaxed) + 1;
                listener
                    .metrics
                    .connections_accepted
                    .fetch_add(1, Ordering::Relaxed);
                listener.counts.0[0].fetch_add(1, Ordering::Relaxed);
                let here = listener.open.fetch_add(1, Ordering::AcqRel) + 1;
                let all = total.fetch_add(1, Ordering::AcqRel) + 1;
                let slot = Slot(listener.clone(), total.clone());
                let over = listener.max_connections.is_some_and(|m| here > m)
                    || max_connections.is_some_and(|m| all > m);
                tracing::info!(conn, %peer, listener = %listener.name, "accepted");
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(Box::new(Accepted {
                    conn,
                    stream,
                    peer,
                    slot,
                    over_limit: over,
                })));
            }
        }));
    }
    monitor.attach(Some(to_core.clone()));
    monitor.set_ready(true);
    shutdown.await;
    // Not ready from the moment shutdown begins: load balancers stop sending clients.
    monitor.set_ready(false);
    monitor.attach(None);
    for a in &accepting {
        a.abort();
    }
    let _ = to_core.send(ToCore::Shutdown);
    let _ = core.await;
    // Give connection tasks a moment to flush the DISCONNECTs.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Sends each connection what the broker produced, grouped so a connection gets one
/// message (one write) per round. With a storage writer, the round's ops go to it and the
/// sends wait for their commit; they go straight out only when nothing is waiting for a
/// commit (so nothing overtakes what was produced before it).
///
/// A subscriber that does not read builds a backlog in its line. Once that backlog is over
/// `backlog_limit` bytes, its QoS 0 PUBLISH packets are dropped (at most once allows it)
/// and counted as `slow_consumer`. What reaches the line at QoS 1/2 is bounded by its
/// inflight window (the rest waits in its session queue, which is not capped while it is
/// online: see docs/conformance.md), acks by what it sends itself.
fn dispatch(
    broker: &mut Broker,
    writers: &mut ConnMap<line::Sender<ToConn>>,
    writer: Option<&writer::Writer>,
    since: Instant,
    backlog_limit: usize,
    metrics: &Metrics,
) {
    let mut batches: ConnMap<Vec<Packet>> = ConnMap::default();
    let mut closes = vec![];
    while let Some(out) = broker.poll_output() {
        match out {
            Output::Send(conn, p) => batches.entry(conn).or_default().push(p),
            Output::Close(conn) => closes.push(conn),
        }
    }
    let ops = broker.take_ops();
    let mut sends = Vec::with_capacity(batches.len() + closes.len());
    for (conn, mut packets) in batches {
        let Some(w) = writers.get(&conn) else {
            continue;
        };
        if w.backlog() > backlog_limit {
            let before = packets.len();
            packets.retain(
                |p| !matches!(p, Packet::Publish(p) if p.qos_pid == tern_codec::QosPid::AtMostOnce),
            );
            let dropped = (before - packets.len()) as u64;
            if dropped > 0 {
                metrics.drop_n(crate::metrics::DropReason::SlowConsumer, dropped);
                tracing::debug!(
                    conn,
                    dropped,
                    "subscriber not reading: QoS 0 dropped for it"
                );
            }
            if packets.is_empty() {
                continue;
            }
        }
        let weight = packets
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.topic.as_str().len() + p.payload.len(),
                _ => 0,
            })
            .sum();
        sends.push((
            w.clone(),
            ToConn::Packets(Box::new((packets, since, weight))),
        ));
    }
    for conn in closes {
        if let Some(w) = writers.get(&conn) {
            sends.push((w.clone(), ToConn::Close));
        }
    }
    match writer {
        Some(w) if !ops.is_empty() || w.busy() => w.submit(ops, sends),
        // Memory only, or nothing to write and nothing ahead: straight out.
        _ => {
            for (tx, msg) in sends {
                let _ = tx.send(msg);
            }
        }
    }
}

/// What connections of one listener share.
struct ListenerCtx {
    transport: Transport,
    allow_anonymous: Option<bool>,
    cert_username: bool,
    write_coalesce: Option<Duration>,
    access: watch::Receiver<Arc<Access>>,
    connect_timeout: Duration,
    max_packet_size: u32,
    /// Connections open on this listener.
    open: AtomicUsize,
    max_connections: Option<usize>,
    /// Transport and address, for the logs.
    name: String,
    /// Its open connections by protocol version.
    counts: Arc<ConnCounts>,
    metrics: Arc<Metrics>,
    /// The core's inbox, one for all connections (each task holding its own sender would
    /// be one more pointer in every connection's task).
    to_core: mpsc::UnboundedSender<ToCore>,
}

/// A connection's place in the listener's and the server's counts, given back on drop.
struct Slot(Arc<ListenerCtx>, Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.counts.0[0].fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes at least this large are never held back for coalescing: a connection that
/// already writes in bulk gains nothing from waiting.
pub const COALESCE_BELOW: usize = 16 * 1024;

/// The smallest read (and the first): most connections are idle most of the time.
const READ_CHUNK_MIN: usize = 512;

/// A connection's reading half. Plain TCP is kept apart so that an idle connection can
/// wait for readability without holding a read buffer.
enum Reader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Other(Box<dyn AsyncRead + Unpin + Send>),
}

impl Reader {
    /// Reads what is available into `buf`, first making room for `chunk` more bytes. On
    /// plain TCP an empty buffer is given back while the socket has nothing to read, and
    /// room is made only once tokio reports it readable: an idle connection holds no read
    /// buffer.
    ///
    /// A plain function over `poll_fn` rather than an `async fn`: the future is kept in
    /// every connection's task, so its size counts.
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + 'a {
        std::future::poll_fn(move |cx| {
            // A connection reading small amounts waits without a buffer; one streaming
            // keeps its buffer between reads (freeing and faulting in 64 KiB per read
            // showed up as a quarter of the broker's time in the kernel zeroing pages).
            let idle = buf.is_empty() && chunk <= READ_CHUNK_MIN;
            let r: &mut (dyn AsyncRead + Unpin + Send) = match self {
                Reader::Tcp(r) => {
                    if idle {
                        // Waits for readability (no system call), without a buffer.
                        let stream: &TcpStream = (*r).as_ref();
                        if let std::task::Poll::Ready(ready) = stream.poll_read_ready(cx) {
                            ready?;
                        } else {
                            *buf = BytesMut::new();
                            return std::task::Poll::Pending;
                        }
                    }
                    r
                }
                Reader::Other(r) => r,
            };
            if buf.capacity() - buf.len() < chunk {
                buf.reserve(chunk);
            }
            let read = std::pin::pin!(r.read_buf(&mut *buf)).poll(cx);
            if read.is_pending() && idle && matches!(self, Reader::Tcp(_)) {
                *buf = BytesMut::new();
            }
            read
        })
    }
}

/// A connection's writing half; plain TCP unboxed, like [`Reader`].
enum Writer {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Other(Box<dyn AsyncWrite + Unpin + Send>),
}

impl Writer {
    /// The half to write to, whichever it is.
    fn as_dyn(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match self {
            Writer::Tcp(w) => w,
            Writer::Other(w) => w,
        }
    }
}

/// A connection just accepted: what its task starts from. Boxed, so that none of it is
/// kept in the task for the connection's life (a future keeps its arguments throughout).
struct Accepted {
    conn: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    over_limit: bool,
}

/// TLS and WebSocket handshakes, within the CONNECT timeout; then MQTT.
async fn connection(accepted: Box<Accepted>) {
    let Accepted {
        conn,
        stream,
        peer,
        slot,
        over_limit,
    } = {
        // Moved out in a block of its own, so the box is freed now, not when the
        // connection ends.
        let accepted = accepted;
        *accepted
    };
    let l = slot.0.clone();
    let handshake = async {
        let mut identity = None;
        let (reader, writer): (Reader, Writer) = match (&l.transport.tls(), l.transport.ws_path()) {
            (None, None) => {
                let (r, w) = stream.into_split();
                (Reader::Tcp(r), Writer::Tcp(w))
            }
            (Some(tls), path) => {
                let tls = tls
                    .acceptor()
                    .accept(stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                if l.cert_username {
                    identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| common_name(c));
                }
                match path {
                    None => {
                        let (r, w) = tokio::io::split(tls);
                        (Reader::Other(Box::new(r)), Writer::Other(Box::new(w)))
                    }
                    Some(path) => ws_halves(tls, path, l.max_packet_size).await?,
                }
            }
            (None, Some(path)) => ws_halves(stream, path, l.max_packet_size).await?,
        };
        Ok::<_, String>((reader, writer, identity))
    };
    // The TLS and WebSocket handshake futures are large (about 12 KB, rustls' and
    // tungstenite's state): boxed, they are freed once done instead of sizing every
    // connection's task for the rest of its life.
    let handshake = Box::pin(handshake);
    // One deadline for the handshakes and the CONNECT together.
    let deadline = tokio::time::Instant::now() + l.connect_timeout;
    let (reader, writer, identity) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(halves)) => halves,
        Ok(Err(e)) => {
            tracing::info!(conn, %peer, listener = %l.name, "closed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(conn, %peer, listener = %l.name, "closed: no handshake within the CONNECT timeout");
            return;
        }
    };
    let hello = Box::new(Hello {
        deadline,
        peer,
        identity,
        over_limit,
    });
    session_io(conn, reader, writer, &l, hello).await;
    drop(slot);
}

async fn ws_halves<S>(
    stream: S,
    path: &str,
    max_packet_size: u32,
) -> Result<(Reader, Writer), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let ws = transport::upgrade(stream, path, max_packet_size as usize + 8)
        .await
        .map_err(|e| format!("WebSocket upgrade failed: {e}"))?;
    let (sink, frames) = ws.split();
    Ok((
        Reader::Other(Box::new(tern_ws::WsBytes::new(frames))),
        Writer::Other(Box::new(tern_ws::WsBytes::new(sink))),
    ))
}

/// MQTT on a connection, in one task: after the CONNECT phase, decodes what it reads for
/// the core, and encodes and writes what the core sends, whichever is ready first. One
/// task rather than a reader and a writer, and the CONNECT phase boxed apart, keep what
/// an idle connection costs small (see design.md, "What an idle connection costs");
/// reading goes on while a write waits on a slow client, so neither side can block the
/// other.
async fn session_io(
    conn: ConnId,
    mut reader: Reader,
    mut writer: Writer,
    l: &ListenerCtx,
    hello: Box<Hello>,
) {
    let (tx, mut rx) = line::line::<ToConn>();
    if l.to_core
        .send(ToCore::Accepted(conn, hello.peer, tx))
        .is_err()
    {
        return;
    }
    let mut rbuf = BytesMut::new();
    // Boxed: it runs once, and would otherwise size the task for the connection's life.
    let start = Box::pin(connect_phase(conn, &mut reader, &mut rbuf, l, hello)).await;
    // Grows with what is written; an idle connection keeps only what it has needed.
    let mut wbuf = BytesMut::new();
    let version = match start {
        Start::Connected(v) => Some(v),
        Start::Refused(..) | Start::Ended => None,
    };
    // What the core's packets are encoded in: a refused client gets its CONNACK in the
    // version it asked for.
    let wire = match start {
        Start::Connected(v) | Start::Refused(v) => v,
        Start::Ended => Protocol::V3_1_1,
    };
    // A Close from the core, or the core gone: write what is left, then end.
    let mut closing = false;
    // False once reading has ended: from then on the connection only writes what the
    // core still sends, until the core lets go of it.
    let mut reading = match start {
        Start::Connected(v) => {
            // Whatever arrived along with the CONNECT.
            !decode_all(conn, &mut rbuf, v, l, Instant::now())
        }
        // The core was told and answers with the CONNACK and a close.
        Start::Refused(_) => false,
        Start::Ended => false,
    };
    if !reading {
        stop_reading(l, conn, version);
    }
    if rbuf.is_empty() {
        // Given back: an idle connection holds no read buffer.
        rbuf = BytesMut::new();
    }
    // Reads start small (most connections are idle most of the time) and double, up to
    // 64 KiB, while each read fills the buffer; a short read brings them back down.
    let mut chunk = READ_CHUNK_MIN;
    let mut unflushed = !wbuf.is_empty();
    // The write timer, out of line (one pointer in every task) and made only when needed:
    // on a listener that coalesces writes, or once reading has ended.
    let mut timer = l.write_coalesce.map(|w| WriteTimer::new(Some(w)));
    loop {
        let writing = !wbuf.is_empty() || unflushed;
        if !reading && closing && !writing {
            let _ = writer.as_dyn().shutdown().await;
            break;
        }
        if !reading {
            // What is left to write gets at most the CONNECT timeout: a client that stopped
            // sending and never reads would otherwise hold the task, its buffers and its
            // place under the connection limits for good.
            timer
                .get_or_insert_with(|| WriteTimer::new(None))
                .linger(l.connect_timeout);
        }
        let held = !wbuf.is_empty() && !closing && timer.as_mut().is_some_and(|t| t.holds());
        // The write branch watches the timer: the end of a coalescing window, or the
        // deadline for writing once reading has ended.
        let watch = if held || !reading {
            timer.as_deref_mut()
        } else {
            None
        };
        tokio::select! {
            read = reader.read_some(&mut rbuf, chunk), if reading => {
                let read_at = Instant::now();
                let n = match read {
                    Ok(n) if n > 0 => n,
                    _ => {
                        reading = false;
                        stop_reading(l, conn, version);
                        continue;
                    }
                };
                l.metrics.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                let spare = rbuf.capacity() + n - rbuf.len();
                if n == spare {
                    chunk = (chunk * 2).min(64 * 1024);
                } else if n < spare / 4 {
                    chunk = READ_CHUNK_MIN;
                }
                let v = wire;
                if decode_all(conn, &mut rbuf, v, l, read_at) {
                    reading = false;
                    stop_reading(l, conn, version);
                }
            }
            // A write held back waits here for its window to pass (reading and receiving
            // go on meanwhile).
            written = write_some(&mut writer, &wbuf, watch), if writing => match written {
                Ok(0) if !wbuf.is_empty() => break,
                Ok(n) if !wbuf.is_empty() => {
                    if let Some(t) = &mut timer {
                        t.wrote(n);
                    }
                    wbuf.advance(n);
                    if wbuf.is_empty() {
                        wbuf.clear();
                    }
                }
                Ok(_) => unflushed = false,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        tracing::info!(
                            conn,
                            unwritten = wbuf.len(),
                            "closed: the client stopped sending and did not read what was left for it"
                        );
                    }
                    break;
                }
            },
            // While a write is held back, what the core sends joins it.
            msgs = rx.recv_all(), if (!writing || held) && !closing => {
                let Some(msgs) = msgs else {
                    closing = true;
                    continue;
                };
                let now = Instant::now();
                // Everything queued goes into the same buffer: one write per wakeup.
                for msg in msgs {
                    match msg {
                        ToConn::Packets(batch) => {
                            let (packets, since, _) = *batch;
                            let v = wire;
                            let before = wbuf.len();
                            for p in &packets {
                                if let Err(e) = tern_codec::encode(p, v, &mut wbuf) {
                                    tracing::warn!(conn, error = %e, "packet not sendable in {v}");
                                }
                            }
                            l.metrics.written(&packets, wbuf.len() - before, since, now);
                        }
                        ToConn::Close => {
                            closing = true;
                            // Nothing read after the close is acted on.
                            if std::mem::take(&mut reading) {
                                stop_reading(l, conn, version);
                            }
                            break;
                        }
                    }
                }
                unflushed = !wbuf.is_empty();
            }
        }
    }
    // Writing failed or ended: the client is gone, whatever the core still sends.
    if reading {
        stop_reading(l, conn, version);
    }
}

/// One connection's write timer: the window of write coalescing (see
/// [`Listener::write_coalesce`]) while the connection reads, the deadline for what is left
/// to write once it has stopped.
struct WriteTimer {
    /// The coalescing window, if the listener asks for one.
    window: Option<Duration>,
    /// When the last small write went out, while its window may still be open.
    small_write_at: Option<tokio::time::Instant>,
    /// Reading has ended: the timer is the deadline, and nothing is held back any more.
    lingering: bool,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl WriteTimer {
    fn new(window: Option<Duration>) -> Box<WriteTimer> {
        Box::new(WriteTimer {
            window,
            small_write_at: None,
            lingering: false,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }

    /// Whether a write due now waits for the window after the last small write (the timer
    /// then set to its end).
    fn holds(&mut self) -> bool {
        let (Some(window), Some(at), false) = (self.window, self.small_write_at, self.lingering)
        else {
            return false;
        };
        let until = at + window;
        if tokio::time::Instant::now() >= until {
            self.small_write_at = None;
            return false;
        }
        if self.timer.deadline() != until {
            self.timer.as_mut().reset(until);
        }
        true
    }

    /// A write of `n` bytes went out: a small one opens a window.
    fn wrote(&mut self, n: usize) {
        if self.window.is_some() {
            self.small_write_at = (n < COALESCE_BELOW).then(tokio::time::Instant::now);
        }
    }

    /// Reading has ended: writing must be done within `limit` from now (set once).
    fn linger(&mut self, limit: Duration) {
        if !self.lingering {
            self.lingering = true;
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + limit);
        }
    }
}

/// What only the CONNECT phase needs, boxed and dropped when it ends.
struct Hello {
    /// When the CONNECT must be in by.
    deadline: tokio::time::Instant,
    peer: SocketAddr,
    /// The client certificate's common name, when it stands for the username.
    identity: Option<String>,
    /// Over the listener's or the server's connection limit: refused with 0x97.
    over_limit: bool,
}

/// How the CONNECT phase ended.
enum Start {
    /// The CONNECT went to the core, in this version.
    Connected(Protocol),
    /// Refused by the server's admission (the core was told, and answers): the version
    /// the CONNECT asked for.
    Refused(Protocol),
    /// No CONNECT: closed, timed out, or malformed (the core was told).
    Ended,
}

/// Reads the first packet, within the CONNECT timeout, and admits it: a CONNECT that the
/// listener's limits and the password file let through goes to the core.
async fn connect_phase(
    conn: ConnId,
    reader: &mut Reader,
    rbuf: &mut BytesMut,
    l: &ListenerCtx,
    hello: Box<Hello>,
) -> Start {
    let Hello {
        deadline,
        peer,
        identity,
        over_limit,
    } = *hello;
    let first = async {
        loop {
            if let Some(packet) = tern_codec::decode(rbuf, Protocol::V3_1_1, l.max_packet_size)? {
                return Ok(Some(packet));
            }
            match reader.read_some(rbuf, 512).await {
                Ok(n) if n > 0 => {
                    l.metrics
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                _ => return Ok(None),
            }
        }
    };
    let mut packet = match tokio::time::timeout_at(deadline, first).await {
        Ok(Ok(Some(packet))) => packet,
        Ok(Err(e)) => {
            let _ = l.to_core.send(ToCore::DecodeError(conn, None, e));
            return Start::Ended;
        }
        Ok(Ok(None)) | Err(_) => return Start::Ended,
    };
    count_received(&packet, l);
    let mut start = Start::Ended;
    if let Packet::Connect(c) = &mut packet {
        let counted = ConnCounts::index(c.protocol.level());
        l.counts.shift(0, counted);
        if let Err(refusal) = admit(c, l, identity.as_deref(), over_limit).await {
            tracing::info!(conn, %peer, client_id = %c.client_id, user = c.username.as_deref().unwrap_or("-"), %refusal, "refused by admission");
            l.counts.shift(counted, 0);
            let refused = Admission::Refused(c.protocol, refusal);
            let _ = l
                .to_core
                .send(ToCore::Admission(conn, refused, Instant::now()));
            return Start::Refused(c.protocol);
        }
        start = Start::Connected(c.protocol);
    }
    // Anything else first is the core's to refuse (a protocol error).
    let sent = match packet {
        Packet::Connect(c) => l.to_core.send(ToCore::Admission(
            conn,
            Admission::Granted(c),
            Instant::now(),
        )),
        other => l.to_core.send(ToCore::Packet(conn, other, Instant::now())),
    };
    if sent.is_err() {
        if let Start::Connected(v) = start {
            l.counts.shift(ConnCounts::index(v.level()), 0);
        }
        return Start::Ended;
    }
    start
}

/// Ends a connection's reading side: it is uncounted from its protocol version's
/// ConnCounts (back to "none", where the Slot uncounts it), and the core is told.
fn stop_reading(l: &ListenerCtx, conn: ConnId, version: Option<Protocol>) {
    l.counts
        .shift(version.map_or(0, |v| ConnCounts::index(v.level())), 0);
    let _ = l.to_core.send(ToCore::Closed(conn));
}

/// Counts a packet read.
fn count_received(packet: &Packet, l: &ListenerCtx) {
    l.metrics.packets_received.fetch_add(1, Ordering::Relaxed);
    if let Packet::Publish(p) = packet {
        let q = p.qos_pid.qos() as usize;
        l.metrics.received[q].fetch_add(1, Ordering::Relaxed);
        l.metrics.payload_received[q].fetch_add(p.payload.len() as u64, Ordering::Relaxed);
    }
}

/// Decodes every whole packet in `rbuf` and hands each to the core; true if the
/// connection must stop reading (malformed input, or the core is gone).
fn decode_all(
    conn: ConnId,
    rbuf: &mut BytesMut,
    v: Protocol,
    l: &ListenerCtx,
    read_at: Instant,
) -> bool {
    // The first packet is held, and goes alone if it stays the only one.
    let mut first = None;
    let mut more = Vec::new();
    let failed = loop {
        match tern_codec::decode(rbuf, v, l.max_packet_size) {
            Ok(Some(packet)) => {
                count_received(&packet, l);
                // (A second CONNECT goes to the engine, which reports the protocol error.)
                match first.take() {
                    None if more.is_empty() => first = Some(packet),
                    None => more.push(packet),
                    Some(held) => more.extend([held, packet]),
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let sent = match first {
        Some(p) => l.to_core.send(ToCore::Packet(conn, p, read_at)),
        None if more.is_empty() => Ok(()),
        None => l.to_core.send(ToCore::Packets(conn, more, read_at)),
    };
    if sent.is_err() {
        return true;
    }
    match failed {
        // What decoded before the malformed packet is handled first, as it arrived.
        Some(e) => {
            let _ = l.to_core.send(ToCore::DecodeError(conn, Some(v), e));
            true
        }
        None => false,
    }
}

/// Writes some of `buf`, or flushes once it is all written. With `timer`: while it holds a
/// write back for coalescing, first waits for the window to end; once reading has ended,
/// gives up with `TimedOut` if the deadline passes first.
fn write_some<'a>(
    writer: &'a mut Writer,
    buf: &'a BytesMut,
    mut timer: Option<&'a mut WriteTimer>,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        if let Some(t) = timer.as_deref_mut() {
            let fired = t.timer.as_mut().poll(cx).is_ready();
            if t.lingering {
                if fired {
                    return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
                }
            } else if fired {
                timer = None;
            } else {
                return std::task::Poll::Pending;
            }
        }
        let writer = std::pin::Pin::new(writer.as_dyn());
        if buf.is_empty() {
            writer.poll_flush(cx).map_ok(|()| 0)
        } else {
            writer.poll_write(cx, buf)
        }
    })
}

/// Whether a CONNECT may go on to the core: the listener's connection limit, then the
/// client certificate's identity or the password file.
async fn admit(
    c: &mut tern_codec::Connect,
    l: &ListenerCtx,
    identity: Option<&str>,
    over_limit: bool,
) -> Result<(), Refusal> {
    let access = l.access.borrow().clone();
    let anonymous = l.allow_anonymous.unwrap_or(access.allow_anonymous);
    if over_limit {
        tracing::warn!(listener = %l.name, "connection limit reached");
        Err(Refusal::ConnectionLimit)
    } else if let Some(name) = identity {
        // The certificate vouches for the client: its CN is the username, and no
        // password is checked.
        c.username = Some(name.into());
        c.password = None;
        Ok(())
    } else if access.costly(c) {
        // Hashing takes milliseconds: off the runtime's threads.
        let c = c.clone();
        tokio::task::spawn_blocking(move || access.check_as(&c, anonymous))
            .await
            .unwrap_or(Err(Refusal::ServerUnavailable))
    } else {
        access.check_as(c, anonymous)
    }
}
