//! One connection's task: the TLS and WebSocket handshakes, the CONNECT phase (admission:
//! connection limits, client certificates, the password file; the verdict goes to the
//! core), then reading and decoding for the core and writing what the core sends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tern_codec::{Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::monitor::ConnCounts;
use super::transport::common_name;
use super::{ListenerCtx, Slot, ToConn, ToCore, line, transport};
use crate::core::{Admission, ConnId, Refusal};

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
pub(super) struct Accepted {
    pub(super) conn: ConnId,
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) slot: Slot,
    pub(super) over_limit: bool,
}

/// TLS and WebSocket handshakes, within the CONNECT timeout; then MQTT.
pub(super) async fn connection(accepted: Box<Accepted>) {
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
    let mut phase = match start {
        // Whatever arrived along with the CONNECT.
        Start::Connected(v) if !decode_all(conn, &mut rbuf, v, l, Instant::now()) => Phase::Open,
        // The core was told of a refusal and answers with the CONNACK and a close.
        Start::Connected(_) | Start::Refused(_) | Start::Ended => Phase::Draining,
    };
    if !phase.reading() {
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
        if phase == Phase::Closing && !writing {
            let _ = writer.as_dyn().shutdown().await;
            // Half-closed: what the client still sends is read and thrown away until it
            // closes too, for at most CLOSE_LINGER. Closing with its bytes unread would
            // make the kernel answer with a reset, which fails the client's writes and can
            // destroy the DISCONNECT (and its reason code) before the client reads it.
            discard_until_eof(&mut reader, &mut rbuf).await;
            break;
        }
        if !phase.reading() {
            // What is left to write gets at most the CONNECT timeout: a client that stopped
            // sending and never reads would otherwise hold the task, its buffers and its
            // place under the connection limits for good.
            timer
                .get_or_insert_with(|| WriteTimer::new(None))
                .linger(l.connect_timeout);
        }
        let closing = phase.closing();
        let held = !wbuf.is_empty() && !closing && timer.as_mut().is_some_and(|t| t.holds());
        // The write branch watches the timer: the end of a coalescing window, or the
        // deadline for writing once reading has ended.
        let watch = if held || !phase.reading() {
            timer.as_deref_mut()
        } else {
            None
        };
        // Backpressure: while more than the write backlog waits for this client, what it
        // sends is not read (TCP holds it), so a client that never reads cannot make the
        // broker pile up answers to it without bound.
        let behind = wbuf.len() + rx.backlog() >= l.write_backlog;
        // And while the core has more than it can take waiting, nobody is read.
        let core_behind = l.inbox.full();
        tokio::select! {
            () = l.inbox.room(), if phase.reading() && core_behind && !behind => {}
            read = reader.read_some(&mut rbuf, chunk), if phase.reading() && !behind && !core_behind => {
                let read_at = Instant::now();
                let n = match read {
                    Ok(n) if n > 0 => n,
                    _ => {
                        phase = phase.read_ended();
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
                    phase = phase.read_ended();
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
                    phase = phase.core_gone();
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
                            // Nothing read after the close is acted on.
                            if phase.reading() {
                                stop_reading(l, conn, version);
                            }
                            phase = Phase::Closing;
                            break;
                        }
                    }
                }
                unflushed = !wbuf.is_empty();
            }
        }
    }
    // Writing failed or ended: the client is gone, whatever the core still sends.
    if phase.reading() {
        stop_reading(l, conn, version);
    }
}

/// How long a connection the broker closed keeps reading (and discarding) what the client
/// still sends, so that the close is a FIN and not a reset.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Reads and drops what arrives until the peer closes, an error, or [`CLOSE_LINGER`].
async fn discard_until_eof(reader: &mut Reader, buf: &mut BytesMut) {
    let deadline = tokio::time::Instant::now() + CLOSE_LINGER;
    loop {
        buf.clear();
        match tokio::time::timeout_at(deadline, reader.read_some(buf, 64 * 1024)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Where a connection is in its life once CONNECT is past. (What waits to be written is
/// the write buffer's state, apart from this.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading what the client sends, writing what the core sends.
    Open,
    /// Reading has ended (the client's EOF, malformed input, a refusal): only what the
    /// core still sends is written, until the core closes the connection.
    Draining,
    /// The core is gone while the client still sends: reading goes on until it stops;
    /// nothing more will come to write.
    Orphaned,
    /// The core closed the connection (or is gone and reading has ended): what is left is
    /// written, then the connection ends.
    Closing,
}

impl Phase {
    fn reading(self) -> bool {
        matches!(self, Phase::Open | Phase::Orphaned)
    }

    /// Nothing more comes from the core.
    fn closing(self) -> bool {
        matches!(self, Phase::Orphaned | Phase::Closing)
    }

    fn read_ended(self) -> Phase {
        match self {
            Phase::Open | Phase::Draining => Phase::Draining,
            Phase::Orphaned | Phase::Closing => Phase::Closing,
        }
    }

    fn core_gone(self) -> Phase {
        match self {
            Phase::Open | Phase::Orphaned => Phase::Orphaned,
            Phase::Draining | Phase::Closing => Phase::Closing,
        }
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
        other => {
            l.inbox.add(super::inbox_weight([&other]));
            l.to_core.send(ToCore::Packet(conn, other, Instant::now()))
        }
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
        Some(p) => {
            l.inbox.add(super::inbox_weight([&p]));
            l.to_core.send(ToCore::Packet(conn, p, read_at))
        }
        None if more.is_empty() => Ok(()),
        None => {
            l.inbox.add(super::inbox_weight(&more));
            l.to_core.send(ToCore::Packets(conn, more, read_at))
        }
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
