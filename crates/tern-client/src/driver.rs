//! The async driver: one task per client that owns the connection and the engine,
//! reconnects with backoff, keeps the outbox, and answers the application's commands.

use super::*;
use crate::state::{ClientState, Offline, Then};

/// How long a CONNECT may wait for its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection's transport and what has been read from it.
pub(crate) struct Link {
    pub(crate) stream: Box<dyn transport::Io>,
    pub(crate) read: BytesMut,
    /// Which of the options' addresses it is connected to.
    pub(crate) at: usize,
}

impl Link {
    /// Connects, sends CONNECT and waits for the CONNACK, which `state` takes (see
    /// [`ClientState::handle_connack`]); session present.
    pub(crate) async fn open(
        options: &Options,
        clean_start: bool,
        state: &mut ClientState,
        established: bool,
        at: usize,
    ) -> Result<(Link, bool), Error> {
        let (link, connect, ack) = Link::dial(options, clean_start, at).await?;
        let present = state.handle_connack(
            &connect,
            &ack,
            options.inflight,
            established,
            Instant::now(),
        )?;
        Ok((link, present))
    }

    /// Connects to address `at` of the options, sends CONNECT and waits for the CONNACK;
    /// the CONNECT and the CONNACK, for [`ClientState::handle_connack`].
    pub(crate) async fn dial(
        options: &Options,
        clean_start: bool,
        at: usize,
    ) -> Result<(Link, Connect, tern_codec::ConnAck), Error> {
        let (host, port) = options.address(at);
        let addr = format!("{host}:{port}");
        let mut stream = transport::open(&options.transport, host, port).await?;
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
        let at = at % options.addresses();
        Ok((Link { stream, read, at }, connect, ack))
    }
}

/// The client's task: serves each connection, and between them waits out the backoff
/// (publishes meanwhile wait in the held session) and connects again.
pub(crate) async fn drive(
    options: Options,
    mut link: Link,
    mut state: ClientState,
    mut outbox: Option<outbox::Outbox>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: EventTx,
) {
    let mut out = BytesMut::new();
    loop {
        let (reason, quit) = serve(
            &options,
            &mut link,
            &mut state,
            &mut outbox,
            &mut commands,
            &events,
            &mut out,
        )
        .await;
        events.send(vec![Event::Disconnected {
            reason: reason.clone(),
        }]);
        state.connection_lost();
        let backoff = match (quit, options.reconnect) {
            (false, Some(b)) => b,
            _ => {
                state.fail_publishes();
                return;
            }
        };
        // Each attempt goes to the next address (the same one when there is one).
        let mut at = link.at;
        link = loop {
            at = (at + 1) % options.addresses();
            let sleep = tokio::time::sleep(state.next_attempt(backoff, jitter_seed()));
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    c = commands.recv() => {
                        let Some(c) = c else { return };
                        match state.command_offline(c, std::time::Instant::now()) {
                            Offline::Done => {}
                            Offline::Quit => return,
                            Offline::Queued(tag, done) => {
                                // Kept before the caller learns it is waiting.
                                if let Some(o) = &mut outbox
                                    && let Err(e) = o.save(state.take_changes()).await
                                {
                                    tracing::error!(error = %e, "the outbox cannot be written");
                                    let _ = done.send(Err(e));
                                    return;
                                }
                                state.wait_for(tag, done);
                            }
                        }
                    }
                }
            }
            // A persistent session is resumed; otherwise each connection starts afresh
            // (and what waited is sent as new).
            let clean = options.session_expiry.is_zero();
            match Link::open(&options, clean, &mut state, true, at).await {
                Ok((l, session_present)) => {
                    events.send(vec![Event::Connected { session_present }]);
                    break l;
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        };
    }
}

/// The wait before reconnection attempt `attempt` (0 first): `initial` doubled per
/// attempt up to `max`, plus `jitter` (any number; its remainder by 250 is the added
/// thousandths, so up to 25 %). Pure: the driver passes the clock's nanoseconds as the
/// jitter, tests pass what they choose.
pub(crate) fn delay(b: Backoff, attempt: u32, jitter: u32) -> Duration {
    let base = b
        .initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(b.max);
    base + base.mul_f64(f64::from(jitter % 250) / 1000.0)
}

/// Jitter without a random crate: the clock's nanoseconds.
fn jitter_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Runs one connection until it ends; the reason, and whether the application asked for
/// the end.
pub(crate) async fn serve(
    options: &Options,
    link: &mut Link,
    state: &mut ClientState,
    outbox: &mut Option<outbox::Outbox>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    events: &EventTx,
    out: &mut BytesMut,
) -> (String, bool) {
    let v = options.protocol;
    loop {
        // Events first: they may resolve publishes and requests. Messages go to the
        // application together, once every event is seen.
        let (messages, closed) = state.handle_events();
        if !messages.is_empty() {
            events.send(messages);
        }
        if let Some(why) = closed {
            let _ = flush(link, state, out, v).await;
            return (why, false);
        }
        // Persist, then send: nothing goes out that a crash could forget.
        if let Some(o) = outbox
            && let Err(e) = o.save(state.take_changes()).await
        {
            tracing::error!(error = %e, "the outbox cannot be written; the client stops");
            return (e.to_string(), true);
        }
        if flush(link, state, out, v).await.is_err() {
            return ("write failed: connection lost".into(), false);
        }
        state.written();
        let timeout = state.conn().and_then(|c| c.poll_timeout());
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
        let paused = !state.awaited() && events.full();
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
                            if let Some(conn) = state.conn() {
                                let _ = conn.handle_packet(p, now);
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return (format!("malformed packet from the broker: {e}"), false),
                    }
                }
            }
            () = sleep => {
                if let Some(conn) = state.conn() {
                    conn.handle_timeout(Instant::now());
                }
            }
            c = commands.recv() => {
                // One clock reading for the whole batch of commands.
                let now = Instant::now();
                let mut next = c;
                for turn in 0..1024 {
                    let Some(c) = next else {
                        state.dropped();
                        if let Some(o) = outbox {
                            let _ = o.save(state.take_changes()).await;
                        }
                        let _ = flush(link, state, out, v).await;
                        return ("the client was dropped".into(), true);
                    };
                    if let Then::Quit(done) = state.command(c, now) {
                        // Publishes handed over in this same turn are kept before they
                        // are sent.
                        if let Some(o) = outbox {
                            let _ = o.save(state.take_changes()).await;
                        }
                        let _ = flush(link, state, out, v).await;
                        let _ = link.stream.shutdown().await;
                        state.fail_publishes();
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        return ("disconnected by the application".into(), true);
                    }
                    // Whatever else is already waiting goes into the same write, up to
                    // 1,024 commands a turn (the next one is taken on the next turn, not
                    // taken out of the channel and dropped here).
                    if turn == 1023 {
                        break;
                    }
                    match commands.try_recv() {
                        Ok(c) => next = Some(c),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// Writes what the engine has to send (after anything already in `out`) in one write.
pub(crate) async fn flush(
    link: &mut Link,
    state: &mut ClientState,
    out: &mut BytesMut,
    v: Protocol,
) -> std::io::Result<()> {
    let now = Instant::now();
    if let Some(conn) = state.conn() {
        while let Some(p) = conn.poll_transmit(now) {
            let _ = tern_codec::encode(&p, v, out);
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    let result = link.stream.write_all(out).await;
    out.clear();
    result?;
    link.stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_up_to_the_maximum_with_at_most_a_quarter_of_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(delay(b, 0, 0), Duration::from_millis(100));
        assert_eq!(delay(b, 1, 0), Duration::from_millis(200));
        assert_eq!(delay(b, 3, 0), Duration::from_millis(800));
        assert_eq!(delay(b, 10, 0), Duration::from_secs(5), "capped at max");
        assert_eq!(delay(b, u32::MAX, 0), Duration::from_secs(5), "no overflow");
        assert_eq!(delay(b, 0, 249), Duration::from_micros(124_900), "+24.9 %");
        assert_eq!(delay(b, 0, 250), Duration::from_millis(100), "wraps");
    }
}
