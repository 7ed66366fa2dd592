//! Where and how to connect: [`Options`] and the reconnection [`Backoff`].

use super::*;

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
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
            failover: Vec::new(),
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
            receive_maximum: None,
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

    /// Another broker of the same cluster to connect to when one does not answer: a
    /// reconnection goes to the next address in turn (`host:port` first, then each one
    /// added here, round and round), so a client whose node died reconnects to another
    /// one, where a persistent session follows it (docs/cluster.md); a first connect tries
    /// them in order. The transport (TLS, WebSocket) is the same for all.
    ///
    /// ```
    /// let o = tern_client::Options::new("10.0.0.1", 1883, "a")
    ///     .failover("10.0.0.2", 1883)
    ///     .failover("10.0.0.3", 1883);
    /// assert_eq!(o.failover.len(), 2);
    /// ```
    pub fn failover(mut self, host: impl Into<String>, port: u16) -> Options {
        self.failover.push((host.into(), port));
        self
    }

    /// How many addresses there are to connect to (at least one).
    pub(crate) fn addresses(&self) -> usize {
        1 + self.failover.len()
    }

    /// Address `at` (wrapping): `host:port` for 0, then the failover ones.
    pub(crate) fn address(&self, at: usize) -> (&str, u16) {
        match at % self.addresses() {
            0 => (self.host.as_str(), self.port),
            i => (self.failover[i - 1].0.as_str(), self.failover[i - 1].1),
        }
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

    pub(crate) fn connect_packet(&self, clean_start: bool) -> Connect {
        let mut c = Connect::new(self.protocol, self.client_id.as_str());
        c.clean_start = clean_start;
        c.keep_alive = self.keep_alive;
        c.username = self.username.as_deref().map(Into::into);
        c.password = self.password.clone();
        if self.protocol.is_v5() {
            c.properties.receive_maximum = self.receive_maximum;
        }
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
