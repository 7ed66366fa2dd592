//! Tern's MQTT client (3.1.1 and 5.0, over TCP) on the sans-IO engine `tern-proto`.
//!
//! The application picks a QoS per message; the client does the acknowledgements, the
//! retransmissions after a reconnect (DUP, same packet ids) and the QoS 2 deduplication.
//! A publish resolves when its guarantee is met: QoS 0 once written to the socket, QoS 1 on
//! PUBACK, QoS 2 on PUBCOMP, with the reason code the broker gave.
//!
//! ```no_run
//! # async fn run() -> Result<(), tern_client::Error> {
//! use tern_client::{Client, Event, Options, QoS};
//!
//! let (client, mut events) = Client::connect(Options::new("127.0.0.1", 1883, "meter-7")).await?;
//! client.subscribe("prices/#", QoS::AtLeastOnce).await?;
//! client.publish("telemetry/meter-7", "21.5").await?; // QoS 0
//! client.publish("payments/42", "paid").qos(QoS::ExactlyOnce).await?; // once, and only once
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {:?}", m.topic.as_str(), m.payload);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod dedup;
mod outbox;
mod transport;

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_codec::{
    Connect, Packet, PacketId, Str, Subscribe, Subscription, TopicFilter, Unsubscribe,
};
use tern_proto::{AckMode, Config, Connection, Role, SessionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

pub use dedup::Dedup;
pub use tern_codec::properties::PublishProperties;
pub use tern_codec::{Protocol, QoS, ReasonCode, RetainHandling, SubscriptionOptions, TopicName};
pub use tern_proto::Message;
pub use transport::{TlsConfig, Transport};

/// How long a CONNECT may wait for its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnection after a lost connection: waits start at `initial`, double up to `max`,
/// each with up to 25 % random jitter.
///
/// ```
/// let b = tern_client::Backoff::default();
/// assert!(b.initial < b.max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// Where and how to connect.
///
/// ```
/// use std::time::Duration;
/// use tern_client::{Options, Protocol};
/// let options = Options::new("127.0.0.1", 1883, "sensor-1")
///     .protocol(Protocol::V5)
///     .persistent(Duration::from_secs(3600))
///     .credentials("alice", "secret");
/// assert!(!options.clean_start);
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    /// Host name or address of the broker.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The client identifier (empty: the broker assigns one; 3.1.1 needs a clean start).
    pub client_id: String,
    /// MQTT 3.1.1 or 5.0 (default).
    pub protocol: Protocol,
    /// Start a new session (default) rather than resume the stored one.
    pub clean_start: bool,
    /// How long the broker keeps the session after a disconnect (5.0; in 3.1.1 any
    /// non-zero value means a persistent session).
    pub session_expiry: Duration,
    /// Keep alive in seconds (0: none). Default 60.
    pub keep_alive: u16,
    /// Username.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// Reconnect after a lost connection (default), or end (`None`).
    pub reconnect: Option<Backoff>,
    /// QoS 1/2 publishes that may wait while the connection is down; beyond it a publish
    /// fails at once with [`Error::Backlog`].
    pub max_pending: usize,
    /// QoS 1/2 messages in flight at once towards a 3.1.1 broker (5.0 brokers say theirs).
    pub inflight: u16,
    /// Received messages that may wait in [`Events`] for the application. At this many the
    /// client stops reading from the broker until the application has taken half of them
    /// (keep alive goes on, with one read per keep alive for the PINGRESP): a slow
    /// application holds the broker back, as TCP does, instead of growing without bound
    /// (the broker then holds or drops its copies by its own limits). One read's worth may
    /// come on top. While a publish, subscribe or unsubscribe of the application waits for
    /// the broker's answer, reading goes on, so an application that publishes from its
    /// event loop cannot deadlock. Default 10,000.
    pub max_unread: usize,
    /// A will: topic, payload, QoS, retain.
    pub will: Option<(String, Bytes, QoS, bool)>,
    /// What carries the bytes: TCP (default), TLS, WebSocket, WebSocket over TLS.
    pub transport: Transport,
    /// A file (redb) that keeps QoS 1/2 messages until the broker has acknowledged them,
    /// so they survive a restart of the client process (see [`Options::outbox`]).
    pub outbox: Option<PathBuf>,
    /// A user property stamped on every published message with a value unique to it
    /// (5.0 only), for a [`Dedup`] on the receiving side (see [`Options::stamp`]).
    pub stamp: Option<String>,
}

impl Options {
    /// Defaults for a broker at `host:port`.
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "sensor-1");
    /// assert!(o.clean_start && o.protocol.is_v5());
    /// ```
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Options {
        Options {
            host: host.into(),
            port,
            client_id: client_id.into(),
            protocol: Protocol::V5,
            clean_start: true,
            session_expiry: Duration::ZERO,
            keep_alive: 60,
            username: None,
            password: None,
            reconnect: Some(Backoff::default()),
            max_pending: 10_000,
            inflight: 32,
            max_unread: 10_000,
            will: None,
            transport: Transport::Tcp,
            outbox: None,
            stamp: None,
        }
    }

    /// Options from a URL: `mqtt://`, `mqtts://`, `ws://` or `wss://`, with an optional
    /// `user:password@`, port (default 1883, 8883, 80, 443) and, for WebSocket, path
    /// (default `/mqtt`). TLS checks the broker against the system's CA bundle unless
    /// [`Options::tls`] says otherwise.
    ///
    /// ```
    /// use tern_client::{Options, Transport};
    /// let o = Options::from_url("ws://alice:secret@127.0.0.1:8080/mqtt", "dash-1")?;
    /// assert_eq!((o.host.as_str(), o.port), ("127.0.0.1", 8080));
    /// assert_eq!(o.username.as_deref(), Some("alice"));
    /// assert!(matches!(o.transport, Transport::Ws { ref path } if path == "/mqtt"));
    /// assert!(Options::from_url("http://example.com", "x").is_err());
    /// # Ok::<(), tern_client::Error>(())
    /// ```
    pub fn from_url(url: &str, client_id: impl Into<String>) -> Result<Options, Error> {
        let bad = |why: &str| Error::Url(format!("{url}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://host[:port]"))?;
        let (default_port, tls, ws) = match scheme {
            "mqtt" | "tcp" => (1883, false, false),
            "mqtts" | "ssl" | "tls" => (8883, true, false),
            "ws" => (80, false, true),
            "wss" => (443, true, true),
            _ => return Err(bad("the scheme must be mqtt, mqtts, ws or wss")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p.parse().map_err(|_| bad("the port must be 1-65535"))?,
        };
        let mut options = Options::new(host, port, client_id);
        if let Some(u) = userinfo {
            let (user, password) = match u.split_once(':') {
                Some((user, pw)) => (user, Some(pw)),
                None => (u, None),
            };
            options.username = Some(user.to_string());
            options.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
        }
        if tls {
            options = options.tls(TlsConfig::from_files(None, None, None)?);
        }
        if ws {
            options = options.websocket(if path.is_empty() { "/mqtt" } else { path });
        }
        Ok(options)
    }

    /// Connects over TLS checked with `tls` (keeping WebSocket if chosen).
    ///
    /// ```no_run
    /// # use std::path::Path;
    /// use tern_client::{Options, TlsConfig};
    /// let tls = TlsConfig::from_files(Some(Path::new("ca.pem")), None, None)?;
    /// let options = Options::new("broker.example", 8883, "meter-7").tls(tls);
    /// # Ok::<(), tern_client::Error>(())
    /// ```
    pub fn tls(mut self, tls: TlsConfig) -> Options {
        self.transport = match self.transport {
            Transport::Ws { path } | Transport::Wss { path, .. } => Transport::Wss { tls, path },
            Transport::Tcp | Transport::Tls(_) => Transport::Tls(tls),
        };
        self
    }

    /// Carries MQTT in WebSocket frames, upgrading at `path` (keeping TLS if chosen).
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 8080, "dash").websocket("/mqtt");
    /// assert_eq!(o.transport.name(), "ws");
    /// ```
    pub fn websocket(mut self, path: impl Into<String>) -> Options {
        let path = path.into();
        self.transport = match self.transport {
            Transport::Tls(tls) | Transport::Wss { tls, .. } => Transport::Wss { tls, path },
            Transport::Tcp | Transport::Ws { .. } => Transport::Ws { path },
        };
        self
    }

    /// Keeps QoS 1/2 messages in the file at `path` (created if missing) until the broker
    /// acknowledges them: each is written there before it is sent, and a client started
    /// again with the same file and client identifier sends what the last process left
    /// unacknowledged, with the original packet ids when the broker still has the session
    /// (use [`Options::persistent`]), as new messages otherwise. Inbound QoS 2 ids are kept
    /// too, so a message received just before a crash is not delivered twice. One process
    /// at a time may use a file.
    ///
    /// ```
    /// use std::time::Duration;
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "till-3")
    ///     .persistent(Duration::from_secs(86_400))
    ///     .outbox("till-3.outbox");
    /// assert!(o.outbox.is_some());
    /// ```
    pub fn outbox(mut self, path: impl Into<PathBuf>) -> Options {
        self.outbox = Some(path.into());
        self
    }

    /// Stamps every published message with the user property `key` (often `msg-id`)
    /// set to a value no other message of any client shares (client identifier, start
    /// time, counter), unless the message already carries it. A [`Dedup`] on the
    /// receiving side then drops QoS 1 redeliveries. MQTT 5.0 only: 3.1.1 has no
    /// properties, and nothing is stamped.
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "chat-1").stamp("msg-id");
    /// assert_eq!(o.stamp.as_deref(), Some("msg-id"));
    /// ```
    pub fn stamp(mut self, key: impl Into<String>) -> Options {
        self.stamp = Some(key.into());
        self
    }

    /// Uses MQTT `protocol` (3.1.1 or 5.0).
    ///
    /// ```
    /// use tern_client::{Options, Protocol};
    /// let o = Options::new("127.0.0.1", 1883, "old-device").protocol(Protocol::V3_1_1);
    /// assert!(!o.protocol.is_v5());
    /// ```
    pub fn protocol(mut self, protocol: Protocol) -> Options {
        self.protocol = protocol;
        self
    }

    /// A persistent session the broker keeps for `expiry` after a disconnect, resumed on
    /// every connection (no clean start).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "ledger").persistent(Duration::from_secs(3600));
    /// assert!(!o.clean_start);
    /// ```
    pub fn persistent(mut self, expiry: Duration) -> Options {
        self.clean_start = false;
        self.session_expiry = expiry;
        self
    }

    /// Username and password.
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "a").credentials("alice", "secret");
    /// assert_eq!(o.username.as_deref(), Some("alice"));
    /// ```
    pub fn credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<Bytes>,
    ) -> Options {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Keep alive in seconds.
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "a").keep_alive(30);
    /// assert_eq!(o.keep_alive, 30);
    /// ```
    pub fn keep_alive(mut self, seconds: u16) -> Options {
        self.keep_alive = seconds;
        self
    }

    /// Reconnect policy (`None`: a lost connection ends the client).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tern_client::{Backoff, Options};
    /// let quick = Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(5) };
    /// let o = Options::new("127.0.0.1", 1883, "a").reconnect(Some(quick));
    /// let once = Options::new("127.0.0.1", 1883, "b").reconnect(None); // a lost connection ends it
    /// ```
    pub fn reconnect(mut self, backoff: Option<Backoff>) -> Options {
        self.reconnect = backoff;
        self
    }

    /// Received messages that may wait for the application before the client stops
    /// reading from the broker ([`Options::max_unread`]).
    ///
    /// ```
    /// let o = tern_client::Options::new("127.0.0.1", 1883, "a").max_unread(500);
    /// assert_eq!(o.max_unread, 500);
    /// ```
    pub fn max_unread(mut self, messages: usize) -> Options {
        self.max_unread = messages;
        self
    }

    fn connect_packet(&self, clean_start: bool) -> Connect {
        let mut c = Connect::new(self.protocol, self.client_id.as_str());
        c.clean_start = clean_start;
        c.keep_alive = self.keep_alive;
        c.username = self.username.as_deref().map(Into::into);
        c.password = self.password.clone();
        if self.protocol.is_v5() && !self.session_expiry.is_zero() {
            c.properties.session_expiry_interval =
                Some(self.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32);
        }
        if let Some((topic, payload, qos, retain)) = &self.will
            && let Ok(topic) = TopicName::new(topic.as_str())
        {
            c.will = Some(tern_codec::LastWill {
                topic,
                payload: payload.clone(),
                qos: *qos,
                retain: *retain,
                properties: Default::default(),
            });
        }
        c
    }
}

/// What went wrong.
///
/// ```no_run
/// # async fn run() {
/// use tern_client::{Client, Error, Options};
/// match Client::connect(Options::new("127.0.0.1", 1883, "a")).await {
///     Ok(_) => {}
///     Err(Error::Refused(reason)) => eprintln!("refused: {reason:?}"),
///     Err(e) => eprintln!("{e}"), // names the address, the file or the reason
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The broker refused the CONNECT.
    #[error("the broker refused the connection: {}", describe(*.0))]
    Refused(ReasonCode),
    /// No CONNACK came in time, or the broker answered with something else.
    #[error("no CONNACK from {0} within 10 s")]
    NoConnAck(String),
    /// The connection is down (and not coming back, or the message cannot wait).
    #[error("the connection is closed")]
    Closed,
    /// Too many publishes are waiting for the connection ([`Options::max_pending`]).
    #[error("too many publishes waiting for the connection")]
    Backlog,
    /// The message was not sent.
    #[error("the message was dropped: {0}")]
    Dropped(&'static str),
    /// A topic or filter that MQTT does not allow.
    #[error("invalid topic or filter '{0}'")]
    Topic(String),
    /// TLS could not be set up (certificate files).
    #[error("TLS: {0}")]
    Tls(String),
    /// A URL that [`Options::from_url`] cannot use.
    #[error("bad URL {0}")]
    Url(String),
    /// The outbox file could not be opened, read or written.
    #[error("outbox: {0}")]
    Outbox(String),
}

fn describe(r: ReasonCode) -> String {
    let hint = match r {
        ReasonCode::BadUserNameOrPassword => " (bad username or password)",
        ReasonCode::NotAuthorized => " (not authorized)",
        ReasonCode::ClientIdentifierNotValid => " (client identifier not valid)",
        ReasonCode::ServerUnavailable => " (server unavailable)",
        ReasonCode::UnsupportedProtocolVersion => " (protocol version not supported)",
        _ => "",
    };
    format!("{r:?} (0x{:02X}){hint}", r as u8)
}

/// What the client tells the application (see [`Events::recv`] for a loop over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection is up; `session_present`: the broker resumed the session.
    Connected {
        /// Whether the broker had the session.
        session_present: bool,
    },
    /// A message from a subscription (acknowledged to the broker already).
    Message(Message),
    /// The connection was lost (the client reconnects if configured to).
    Disconnected {
        /// What happened.
        reason: String,
    },
}

/// The stream of [`Event`]s, returned by [`Client::connect`] (see [`Events::recv`]).
pub struct Events {
    /// The client task hands over the messages of one read together: one channel
    /// operation per read, not per message.
    rx: mpsc::UnboundedReceiver<Vec<Event>>,
    /// Handed over, not yet returned.
    ready: std::collections::VecDeque<Event>,
    unread: Arc<Unread>,
}

/// The client task's end of [`Events`].
struct EventTx {
    tx: mpsc::UnboundedSender<Vec<Event>>,
    unread: Arc<Unread>,
}

/// Messages handed to [`Events`] and not yet taken by the application
/// ([`Options::max_unread`]).
struct Unread {
    count: AtomicUsize,
    limit: usize,
    /// Signalled when the count falls to half the limit.
    drained: Notify,
}

impl EventTx {
    /// Hands `batch` to the application (dropped if it has dropped [`Events`]).
    fn send(&self, batch: Vec<Event>) {
        let messages = batch
            .iter()
            .filter(|e| matches!(e, Event::Message(_)))
            .count();
        self.unread.count.fetch_add(messages, Ordering::Relaxed);
        if self.tx.send(batch).is_err() {
            // Nobody reads: nothing waits.
            self.unread.count.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the application has `max_unread` messages or more still to take.
    fn full(&self) -> bool {
        self.unread.count.load(Ordering::Relaxed) >= self.unread.limit && !self.tx.is_closed()
    }
}

impl Events {
    /// The next event; `None` once the client has ended.
    ///
    /// ```no_run
    /// # async fn run(mut events: tern_client::Events) {
    /// use tern_client::Event;
    /// while let Some(event) = events.recv().await {
    ///     match event {
    ///         Event::Message(m) => println!("{}", m.topic.as_str()),
    ///         Event::Connected { session_present } => println!("up, resumed: {session_present}"),
    ///         Event::Disconnected { reason } => println!("down: {reason}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                if matches!(e, Event::Message(_)) {
                    let before = self.unread.count.fetch_sub(1, Ordering::Relaxed);
                    if before.saturating_sub(1) == self.unread.limit / 2 {
                        self.unread.drained.notify_one();
                    }
                }
                return Some(e);
            }
            let batch = self.rx.recv().await?;
            self.ready.extend(batch);
        }
    }

    /// Messages received from the broker that the application has yet to take with
    /// [`Events::recv`] (see [`Options::max_unread`]).
    pub fn unread(&self) -> usize {
        self.unread.count.load(Ordering::Relaxed)
    }
}

type Done<T> = oneshot::Sender<Result<T, Error>>;

enum Command {
    Publish(Message, Done<ReasonCode>),
    Subscribe(Vec<Subscription>, Done<Vec<ReasonCode>>),
    Unsubscribe(Vec<TopicFilter>, Done<Vec<ReasonCode>>),
    Disconnect(oneshot::Sender<()>),
    Idle(oneshot::Sender<()>),
}

/// What [`Options::stamp`] writes.
struct Stamp {
    key: Str,
    prefix: String,
    next: AtomicU64,
}

/// A handle on the connection; cheap to clone, usable from any task.
///
/// ```no_run
/// # async fn run(client: tern_client::Client) {
/// let c = client.clone();
/// tokio::spawn(async move { c.publish("from/another/task", "hi").await });
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    stamp: Option<Arc<Stamp>>,
}

impl Client {
    /// Connects, and keeps the connection (reconnecting as [`Options::reconnect`] says).
    /// The first connection must succeed: its error is returned. With an
    /// [`Options::outbox`], what the file holds is sent first.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tern_client::Error> {
    /// use tern_client::{Client, Event, Options};
    /// let (client, mut events) = Client::connect(Options::new("127.0.0.1", 1883, "a")).await?;
    /// assert!(matches!(events.recv().await, Some(Event::Connected { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(options: Options) -> Result<(Client, Events), Error> {
        let (outbox, mut state) = match &options.outbox {
            Some(path) => {
                let (o, s) = outbox::Outbox::open(path.clone(), &options.client_id).await?;
                (Some(o), s)
            }
            None => (None, SessionState::new()),
        };
        // Messages left by an earlier process are handled like those of a connection that
        // was lost: resumed if the broker kept the session, sent as new otherwise.
        let restored = state.inflight_len() > 0 || state.queued_len() > 0;
        let link = Link::open(&options, options.clean_start, &mut state, restored).await?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (tx, events_rx) = mpsc::unbounded_channel();
        let unread = Arc::new(Unread {
            count: AtomicUsize::new(0),
            limit: options.max_unread.max(1),
            drained: Notify::new(),
        });
        let events_tx = EventTx {
            tx,
            unread: unread.clone(),
        };
        events_tx.send(vec![Event::Connected {
            session_present: link.session_present,
        }]);
        let events = Events {
            rx: events_rx,
            ready: Default::default(),
            unread,
        };
        let stamp = match (&options.stamp, options.protocol.is_v5()) {
            (Some(key), true) => {
                let boot = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                Some(Arc::new(Stamp {
                    key: key.as_str().into(),
                    prefix: format!("{}-{boot:x}-", options.client_id),
                    next: AtomicU64::new(1),
                }))
            }
            _ => None,
        };
        tokio::spawn(drive(options, link, outbox, rx, events_tx));
        Ok((Client { commands, stamp }, events))
    }

    /// Waits until every QoS 1/2 message published so far (and any restored from the
    /// outbox) is acknowledged: nothing in flight, nothing waiting. Fails with
    /// [`Error::Closed`] if the client ends first.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.wait_idle().await?; // safe to exit now
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_idle(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Idle(tx))?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Publishes `payload` on `topic`: QoS 0 and no retain unless the returned builder
    /// says otherwise; await it for the outcome.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::{QoS, ReasonCode};
    /// client.publish("telemetry/t1", "21.5").await?; // QoS 0
    /// let r = client.publish("orders/1", "paid").qos(QoS::ExactlyOnce).await?;
    /// assert!(!r.is_error());
    /// # Ok(())
    /// # }
    /// ```
    pub fn publish(&self, topic: impl Into<String>, payload: impl Into<Bytes>) -> Publish<'_> {
        Publish {
            client: self,
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        }
    }

    /// Subscribes to `filter` at `qos`; the broker's answer (granted QoS or a refusal).
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::{QoS, ReasonCode};
    /// let granted = client.subscribe("sensors/+/temperature", QoS::AtLeastOnce).await?;
    /// assert_eq!(granted, ReasonCode::GrantedQos1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<ReasonCode, Error> {
        let options = SubscriptionOptions {
            qos,
            ..Default::default()
        };
        let codes = self.subscribe_with(&[(filter, options)]).await?;
        Ok(codes
            .first()
            .copied()
            .unwrap_or(ReasonCode::UnspecifiedError))
    }

    /// Subscribes to several filters with full 5.0 options in one SUBSCRIBE.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::{QoS, RetainHandling, SubscriptionOptions};
    /// let fresh = SubscriptionOptions {
    ///     qos: QoS::ExactlyOnce,
    ///     no_local: true,
    ///     retain_handling: RetainHandling::DoNotSend,
    ///     ..Default::default()
    /// };
    /// let codes = client.subscribe_with(&[("orders/#", fresh)]).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe_with(
        &self,
        filters: &[(&str, SubscriptionOptions)],
    ) -> Result<Vec<ReasonCode>, Error> {
        let mut subscriptions = Vec::with_capacity(filters.len());
        for (f, options) in filters {
            let filter = TopicFilter::new(*f).map_err(|_| Error::Topic(f.to_string()))?;
            subscriptions.push(Subscription {
                filter,
                options: *options,
            });
        }
        let (tx, rx) = oneshot::channel();
        self.send(Command::Subscribe(subscriptions, tx))?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Unsubscribes from `filter`.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.unsubscribe("sensors/+/temperature").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unsubscribe(&self, filter: &str) -> Result<ReasonCode, Error> {
        let f = TopicFilter::new(filter).map_err(|_| Error::Topic(filter.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unsubscribe(vec![f], tx))?;
        let codes = rx.await.unwrap_or(Err(Error::Closed))?;
        Ok(codes.first().copied().unwrap_or(ReasonCode::Success))
    }

    /// Sends DISCONNECT once everything before it is written, and ends the client.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.disconnect().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn disconnect(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Disconnect(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    fn send(&self, c: Command) -> Result<(), Error> {
        self.commands.send(c).map_err(|_| Error::Closed)
    }
}

/// A publish being built by [`Client::publish`]; `.await` it to send it and learn the
/// outcome, or [`Publish::send`] it and await the [`Outcome`] later.
pub struct Publish<'a> {
    client: &'a Client,
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    properties: tern_codec::properties::PublishProperties,
}

impl Publish<'_> {
    /// At this QoS.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.publish("chat/room-1", "hi").qos(tern_client::QoS::AtLeastOnce).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// With the retain flag.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.publish("lamp/state", "on").retain(true).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// With these 5.0 properties (Message Expiry Interval, User Properties, ...).
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// let mut p = tern_client::PublishProperties::default();
    /// p.message_expiry_interval = Some(60); // gone if not delivered within a minute
    /// p.user_properties.push(("trace".into(), "abc".into()));
    /// client.publish("alerts/1", "smoke").properties(p).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn properties(mut self, properties: tern_codec::properties::PublishProperties) -> Self {
        self.properties = properties;
        self
    }
}

impl Publish<'_> {
    /// Hands the message to the client now, in call order, and returns its outcome to
    /// await later: many publishes can be under way at once and still go out in the
    /// order they were sent. (`.await` on the builder is `send()?.await`.)
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::QoS;
    /// let mut outcomes = Vec::new();
    /// for i in 0..100 {
    ///     outcomes.push(client.publish("orders", format!("{i}")).qos(QoS::AtLeastOnce).send()?);
    /// }
    /// for o in outcomes {
    ///     o.await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn send(self) -> Result<Outcome, Error> {
        // Checked on the borrowed string, then the String itself becomes the topic: no copy.
        if TopicName::check(&self.topic).is_err() {
            return Err(Error::Topic(self.topic));
        }
        let topic = TopicName::new(self.topic).map_err(|e| Error::Topic(e.to_string()))?;
        let mut m = Message::new(topic, self.payload, self.qos);
        m.retain = self.retain;
        let mut properties = self.properties;
        if let Some(stamp) = &self.client.stamp
            && !properties
                .user_properties
                .iter()
                .any(|(k, _)| *k == stamp.key)
        {
            let n = stamp.next.fetch_add(1, Ordering::Relaxed);
            properties
                .user_properties
                .push((stamp.key.clone(), format!("{}{n}", stamp.prefix).into()));
        }
        if properties != Default::default() {
            m.properties = properties.into();
        }
        let (tx, rx) = oneshot::channel();
        self.client.send(Command::Publish(m, tx))?;
        Ok(Outcome(rx))
    }
}

impl<'a> IntoFuture for Publish<'a> {
    type Output = Result<ReasonCode, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let outcome = self.send();
        Box::pin(async move { outcome?.await })
    }
}

/// The outcome of a publish handed over with [`Publish::send`]: resolves when the
/// message's guarantee is met (or cannot be), with the broker's reason code.
///
/// ```no_run
/// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
/// let outcome = client.publish("a/b", "x").qos(tern_client::QoS::AtLeastOnce).send()?;
/// // ... other work ...
/// let reason = outcome.await?;
/// # Ok(())
/// # }
/// ```
pub struct Outcome(oneshot::Receiver<Result<ReasonCode, Error>>);

impl Future for Outcome {
    type Output = Result<ReasonCode, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

/// One connection with its engine.
struct Link {
    stream: Box<dyn transport::Io>,
    conn: Connection,
    read: BytesMut,
    session_present: bool,
    /// Messages of the previous session the broker no longer had: sent again as new.
    orphans: Vec<Message>,
}

impl Link {
    async fn open(
        options: &Options,
        clean_start: bool,
        held: &mut SessionState,
        established: bool,
    ) -> Result<Link, Error> {
        let addr = format!("{}:{}", options.host, options.port);
        let mut stream = transport::open(&options.transport, &options.host, options.port).await?;
        let connect = options.connect_packet(clean_start);
        let mut out = BytesMut::new();
        tern_codec::encode(
            &Packet::Connect(Box::new(connect.clone())),
            options.protocol,
            &mut out,
        )
        .map_err(|_| Error::Closed)?;
        async {
            stream.write_all(&out).await?;
            stream.flush().await
        }
        .await
        .map_err(|source| Error::Connect {
            addr: addr.clone(),
            source,
        })?;
        let mut read = BytesMut::with_capacity(4096);
        let ack = tokio::time::timeout(CONNACK_TIMEOUT, async {
            loop {
                match tern_codec::decode(&mut read, options.protocol, tern_codec::MAX_PACKET_SIZE) {
                    Ok(Some(Packet::ConnAck(a))) => return Some(a),
                    Ok(Some(_)) | Err(_) => return None,
                    Ok(None) => {}
                }
                match stream.read_buf(&mut read).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| Error::NoConnAck(addr.clone()))?;
        if ack.reason.is_error() {
            return Err(Error::Refused(ack.reason));
        }
        let config = Config::negotiate(
            Role::Client,
            &connect,
            &ack,
            AckMode::Immediate,
            options.inflight,
        );
        // Connected: the engine takes over the session state.
        let mut state = std::mem::replace(held, SessionState::new());
        let mut orphans = Vec::new();
        if established && !ack.session_present {
            // The broker lost the session: what was in flight or queued goes again, as
            // new messages (QoS 1: at least once still holds; QoS 2 may be doubled if
            // the broker had it, which the broker's loss makes unknowable).
            orphans = state.take_redeliverable(|_| true, true);
            state = SessionState::new();
        }
        let conn = Connection::new(config, state, ack.session_present, Instant::now());
        Ok(Link {
            stream,
            conn,
            read,
            session_present: ack.session_present,
            orphans,
        })
    }
}

/// Waiting publishes and requests, across connections.
#[derive(Default)]
struct Pending {
    /// QoS 1/2 publishes by tag.
    publishes: HashMap<u32, Done<ReasonCode>>,
    /// QoS 0 publishes queued to the socket, resolved after the next write.
    written: Vec<Done<ReasonCode>>,
    /// SUBSCRIBE / UNSUBSCRIBE by packet id.
    requests: HashMap<PacketId, Done<Vec<ReasonCode>>>,
    /// [`Client::wait_idle`] callers.
    idle: Vec<oneshot::Sender<()>>,
    next_tag: u32,
}

impl Pending {
    /// A tag for the next QoS 1/2 publish: never 0 (no tag), never one still pending
    /// (it wraps after 4 billion publishes).
    fn tag(&mut self) -> u32 {
        loop {
            self.next_tag = self.next_tag.wrapping_add(1);
            if self.next_tag != 0 && !self.publishes.contains_key(&self.next_tag) {
                return self.next_tag;
            }
        }
    }

    /// Answers the idle waiters if `session` has nothing in flight or waiting.
    fn check_idle(&mut self, session: &SessionState) {
        if !self.idle.is_empty() && session.inflight_len() == 0 && session.queued_len() == 0 {
            for done in self.idle.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

async fn drive(
    options: Options,
    mut link: Link,
    mut outbox: Option<outbox::Outbox>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: EventTx,
) {
    let mut pending = Pending::default();
    let mut out = BytesMut::new();
    let mut attempt = 0u32;
    loop {
        for m in std::mem::take(&mut link.orphans) {
            link.conn.publish(m, Instant::now());
        }
        let (reason, quit) = serve(
            &options,
            &mut link,
            &mut outbox,
            &mut commands,
            &events,
            &mut pending,
            &mut out,
        )
        .await;
        events.send(vec![Event::Disconnected {
            reason: reason.clone(),
        }]);
        for (_, done) in pending.requests.drain() {
            let _ = done.send(Err(Error::Closed));
        }
        for done in pending.written.drain(..) {
            let _ = done.send(Err(Error::Closed));
        }
        let mut state = link.conn.into_session();
        let backoff = match (quit, options.reconnect) {
            (false, Some(b)) => b,
            _ => {
                for (_, done) in pending.publishes.drain() {
                    let _ = done.send(Err(Error::Closed));
                }
                return;
            }
        };
        // Reconnect; publishes wait in the session's queue meanwhile (bounded).
        link = loop {
            let wait = delay(backoff, attempt);
            attempt = attempt.saturating_add(1);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    c = commands.recv() => match c {
                        None => return,
                        Some(Command::Disconnect(done)) => {
                            for (_, d) in pending.publishes.drain() {
                                let _ = d.send(Err(Error::Closed));
                            }
                            let _ = done.send(());
                            return;
                        }
                        Some(Command::Publish(mut m, done)) => {
                            if m.qos == QoS::AtMostOnce {
                                let _ = done.send(Err(Error::Closed));
                            } else if pending.publishes.len() >= options.max_pending {
                                let _ = done.send(Err(Error::Backlog));
                            } else {
                                m.tag = pending.tag();
                                let tag = m.tag;
                                state.enqueue(m);
                                // Kept before the caller learns it is waiting.
                                if let Some(o) = &mut outbox
                                    && let Err(e) = o.save(&mut state).await
                                {
                                    tracing::error!(error = %e, "the outbox cannot be written");
                                    let _ = done.send(Err(e));
                                    return;
                                }
                                pending.publishes.insert(tag, done);
                            }
                        }
                        Some(Command::Subscribe(_, done) | Command::Unsubscribe(_, done)) => {
                            let _ = done.send(Err(Error::Closed));
                        }
                        Some(Command::Idle(done)) => pending.idle.push(done),
                    }
                }
            }
            // A persistent session is resumed; otherwise each connection starts afresh
            // (and what waited is sent as new).
            let clean = options.session_expiry.is_zero();
            match Link::open(&options, clean, &mut state, true).await {
                Ok(l) => {
                    attempt = 0;
                    events.send(vec![Event::Connected {
                        session_present: l.session_present,
                    }]);
                    break l;
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        };
    }
}

fn delay(b: Backoff, attempt: u32) -> Duration {
    let base = b
        .initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(b.max);
    // Jitter without a random crate: the clock's nanoseconds.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 250) / 1000.0)
}

/// Runs one connection until it ends; the reason, and whether the application asked for
/// the end.
async fn serve(
    options: &Options,
    link: &mut Link,
    outbox: &mut Option<outbox::Outbox>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    events: &EventTx,
    pending: &mut Pending,
    out: &mut BytesMut,
) -> (String, bool) {
    let v = options.protocol;
    if outbox.is_some() {
        // A session that replaced a lost one is written whole.
        link.conn.session_mut().track(false);
    }
    loop {
        // Events first: they may resolve publishes and requests. Messages go to the
        // application together, once every event is seen.
        let mut messages = Vec::new();
        while let Some(e) = link.conn.poll_event() {
            match e {
                tern_proto::Event::Message { message, .. } => {
                    messages.push(Event::Message(message));
                }
                tern_proto::Event::Acknowledged {
                    message, reason, ..
                } => {
                    // PUBCOMP 0x92 answers a PUBREL resent after a cut: the broker had
                    // completed the flow (the session is the one that took the PUBREC),
                    // so the message was delivered, once.
                    let reason = match (message.qos, reason) {
                        (QoS::ExactlyOnce, ReasonCode::PacketIdentifierNotFound) => {
                            ReasonCode::Success
                        }
                        (_, r) => r,
                    };
                    if let Some(done) = pending.publishes.remove(&message.tag) {
                        let _ = done.send(Ok(reason));
                    }
                }
                tern_proto::Event::Dropped { message, reason } => {
                    let why = match reason {
                        tern_proto::DropReason::Expired => "expired before it could be sent",
                        tern_proto::DropReason::TooLarge => {
                            "larger than the broker's Maximum Packet Size"
                        }
                        tern_proto::DropReason::NotConnected => "not connected",
                    };
                    if let Some(done) = pending.publishes.remove(&message.tag) {
                        let _ = done.send(Err(Error::Dropped(why)));
                    }
                }
                tern_proto::Event::Control(Packet::SubAck(a)) => {
                    if let Some(done) = pending.requests.remove(&a.packet_id) {
                        let _ = done.send(Ok(a.reasons));
                    }
                }
                tern_proto::Event::Control(Packet::UnsubAck(a)) => {
                    if let Some(done) = pending.requests.remove(&a.packet_id) {
                        let _ = done.send(Ok(a.reasons));
                    }
                }
                tern_proto::Event::Control(_) => {}
                tern_proto::Event::Closed { reason, .. } => {
                    if !messages.is_empty() {
                        events.send(messages);
                    }
                    let _ = flush(link, out, v).await;
                    return (
                        format!("closed by the broker: {reason:?} (0x{:02X})", reason as u8),
                        false,
                    );
                }
            }
        }
        if !messages.is_empty() {
            events.send(messages);
        }
        pending.check_idle(link.conn.session());
        // Persist, then send: nothing goes out that a crash could forget.
        if let Some(o) = outbox
            && let Err(e) = o.save(link.conn.session_mut()).await
        {
            tracing::error!(error = %e, "the outbox cannot be written; the client stops");
            return (e.to_string(), true);
        }
        if flush(link, out, v).await.is_err() {
            return ("write failed: connection lost".into(), false);
        }
        for done in pending.written.drain(..) {
            let _ = done.send(Ok(ReasonCode::Success));
        }
        let timeout = link.conn.poll_timeout();
        let sleep = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        // The application has max_unread messages to take: read nothing more until it has
        // taken half (commands and keep alive go on), unless it waits for an answer, or the
        // PINGRESP is due (one read per keep alive, or the connection would be declared
        // dead).
        let awaited = !pending.publishes.is_empty()
            || !pending.requests.is_empty()
            || link.conn.session().inflight_len() > 0
            || link.conn.awaits_ping_response();
        let paused = !awaited && events.full();
        tokio::select! {
            () = events.unread.drained.notified(), if paused => {}
            read = link.stream.read_buf(&mut link.read), if !paused => {
                match read {
                    Ok(n) if n > 0 => {}
                    _ => return ("connection lost".into(), false),
                }
                // One clock reading per read, not per packet.
                let now = Instant::now();
                loop {
                    match tern_codec::decode(&mut link.read, v, tern_codec::MAX_PACKET_SIZE) {
                        Ok(Some(p)) => {
                            // A protocol error queues the DISCONNECT and a Closed event.
                            let _ = link.conn.handle_packet(p, now);
                        }
                        Ok(None) => break,
                        Err(e) => return (format!("malformed packet from the broker: {e}"), false),
                    }
                }
            }
            () = sleep => link.conn.handle_timeout(Instant::now()),
            c = commands.recv() => {
                // One clock reading for the whole batch of commands.
                let now = Instant::now();
                if let Some(end) = command(c, link, outbox, pending, out, v, now).await {
                    return end;
                }
                // Whatever else is already waiting goes into the same write.
                for _ in 0..1024 {
                    let Ok(c) = commands.try_recv() else { break };
                    if let Some(end) = command(Some(c), link, outbox, pending, out, v, now).await {
                        return end;
                    }
                }
            }
        }
    }
}

/// Carries out one command of the application; `Some` when the connection is to end.
async fn command(
    c: Option<Command>,
    link: &mut Link,
    outbox: &mut Option<outbox::Outbox>,
    pending: &mut Pending,
    out: &mut BytesMut,
    v: Protocol,
    now: Instant,
) -> Option<(String, bool)> {
    match c {
        None => {
            link.conn.disconnect(ReasonCode::Success);
            if let Some(o) = outbox {
                let _ = o.save(link.conn.session_mut()).await;
            }
            let _ = flush(link, out, v).await;
            return Some(("the client was dropped".into(), true));
        }
        Some(Command::Disconnect(done)) => {
            link.conn.disconnect(ReasonCode::Success);
            // Publishes handed over in this same turn are kept before they are sent.
            if let Some(o) = outbox {
                let _ = o.save(link.conn.session_mut()).await;
            }
            let _ = flush(link, out, v).await;
            let _ = link.stream.shutdown().await;
            for (_, d) in pending.publishes.drain() {
                let _ = d.send(Err(Error::Closed));
            }
            let _ = done.send(());
            return Some(("disconnected by the application".into(), true));
        }
        Some(Command::Publish(mut m, done)) => {
            if m.qos == QoS::AtMostOnce {
                link.conn.publish(m, now);
                pending.written.push(done);
            } else {
                m.tag = pending.tag();
                pending.publishes.insert(m.tag, done);
                link.conn.publish(m, now);
            }
        }
        Some(Command::Idle(done)) => pending.idle.push(done),
        Some(Command::Subscribe(subscriptions, done)) => {
            request(link, pending, out, v, done, |id| {
                Packet::Subscribe(Subscribe {
                    packet_id: id,
                    subscriptions,
                    properties: Default::default(),
                })
            })
        }
        Some(Command::Unsubscribe(filters, done)) => request(link, pending, out, v, done, |id| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters,
                properties: Default::default(),
            })
        }),
    }
    None
}

/// Sends a SUBSCRIBE or UNSUBSCRIBE under a fresh packet id; `done` gets the answer.
fn request(
    link: &mut Link,
    pending: &mut Pending,
    out: &mut BytesMut,
    v: Protocol,
    done: Done<Vec<ReasonCode>>,
    packet: impl FnOnce(PacketId) -> Packet,
) {
    match link.conn.session_mut().allocate_id() {
        Ok(id) => {
            pending.requests.insert(id, done);
            let _ = tern_codec::encode(&packet(id), v, out);
        }
        Err(_) => {
            let _ = done.send(Err(Error::Backlog));
        }
    }
}

/// Writes what the engine has to send (after anything already in `out`) in one write.
async fn flush(link: &mut Link, out: &mut BytesMut, v: Protocol) -> std::io::Result<()> {
    let now = Instant::now();
    while let Some(p) = link.conn.poll_transmit(now) {
        let _ = tern_codec::encode(&p, v, out);
    }
    if out.is_empty() {
        return Ok(());
    }
    let result = link.stream.write_all(out).await;
    out.clear();
    result?;
    link.stream.flush().await
}
