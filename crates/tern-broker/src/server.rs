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
use tern_codec::{DecodeError, Packet, Protocol};
use tern_store::{Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::core::{Broker, ConnId, Output, Settings};

enum ToCore {
    Accepted(ConnId, SocketAddr, mpsc::UnboundedSender<ToConn>),
    Packet(ConnId, Packet),
    DecodeError(ConnId, Option<Protocol>, DecodeError),
    Closed(ConnId),
    Shutdown,
}

enum ToConn {
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

/// Serves MQTT on `listener` until `shutdown` completes; then tells every client (5.0:
/// DISCONNECT 0x8B), flushes, and returns. State is loaded from `store` first and written
/// to it as it changes; an error here means the store could not be read.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    store: Box<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let (to_core, mut from_conns) = mpsc::unbounded_channel::<ToCore>();
    let connect_timeout = settings.connect_timeout;
    let max_packet_size = settings.max_packet_size;
    let mut broker = Broker::new(settings, store, Instant::now(), SystemTime::now())?;
    let core = tokio::spawn(async move {
        let mut writers: HashMap<ConnId, mpsc::UnboundedSender<ToConn>> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                msg = from_conns.recv() => {
                    let Some(msg) = msg else { break };
                    let now = Instant::now();
                    match msg {
                        ToCore::Accepted(conn, peer, tx) => {
                            writers.insert(conn, tx);
                            broker.handle_accepted(conn, peer);
                        }
                        ToCore::Packet(conn, p) => broker.handle_packet(conn, p, now),
                        ToCore::DecodeError(conn, v, e) => broker.handle_decode_error(conn, v, &e, now),
                        ToCore::Closed(conn) => {
                            broker.handle_closed(conn, now);
                            writers.remove(&conn);
                        }
                        ToCore::Shutdown => break,
                    }
                }
                _ = tick.tick() => broker.handle_timeout(Instant::now()),
            }
            dispatch(&mut broker, &mut writers);
        }
        broker.shutdown(Instant::now());
        dispatch(&mut broker, &mut writers);
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
/// message (one write) per round.
fn dispatch(broker: &mut Broker, writers: &mut HashMap<ConnId, mpsc::UnboundedSender<ToConn>>) {
    let mut batches: HashMap<ConnId, Vec<Packet>> = HashMap::new();
    let mut closes = vec![];
    while let Some(out) = broker.poll_output() {
        match out {
            Output::Send(conn, p) => batches.entry(conn).or_default().push(p),
            Output::Close(conn) => closes.push(conn),
        }
    }
    for (conn, packets) in batches {
        if let Some(w) = writers.get(&conn) {
            let _ = w.send(ToConn::Packets(packets));
        }
    }
    for conn in closes {
        if let Some(w) = writers.get(&conn) {
            let _ = w.send(ToConn::Close);
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
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToConn>();
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
    let _ = to_core.send(ToCore::Closed(conn));
    let _ = write.await;
}
