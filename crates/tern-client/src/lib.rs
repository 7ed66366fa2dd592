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

pub mod bridge;
mod dedup;
mod driver;
mod events;
mod options;
mod outbox;
mod publish;
mod state;
mod transport;

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_codec::{Connect, Packet, Str, Subscription, TopicFilter};
use tern_proto::SessionState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

pub use dedup::Dedup;
pub use tern_codec::properties::PublishProperties;
pub use tern_codec::{Protocol, QoS, ReasonCode, RetainHandling, SubscriptionOptions, TopicName};
pub use tern_proto::Message;
pub use transport::{TlsConfig, Transport};

use driver::{Link, drive};
pub use events::Event;

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
    /// Other brokers of the same cluster ([`Options::failover`]): each reconnection tries
    /// the next address in turn (`host:port`, then these, round and round), and a first
    /// connect tries them in order until one answers.
    pub failover: Vec<(String, u16)>,
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
    /// Our Receive Maximum in CONNECT (5.0): the bridge's flow control.
    pub(crate) receive_maximum: Option<std::num::NonZeroU16>,
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

use state::Done;

enum Command {
    Publish(Message, Done<ReasonCode>),
    Subscribe(
        Vec<Subscription>,
        tern_codec::Props<tern_codec::properties::SubscribeProperties>,
        Done<Vec<ReasonCode>>,
    ),
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
        let (outbox, state) = match &options.outbox {
            Some(path) => {
                let (o, s) = outbox::Outbox::open(path.clone(), &options.client_id).await?;
                (Some(o), s)
            }
            None => (None, SessionState::new()),
        };
        // Messages left by an earlier process are handled like those of a connection that
        // was lost: resumed if the broker kept the session, sent as new otherwise.
        let mut state = state::ClientState::new(state, options.max_pending, outbox.is_some());
        let restored = state.has_unfinished();
        // The first address that answers (each in order; the last one's error otherwise).
        let mut at = 0;
        let (link, session_present) = loop {
            match Link::open(&options, options.clean_start, &mut state, restored, at).await {
                Ok(opened) => break opened,
                Err(e) if at + 1 < options.addresses() => {
                    tracing::debug!(error = %e, "connect failed; trying the next address");
                    at += 1;
                }
                Err(e) => return Err(e),
            }
        };
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
        events_tx.send(vec![Event::Connected { session_present }]);
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
        tokio::spawn(drive(options, link, state, outbox, rx, events_tx));
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
        self.subscribe_with_properties(filters, &[]).await
    }

    /// As [`Client::subscribe_with`], with User Properties on the SUBSCRIBE (5.0), for
    /// example a Tern topic-history replay.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::{QoS, SubscriptionOptions};
    /// let options = SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() };
    /// // The last ten minutes of orders, then the live ones.
    /// client
    ///     .subscribe_with_properties(&[("orders/#", options)], &[("replay-since", "10m")])
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe_with_properties(
        &self,
        filters: &[(&str, SubscriptionOptions)],
        user_properties: &[(&str, &str)],
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
        let mut properties = tern_codec::Props::<tern_codec::properties::SubscribeProperties>::NONE;
        for (k, v) in user_properties {
            properties.user_properties.push(((*k).into(), (*v).into()));
        }
        self.send(Command::Subscribe(subscriptions, properties, tx))?;
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
