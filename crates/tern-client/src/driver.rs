//! The async driver: one task per client that owns the connection and the engine,
//! reconnects with backoff, keeps the outbox, and answers the application's commands.

use super::*;

/// How long a CONNECT may wait for its CONNACK.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection with its engine.
pub(crate) struct Link {
    pub(crate) stream: Box<dyn transport::Io>,
    pub(crate) conn: Connection,
    pub(crate) read: BytesMut,
    pub(crate) session_present: bool,
    /// Messages of the previous session the broker no longer had: sent again as new.
    pub(crate) orphans: Vec<Message>,
}

impl Link {
    pub(crate) async fn open(
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
pub(crate) struct Pending {
    /// QoS 1/2 publishes by tag.
    pub(crate) publishes: HashMap<u32, Done<ReasonCode>>,
    /// QoS 0 publishes queued to the socket, resolved after the next write.
    pub(crate) written: Vec<Done<ReasonCode>>,
    /// SUBSCRIBE / UNSUBSCRIBE by packet id.
    pub(crate) requests: HashMap<PacketId, Done<Vec<ReasonCode>>>,
    /// [`Client::wait_idle`] callers.
    pub(crate) idle: Vec<oneshot::Sender<()>>,
    pub(crate) next_tag: u32,
}

impl Pending {
    /// A tag for the next QoS 1/2 publish: never 0 (no tag), never one still pending
    /// (it wraps after 4 billion publishes).
    pub(crate) fn tag(&mut self) -> u32 {
        loop {
            self.next_tag = self.next_tag.wrapping_add(1);
            if self.next_tag != 0 && !self.publishes.contains_key(&self.next_tag) {
                return self.next_tag;
            }
        }
    }

    /// Answers the idle waiters if `session` has nothing in flight or waiting.
    pub(crate) fn check_idle(&mut self, session: &SessionState) {
        if !self.idle.is_empty() && session.inflight_len() == 0 && session.queued_len() == 0 {
            for done in self.idle.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

pub(crate) async fn drive(
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
            let wait = delay(backoff, attempt, jitter_seed());
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
                                    && let Err(e) = o.save(state.take_changes()).await
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
    outbox: &mut Option<outbox::Outbox>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    events: &EventTx,
    pending: &mut Pending,
    out: &mut BytesMut,
) -> (String, bool) {
    let v = options.protocol;
    if outbox.is_some() {
        // A session that replaced a lost one is written whole.
        link.conn.track(false);
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
            && let Err(e) = o.save(link.conn.take_changes()).await
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
pub(crate) async fn command(
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
                let _ = o.save(link.conn.take_changes()).await;
            }
            let _ = flush(link, out, v).await;
            return Some(("the client was dropped".into(), true));
        }
        Some(Command::Disconnect(done)) => {
            link.conn.disconnect(ReasonCode::Success);
            // Publishes handed over in this same turn are kept before they are sent.
            if let Some(o) = outbox {
                let _ = o.save(link.conn.take_changes()).await;
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
            request(pending, done, link.conn.subscribe(subscriptions));
        }
        Some(Command::Unsubscribe(filters, done)) => {
            request(pending, done, link.conn.unsubscribe(filters));
        }
    }
    None
}

/// Waits for the answer to a SUBSCRIBE or UNSUBSCRIBE the engine sent under `id` (it
/// keeps the id from other flows until the answer); `done` gets it.
pub(crate) fn request(
    pending: &mut Pending,
    done: Done<Vec<ReasonCode>>,
    id: Result<PacketId, tern_proto::IdsExhausted>,
) {
    match id {
        Ok(id) => {
            pending.requests.insert(id, done);
        }
        Err(_) => {
            let _ = done.send(Err(Error::Backlog));
        }
    }
}

/// Writes what the engine has to send (after anything already in `out`) in one write.
pub(crate) async fn flush(link: &mut Link, out: &mut BytesMut, v: Protocol) -> std::io::Result<()> {
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
