//! The tokio server around the sans-IO core: listeners (TCP, TLS, WebSocket, both), one
//! task per connection that reads and decodes, and one core task that owns the [`Broker`]
//! and tells connections what to write. Each connection writes everything queued for it
//! in one buffer, one write per wakeup.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tern_codec::{DecodeError, Packet, Protocol};
use tern_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::Access;
use crate::core::{Admission, Broker, ConnId, Settings};

mod admin;
mod conn;
mod core_task;
mod line;
mod monitor;
mod transport;
mod writer;

pub use conn::COALESCE_BELOW;
pub use monitor::{Extra, Monitor, serve_monitor};
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
pub struct AccessControl(watch::Sender<Arc<Access>>, TopicControl);

/// Topic policies put in force while the server runs (`None`: the settings' own).
pub(crate) type TopicControl = watch::Sender<Option<Arc<[crate::core::TopicPolicy]>>>;

impl AccessControl {
    /// Starts with `access`.
    pub fn new(access: Access) -> AccessControl {
        AccessControl(
            watch::Sender::new(Arc::new(access)),
            watch::Sender::new(None),
        )
    }

    /// Puts `access` in force.
    pub fn replace(&self, access: Access) {
        self.0.send_replace(Arc::new(access));
    }

    /// Puts topic policies in force in place of the settings' (a reload): publishes
    /// accepted from the core's next input on follow them.
    pub fn replace_topic_policies(&self, topics: Vec<crate::core::TopicPolicy>) {
        self.1.send_replace(Some(topics.into()));
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
    /// The NATS cluster this broker is a node of, if any (docs/cluster.md); the core's
    /// `Settings::cluster` must be set with it.
    pub cluster: Option<tern_cluster::Config>,
}

/// What the connections have read and handed to the core that the core has not yet taken,
/// weighed in bytes: past [`INBOX_HIGH`] the connections stop reading (TCP holds what the
/// clients send) until the core is back under [`INBOX_LOW`], so a core that falls behind
/// (a flood, a slow machine) bounds memory instead of queueing without end.
pub(crate) struct Inbox {
    bytes: AtomicUsize,
    room: tokio::sync::Notify,
}

/// Bytes waiting for the core past which connections stop reading.
pub(crate) const INBOX_HIGH: usize = 32 << 20;
/// ... and under which they read again.
pub(crate) const INBOX_LOW: usize = 16 << 20;

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            bytes: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
        }
    }

    /// A connection handed the core `n` bytes' worth.
    pub(crate) fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    /// The core took `n` bytes' worth. (Never below zero: a count that wrapped would stop
    /// every connection's reading for good.)
    pub(crate) fn take(&self, n: usize) {
        let before = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap_or(0);
        if before >= INBOX_LOW && before.saturating_sub(n) < INBOX_LOW {
            self.room.notify_waiters();
        }
    }

    /// Whether connections should stop reading.
    pub(crate) fn full(&self) -> bool {
        self.bytes.load(Ordering::Acquire) >= INBOX_HIGH
    }

    /// Waits until the core is back under [`INBOX_LOW`].
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.bytes.load(Ordering::Acquire) < INBOX_LOW {
                return;
            }
            notified.await;
        }
    }
}

/// What packets weigh in the core's inbox: their topics and payloads and a fixed part each.
pub(crate) fn inbox_weight<'a>(packets: impl IntoIterator<Item = &'a Packet>) -> usize {
    packets
        .into_iter()
        .map(|p| {
            64 + match p {
                Packet::Publish(p) => p.topic.as_str().len() + p.payload.len(),
                _ => 0,
            }
        })
        .sum()
}

/// Queued messages of one session read back from the store: the load they answer, the
/// messages with the shared subscription each came through.
pub(crate) type Loaded = (crate::core::Load, tern_store::QueuePart);

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
    /// Queued messages read back from the store: the answer to a `Load`.
    Loaded(Box<Loaded>),
    /// The metrics endpoint asks for the core's gauges.
    Gauges(tokio::sync::oneshot::Sender<Gauges>),
    /// The admin API asks about the sessions.
    Admin(admin::Query, tokio::sync::oneshot::Sender<admin::Answer>),
    /// QoS 0 messages from the cluster.
    Remote(Vec<crate::core::Remote>),
    /// QoS 1/2 messages of the cluster's stream, through this sequence.
    RemoteDurable(u64, Vec<crate::core::Remote>),
    /// The client connected to another node of the cluster after its connection here.
    TakenOver(String),
    /// Another node has this client, which this run never had here.
    Elsewhere(String),
    /// This cluster node is cut off from NATS (`true`) or back (`false`).
    CutOff(bool),
    /// The cluster's retained messages (an empty one clears its topic), to keep.
    Retained(Vec<tern_proto::Message>),
    /// The will of a client of a cluster node that is gone, to publish as that client's.
    ClusterWill(Box<tern_cluster::wills::Will>),
    /// Another cluster node asks for this client's session.
    Give(
        String,
        tokio::sync::oneshot::Sender<Option<tern_cluster::moves::Given>>,
    ),
    /// The answer to a fetch of this client's session: moved here, nothing to move, or
    /// (`Err`) not available now; with the client table's revision the fetch read.
    Moved(String, MovedAnswer),
    /// The answer to a claim made before a client is answered: whether it holds.
    Claimed(String, bool),
    Shutdown,
}

/// A fetched session (or none) with the client table's revision read; `Err`: none now.
type MovedAnswer = Result<(Option<Box<crate::core::MovedIn>>, Option<u64>), ()>;

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
/// An error here means the store could not be read, or a part of the broker failed.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    persistence: Option<Persistence>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server {
        listeners: vec![Listener::tcp(listener)],
        settings,
        persistence,
        access: AccessControl::new(access),
        max_connections: None,
        monitor: Monitor::new(),
        sys_interval: None,
        cluster: None,
    };
    run(server, shutdown).await
}

/// Why [`run`] stopped other than by its shutdown.
#[derive(Debug)]
pub enum ServerError {
    /// The store could not be read at startup.
    Load(StoreError),
    /// A part of the broker stopped working (the core task or the storage writer died, or
    /// the store could not be read back after a failed commit): the broker stops, not
    /// ready, so that a supervisor restarts it, rather than stay up answering nothing.
    Failed(String),
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerError::Load(e) => write!(f, "cannot load the stored state: {e}"),
            ServerError::Failed(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for ServerError {}

impl From<StoreError> for ServerError {
    fn from(e: StoreError) -> Self {
        ServerError::Load(e)
    }
}

/// Serves MQTT on every listener of `server` until `shutdown` completes, as [`serve`].
/// Fail-stop: if the core task or the storage writer dies, readiness goes false and this
/// returns [`ServerError::Failed`] at once (the process should exit non-zero).
pub async fn run(server: Server, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let Server {
        listeners,
        settings,
        persistence,
        access,
        max_connections,
        monitor,
        sys_interval,
        cluster,
    } = server;
    let metrics = monitor.metrics().clone();
    let mut acl_changes = access.0.subscribe();
    let topic_changes = access.1.subscribe();
    let (to_core, from_conns) = mpsc::unbounded_channel::<ToCore>();
    let connect_timeout = settings.connect_timeout;
    let max_packet_size = settings.max_packet_size;
    let write_backlog = settings.max_write_backlog;
    let mut settings = settings;
    if persistence.is_none() {
        // Nothing to read queues back from: they stay in memory.
        settings.queue_window = None;
    }
    let lazy = settings.queue_window.is_some();
    let snapshot = match &persistence {
        Some(p) if lazy => p.store.load_spilled()?,
        Some(p) => p.store.load()?,
        None => Default::default(),
    };
    let core_settings = settings.clone();
    let mut broker = Broker::resume(settings, snapshot, Instant::now(), SystemTime::now());
    let broker_applied = broker.cluster_applied();
    broker.set_acl(acl_changes.borrow_and_update().acl.clone());
    // Whatever dies reports here (the storage writer thread's panic guard).
    let (fatal, mut fatal_rx) = mpsc::unbounded_channel::<String>();
    // A cluster node reads the sessions it gives to other nodes beside the writer.
    let exporter = match (&persistence, &cluster) {
        (Some(p), Some(_)) => p.store.reader().map(|r| Arc::new(std::sync::Mutex::new(r))),
        _ => None,
    };
    let writer = persistence
        .map(|p| writer::Writer::spawn(p, lazy, to_core.clone(), metrics.clone(), fatal.clone()));
    let core_metrics = metrics.clone();
    let inbox = Arc::new(Inbox::new());
    let mut cluster_ready = None;
    let cluster = match cluster {
        Some(_) if writer.is_none() => {
            return Err(ServerError::Failed(
                "a cluster node needs its store (durability sync or batched)".into(),
            ));
        }
        Some(config) => {
            tracing::info!(nats = %config.urls.join(","), node = %config.node_id, "cluster: connecting to NATS");
            let client = tern_cluster::connect(&config)
                .await
                .map_err(|e| ServerError::Failed(e.to_string()))?;
            let (tx, rx) = mpsc::unbounded_channel();
            let to_core = to_core.clone();
            let applied = broker_applied;
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            cluster_ready = Some(ready_rx);
            let fed: tern_cluster::Fed = Arc::new(broker.has_fed().into());
            tokio::spawn(tern_cluster::run(
                client,
                config,
                (applied, fed),
                rx,
                ready_tx,
                move |inbound| {
                    let remote = |batch: Vec<tern_cluster::Remote>| -> Vec<crate::core::Remote> {
                        batch
                            .into_iter()
                            .map(|r| crate::core::Remote {
                                message: r.message,
                                plain: r.plain,
                                shared: r.shared,
                                earlier: r.earlier,
                                source: r.source.map(|s| crate::core::Source {
                                    seq: s.seq,
                                    node: s.node,
                                    number: s.number,
                                    own: s.own,
                                    publisher: s.publisher,
                                    handed: s.handed,
                                }),
                            })
                            .collect()
                    };
                    let _ = to_core.send(match inbound {
                        tern_cluster::Inbound::Remote(batch) => ToCore::Remote(remote(batch)),
                        tern_cluster::Inbound::Durable(last, batch) => {
                            ToCore::RemoteDurable(last, remote(batch))
                        }
                        tern_cluster::Inbound::Retained(batch) => ToCore::Retained(batch),
                        tern_cluster::Inbound::TakenOver(client_id) => ToCore::TakenOver(client_id),
                        tern_cluster::Inbound::Elsewhere(client_id) => ToCore::Elsewhere(client_id),
                        tern_cluster::Inbound::CutOff(cut) => ToCore::CutOff(cut),
                        tern_cluster::Inbound::Will(w) => ToCore::ClusterWill(Box::new(w)),
                        tern_cluster::Inbound::Give(client_id, reply) => ToCore::Give(client_id, reply),
                        tern_cluster::Inbound::Moved(client_id, fetched) => {
                            let moved = match fetched {
                                tern_cluster::moves::Fetched::Moved(a) => {
                                    let a = *a;
                                    match tern_store::Exported::decode(
                                        &a.given.session,
                                        Instant::now(),
                                        SystemTime::now(),
                                    ) {
                                        Ok(mut session) => {
                                            session.cluster_applied = a.given.applied;
                                            session.cluster_forwarded = a.given.forwarded;
                                            Ok((
                                                Some(Box::new(crate::core::MovedIn {
                                                    session,
                                                    from: a.from,
                                                    catch_up: remote(a.catch_up),
                                                })),
                                                Some(a.revision),
                                            ))
                                        }
                                        Err(e) => {
                                            tracing::error!(error = %e, client_id = %client_id, "cluster: a session from another node is unreadable: the client is refused");
                                            Err(())
                                        }
                                    }
                                }
                                tern_cluster::moves::Fetched::Nothing(revision) => Ok((None, revision)),
                                tern_cluster::moves::Fetched::Unavailable => Err(()),
                            };
                            ToCore::Moved(client_id, moved)
                        }
                        tern_cluster::Inbound::Claimed(client_id, claimed) => {
                            ToCore::Claimed(client_id, claimed)
                        }
                    });
                },
            ));
            Some(tx)
        }
        None => None,
    };
    let task = core_task::CoreTask {
        inbox: inbox.clone(),
        broker,
        from_conns,
        acl_changes,
        topic_changes,
        writer,
        core_metrics,
        core_settings,
        sys_interval,
        cluster,
        exporter,
    };
    let mut core = tokio::spawn(task.run());
    // A cluster node serves once it has applied what the stream held when it started
    // (its own messages whose round a crash lost are redone first), or after 30 s.
    if let Some(ready) = cluster_ready
        && tokio::time::timeout(std::time::Duration::from_secs(30), ready)
            .await
            .is_err()
    {
        tracing::warn!("cluster: not caught up with the stream after 30 s: serving anyway");
    }

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
            write_backlog,
            open: AtomicUsize::new(0),
            max_connections: l.max_connections,
            name: name.clone(),
            counts: Arc::new(ConnCounts::default()),
            metrics: metrics.clone(),
            to_core: to_core.clone(),
            inbox: inbox.clone(),
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
                tokio::spawn(conn::connection(Box::new(conn::Accepted {
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
    let failure = tokio::select! {
        () = shutdown => None,
        ended = &mut core => Some(match ended {
            Ok(()) => "the core task stopped (the store could not be read back)".to_string(),
            Err(e) => format!("the core task died: {e}"),
        }),
        Some(why) = fatal_rx.recv() => Some(why),
    };
    // Not ready from the moment shutdown begins: load balancers stop sending clients.
    monitor.set_ready(false);
    if let Some(why) = failure {
        tracing::error!(%why, "a part of the broker failed: not ready, stopping (run it under a supervisor that restarts it)");
        monitor.attach(None);
        for a in &accepting {
            a.abort();
        }
        core.abort();
        return Err(ServerError::Failed(why));
    }
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

/// What connections of one listener share.
struct ListenerCtx {
    transport: Transport,
    allow_anonymous: Option<bool>,
    cert_username: bool,
    write_coalesce: Option<Duration>,
    access: watch::Receiver<Arc<Access>>,
    connect_timeout: Duration,
    max_packet_size: u32,
    /// Bytes waiting to be written to a connection past which it is not read from (so a
    /// client that never reads cannot pile up its acknowledgements without bound).
    write_backlog: usize,
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
    /// How much of it waits (backpressure).
    inbox: Arc<Inbox>,
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
