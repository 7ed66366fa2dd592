//! The tokio server around the sans-IO core: a listener, one task per connection that reads
//! and decodes, and one core task that owns the [`Broker`] and tells connections what to
//! write. Each connection writes everything queued for it in one buffer, one `write_all`
//! per wakeup.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tern_codec::{DecodeError, Packet, Protocol, ReasonCode};
use tern_store::{Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::core::{Broker, ConnId, Output, Settings};

mod writer;

enum ToCore {
    Accepted(ConnId, SocketAddr, mpsc::UnboundedSender<ToConn>),
    Packet(ConnId, Packet),
    DecodeError(ConnId, Option<Protocol>, DecodeError),
    Closed(ConnId),
    /// The storage writer could not commit; see [`writer`].
    StoreFailed,
    Shutdown,
}

/// What a connection's writer task is told.
pub(crate) enum ToConn {
    Packets(Vec<Packet>),
    Close,
}

fn protocol_code(v: Protocol) -> u8 {
    v.level()
}

fn protocol_from(code: u8) -> Option<Protocol> {
    match code {
        3 => Some(Protocol::V3_1),
        4 => Some(Protocol::V3_1_1),
        5 => Some(Protocol::V5),
        _ => None,
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
    access: crate::auth::Access,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let access = Arc::new(access);
    let (to_core, mut from_conns) = mpsc::unbounded_channel::<ToCore>();
    let connect_timeout = settings.connect_timeout;
    let max_packet_size = settings.max_packet_size;
    let snapshot = match &persistence {
        Some(p) => p.store.load()?,
        None => Default::default(),
    };
    let core_settings = settings.clone();
    let mut broker = Broker::resume(settings, snapshot, Instant::now(), SystemTime::now());
    let mut writer = persistence.map(|p| writer::Writer::spawn(p, to_core.clone()));
    let core = tokio::spawn(async move {
        let mut writers: HashMap<ConnId, mpsc::UnboundedSender<ToConn>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        'run: loop {
            let mut first = None;
            tokio::select! {
                msg = from_conns.recv() => match msg {
                    Some(msg) => first = Some(msg),
                    None => break 'run,
                },
                _ = tick.tick() => broker.handle_timeout(Instant::now()),
            }
            // Everything already waiting is handled before one batch goes to the writer.
            let mut next = first;
            let mut handled = 0;
            let mut closed = Vec::new();
            while let Some(msg) = next {
                let now = Instant::now();
                match msg {
                    ToCore::Accepted(conn, peer, tx) => {
                        writers.insert(conn, tx);
                        broker.handle_accepted(conn, peer);
                    }
                    ToCore::Packet(conn, p) => broker.handle_packet(conn, p, now),
                    ToCore::DecodeError(conn, v, e) => {
                        broker.handle_decode_error(conn, v, &e, now);
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
                                broker = Broker::resume(
                                    core_settings.clone(),
                                    snapshot,
                                    Instant::now(),
                                    SystemTime::now(),
                                );
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
            dispatch(&mut broker, &mut writers, writer.as_ref());
            for conn in closed {
                writers.remove(&conn);
            }
        }
        broker.shutdown(Instant::now());
        dispatch(&mut broker, &mut writers, writer.as_ref());
        if let Some(w) = writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
    });

    let accept = {
        let to_core = to_core.clone();
        async move {
            let mut next: ConnId = 0;
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                next += 1;
                let conn = next;
                tracing::info!(conn, %peer, "accepted");
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(
                    conn,
                    stream,
                    peer,
                    to_core.clone(),
                    connect_timeout,
                    max_packet_size,
                    access.clone(),
                ));
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
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
fn dispatch(
    broker: &mut Broker,
    writers: &mut HashMap<ConnId, mpsc::UnboundedSender<ToConn>>,
    writer: Option<&writer::Writer>,
) {
    let mut batches: HashMap<ConnId, Vec<Packet>> = HashMap::new();
    let mut closes = vec![];
    while let Some(out) = broker.poll_output() {
        match out {
            Output::Send(conn, p) => batches.entry(conn).or_default().push(p),
            Output::Close(conn) => closes.push(conn),
        }
    }
    let ops = broker.take_ops();
    let mut sends = Vec::with_capacity(batches.len() + closes.len());
    for (conn, packets) in batches {
        if let Some(w) = writers.get(&conn) {
            sends.push((w.clone(), ToConn::Packets(packets)));
        }
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

async fn connection(
    conn: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    to_core: mpsc::UnboundedSender<ToCore>,
    connect_timeout: Duration,
    max_packet_size: u32,
    access: Arc<crate::auth::Access>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToConn>();
    let refuse = tx.clone();
    if to_core.send(ToCore::Accepted(conn, peer, tx)).is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.into_split();
    let version = Arc::new(AtomicU8::new(0));

    let write_version = version.clone();
    let write = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(8 * 1024);
        while let Some(msg) = rx.recv().await {
            let mut close = false;
            let mut next = Some(msg);
            // Everything already queued goes into the same buffer: one write per wakeup.
            while let Some(msg) = next {
                match msg {
                    ToConn::Packets(packets) => {
                        let v = protocol_from(write_version.load(Ordering::Acquire))
                            .unwrap_or(Protocol::V3_1_1);
                        for p in &packets {
                            if let Err(e) = tern_codec::encode(p, v, &mut buf) {
                                tracing::warn!(conn, error = %e, "packet not sendable in {v}");
                            }
                        }
                    }
                    ToConn::Close => close = true,
                }
                next = if close { None } else { rx.try_recv().ok() };
            }
            if !buf.is_empty() && writer.write_all(&buf).await.is_err() {
                break;
            }
            buf.clear();
            if close {
                let _ = writer.shutdown().await;
                break;
            }
        }
    });

    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut connected = false;
    'read: loop {
        let read = if connected {
            reader.read_buf(&mut buf).await
        } else {
            match tokio::time::timeout(connect_timeout, reader.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break 'read,
            }
        };
        match read {
            Ok(0) | Err(_) => break 'read,
            Ok(_) => {}
        }
        loop {
            let v = protocol_from(version.load(Ordering::Acquire));
            match tern_codec::decode(&mut buf, v.unwrap_or(Protocol::V3_1_1), max_packet_size) {
                Ok(Some(packet)) => {
                    if let Packet::Connect(c) = &packet {
                        if connected {
                            // A second CONNECT: the engine reports the protocol error.
                        } else {
                            version.store(protocol_code(c.protocol), Ordering::Release);
                            connected = true;
                            let checked = if access.costly(c) {
                                // Hashing takes milliseconds: off the runtime's threads.
                                let (a, c) = (access.clone(), c.clone());
                                tokio::task::spawn_blocking(move || a.check(&c))
                                    .await
                                    .unwrap_or(Err(ReasonCode::ServerUnavailable))
                            } else {
                                access.check(c)
                            };
                            if let Err(reason) = checked {
                                tracing::info!(conn, %peer, client_id = %c.client_id, user = c.username.as_deref().unwrap_or("-"), ?reason, "refused at CONNECT");
                                let ack = tern_codec::ConnAck::new(false, reason);
                                let _ = refuse.send(ToConn::Packets(vec![Packet::ConnAck(ack)]));
                                let _ = refuse.send(ToConn::Close);
                                break 'read;
                            }
                        }
                    }
                    if to_core.send(ToCore::Packet(conn, packet)).is_err() {
                        break 'read;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = to_core.send(ToCore::DecodeError(conn, v, e));
                    break 'read;
                }
            }
        }
    }
    // The writer ends when every sender is gone (the core drops its own on Closed).
    drop(refuse);
    let _ = to_core.send(ToCore::Closed(conn));
    let _ = write.await;
}
