//! `tern pub` and `tern sub`: Mosquitto's command-line clients' flags, on the Tern client
//! SDK. Exit codes are listed in docs/cli.md and in [`Exit`].
//!
//! The flags are clap's (`ConnCli` shared, `PubCli`, `SubCli`), turned into one `Args`;
//! `pub` and `sub` share the connection options and the exit codes.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use tern_client::{
    Backoff, Client, Dedup, Error, Event, Message, Options, Protocol, QoS, ReasonCode,
    SubscriptionOptions, TlsConfig,
};

/// Flags `tern pub` and `tern sub` share (mosquitto_pub/mosquitto_sub's).
#[derive(clap::Args)]
pub(crate) struct ConnCli {
    /// Broker host [default: localhost]
    #[arg(short = 'h', long, value_name = "HOST")]
    host: Option<String>,
    /// Port [default: 1883; 8883 with TLS]
    #[arg(short, long, value_name = "PORT")]
    port: Option<u16>,
    /// Topic (pub) or topic filter (sub; repeatable)
    #[arg(short, long = "topic", value_name = "TOPIC")]
    topic: Vec<String>,
    /// QoS: 0, 1 or 2
    #[arg(short, long, default_value = "0", value_name = "QOS", value_parser = parse_qos)]
    qos: u8,
    /// Client id [default: tern-pub-PID, tern-sub-PID]
    #[arg(short, long, value_name = "ID")]
    id: Option<String>,
    /// Persistent session (needs -i)
    #[arg(short = 'c', long = "disable-clean-session")]
    persistent: bool,
    /// Session expiry in seconds (5.0; with -c the default is never)
    #[arg(short = 'x', long = "session-expiry-interval", value_name = "SECONDS")]
    expiry: Option<u32>,
    /// User name
    #[arg(short, long, value_name = "USER")]
    username: Option<String>,
    /// Password
    #[arg(short = 'P', long = "pw", value_name = "PASSWORD")]
    password: Option<String>,
    /// Keep alive in seconds [default: 60]
    #[arg(short, long = "keepalive", value_name = "SECONDS")]
    keep_alive: Option<u16>,
    /// Protocol version: 5 or 311 [default: 5]
    #[arg(short = 'V', long = "protocol-version", value_name = "5|311", value_parser = parse_version)]
    version: Option<Protocol>,
    /// Give up after this long (exit code 27)
    #[arg(short = 'W', value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Print what happens on stderr
    #[arg(short, long)]
    debug: bool,
    /// mqtt[s]://[user[:pass]@]host[:port]/topic or ws[s]://[user[:pass]@]host[:port]/path
    #[arg(short = 'L', long, value_name = "URL")]
    url: Option<String>,
    /// CA certificates (PEM); turns TLS on
    #[arg(long, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// Client certificate (PEM)
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's key (PEM)
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Print help (-h is the host, as in Mosquitto's clients)
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// `tern pub`'s flags.
#[derive(clap::Args)]
#[command(
    after_help = "exit codes: 0 all acknowledged, 1 connection failed or lost, 2 bad usage, \
3 connection refused by the broker, 4 a message refused by the broker, 27 timed out (-W)"
)]
pub(crate) struct PubCli {
    #[command(flatten)]
    conn: ConnCli,
    /// The message
    #[arg(short, long, value_name = "MESSAGE")]
    message: Option<String>,
    /// The file's contents as the message
    #[arg(short, long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// One message per line of stdin
    #[arg(short = 'l', long = "stdin-line")]
    lines: bool,
    /// All of stdin as one message
    #[arg(short = 's', long = "stdin-file")]
    stdin: bool,
    /// An empty message
    #[arg(short = 'n', long = "null-message")]
    null: bool,
    /// Retain
    #[arg(short, long)]
    retain: bool,
    /// Keep QoS 1/2 messages in FILE until acknowledged; sends what an earlier run left
    /// there (then the message flags are optional)
    #[arg(long, value_name = "FILE")]
    outbox: Option<PathBuf>,
    /// Put a unique user property KEY on every message (5.0)
    #[arg(long, value_name = "KEY")]
    stamp: Option<String>,
}

/// `tern sub`'s flags.
#[derive(clap::Args)]
#[command(
    after_help = "format (-F): %t topic, %p payload, %x payload in hex, %q QoS, %r retain (0/1), \
%l payload length, %U Unix time, %I ISO 8601 time (UTC), %% a percent sign; \\n \\t \\\\ escapes
exit codes: 0 done (-C reached, or stopped), 1 connection failed or lost, 2 bad usage, \
3 connection refused by the broker, 4 subscription refused, 27 timed out (-W)"
)]
pub(crate) struct SubCli {
    #[command(flatten)]
    conn: ConnCli,
    /// Exit after COUNT messages
    #[arg(short = 'C', value_name = "COUNT")]
    count: Option<u64>,
    /// Print the topic before the payload
    #[arg(short, long)]
    verbose: bool,
    /// Output format (below)
    #[arg(short = 'F', value_name = "FORMAT")]
    format: Option<String>,
    /// Drop messages whose user property KEY was already seen (last 10,000)
    #[arg(long, value_name = "KEY")]
    dedup: Option<String>,
    /// Replay the topic history first (a Tern broker): from this long ago (90s, 10m, 2h,
    /// 1d) or a Unix time in milliseconds, then live (5.0)
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Replay the topic history first from this position (a message's history-position),
    /// then live (5.0)
    #[arg(long, value_name = "POSITION")]
    from: Option<u64>,
}

fn parse_qos(v: &str) -> Result<u8, String> {
    match v {
        "0" => Ok(0),
        "1" => Ok(1),
        "2" => Ok(2),
        _ => Err("QoS is 0, 1 or 2".into()),
    }
}

fn parse_version(v: &str) -> Result<Protocol, String> {
    match v {
        "5" | "mqttv5" => Ok(Protocol::V5),
        "311" | "mqttv311" => Ok(Protocol::V3_1_1),
        _ => Err("the version is 5 or 311".into()),
    }
}

impl ConnCli {
    fn into_args(self) -> Args {
        Args {
            host: self.host,
            port: self.port,
            topics: self.topic,
            qos: self.qos,
            id: self.id,
            persistent: self.persistent,
            expiry: self.expiry,
            username: self.username,
            password: self.password,
            keep_alive: self.keep_alive,
            version: self.version,
            timeout: self.timeout.map(Duration::from_secs),
            debug: self.debug,
            url: self.url,
            cafile: self.cafile,
            cert: self.cert,
            key: self.key,
            ..Args::default()
        }
    }
}

impl From<PubCli> for Args {
    fn from(c: PubCli) -> Args {
        Args {
            message: c.message.map(|m| Bytes::from(m.into_bytes())),
            file: c.file,
            lines: c.lines,
            stdin: c.stdin,
            null: c.null,
            retain: c.retain,
            outbox: c.outbox,
            stamp: c.stamp,
            ..c.conn.into_args()
        }
    }
}

impl From<SubCli> for Args {
    fn from(c: SubCli) -> Args {
        Args {
            count: c.count,
            verbose: c.verbose,
            format: c.format,
            dedup: c.dedup,
            since: c.since,
            from: c.from,
            ..c.conn.into_args()
        }
    }
}

/// Exit codes scripts can rely on (0: success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Connection = 1,
    Usage = 2,
    Refused = 3,
    Rejected = 4,
    Timeout = 27,
}

/// A failure: what to print and how to exit.
struct Failure(Exit, String);

impl Failure {
    fn usage(msg: impl Into<String>) -> Failure {
        Failure(Exit::Usage, msg.into())
    }
}

/// Flags both commands share, and each one's own.
#[derive(Default)]
struct Args {
    host: Option<String>,
    port: Option<u16>,
    topics: Vec<String>,
    qos: u8,
    id: Option<String>,
    persistent: bool,
    expiry: Option<u32>,
    username: Option<String>,
    password: Option<String>,
    keep_alive: Option<u16>,
    version: Option<Protocol>,
    timeout: Option<Duration>,
    debug: bool,
    url: Option<String>,
    cafile: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    // pub
    message: Option<Bytes>,
    file: Option<PathBuf>,
    lines: bool,
    stdin: bool,
    null: bool,
    retain: bool,
    outbox: Option<PathBuf>,
    stamp: Option<String>,
    // sub
    count: Option<u64>,
    verbose: bool,
    format: Option<String>,
    dedup: Option<String>,
    since: Option<String>,
    from: Option<u64>,
}

/// The connection options the flags describe (and, from an `mqtt[s]://` URL, a topic).
fn options(a: &mut Args, default_id: String) -> Result<Options, Failure> {
    let id = a.id.clone().unwrap_or(default_id);
    if a.persistent && a.id.is_none() {
        return Err(Failure::usage(
            "-c (a persistent session) needs a client id (-i)",
        ));
    }
    let tls_files = a.cafile.is_some() || a.cert.is_some();
    let mut o = match &a.url {
        Some(url) => {
            let (base, topic) = match url.split_once("://") {
                Some((scheme @ ("mqtt" | "mqtts"), rest)) => match rest.split_once('/') {
                    Some((authority, topic)) => (format!("{scheme}://{authority}"), topic),
                    None => (url.clone(), ""),
                },
                _ => (url.clone(), ""),
            };
            if !topic.is_empty() {
                a.topics.push(topic.to_string());
            }
            // TLS is set up below from --cafile (or the system's bundle): parse the URL
            // without it, keeping the secure scheme's default port.
            let secure = base.starts_with("mqtts://") || base.starts_with("wss://");
            let plain = if secure {
                base.replacen("s://", "://", 1)
            } else {
                base.clone()
            };
            let mut o =
                Options::from_url(&plain, id.clone()).map_err(|e| Failure::usage(e.to_string()))?;
            if secure {
                let authority = plain.split("://").nth(1).unwrap_or("");
                let authority = authority.split('/').next().unwrap_or("");
                let hostport = authority.rsplit('@').next().unwrap_or("");
                let hostport = hostport.rsplit(']').next().unwrap_or("");
                if !hostport.contains(':') {
                    o.port = if base.starts_with("wss://") {
                        443
                    } else {
                        8883
                    };
                }
                let tls =
                    TlsConfig::from_files(a.cafile.as_deref(), a.cert.as_deref(), a.key.as_deref())
                        .map_err(|e| Failure::usage(e.to_string()))?;
                o = o.tls(tls);
            }
            o
        }
        None => Options::new("localhost", if tls_files { 8883 } else { 1883 }, id),
    };
    if !matches!(
        o.transport,
        tern_client::Transport::Tls(_) | tern_client::Transport::Wss { .. }
    ) && tls_files
    {
        let tls = TlsConfig::from_files(a.cafile.as_deref(), a.cert.as_deref(), a.key.as_deref())
            .map_err(|e| Failure::usage(e.to_string()))?;
        o = o.tls(tls);
    }
    if let Some(h) = &a.host {
        o.host = h.clone();
    }
    if let Some(p) = a.port {
        o.port = p;
    }
    if let Some(u) = &a.username {
        o.username = Some(u.clone());
    }
    if let Some(p) = &a.password {
        o.password = Some(Bytes::copy_from_slice(p.as_bytes()));
    }
    if let Some(k) = a.keep_alive {
        o.keep_alive = k;
    }
    o.protocol = a.version.unwrap_or(Protocol::V5);
    if a.persistent {
        o = o.persistent(Duration::from_secs(u64::from(a.expiry.unwrap_or(u32::MAX))));
    } else if let Some(x) = a.expiry {
        o.session_expiry = Duration::from_secs(u64::from(x));
    }
    Ok(o)
}

fn qos(n: u8) -> QoS {
    match n {
        2 => QoS::ExactlyOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    }
}

fn hint(r: ReasonCode) -> String {
    format!("{r:?} (0x{:02X})", r as u8)
}

/// How a failed connect is reported.
fn connect_failure(e: Error) -> Failure {
    match e {
        Error::Refused(_) => Failure(Exit::Refused, e.to_string()),
        Error::Tls(_) | Error::Url(_) | Error::Outbox(_) | Error::Topic(_) => {
            Failure(Exit::Usage, e.to_string())
        }
        _ => Failure(Exit::Connection, e.to_string()),
    }
}

fn finish(command: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("tern {command}: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(Exit::Connection, format!("cannot start the runtime: {e}")))
}

/// Runs `work`, giving up with [`Exit::Timeout`] after `timeout`.
async fn within(
    timeout: Option<Duration>,
    work: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    match timeout {
        None => work.await,
        Some(t) => tokio::time::timeout(t, work).await.unwrap_or_else(|_| {
            Err(Failure(
                Exit::Timeout,
                format!("timed out after {} s (-W)", t.as_secs()),
            ))
        }),
    }
}

/// `tern pub`.
pub(crate) fn publish(cli: PubCli) -> ExitCode {
    finish("pub", publish_inner(cli.into()))
}

enum Source {
    One(Bytes),
    Lines,
    Nothing,
}

fn publish_inner(mut a: Args) -> Result<(), Failure> {
    let mut o = options(&mut a, format!("tern-pub-{}", std::process::id()))?;
    let given = [
        a.message.is_some(),
        a.file.is_some(),
        a.lines,
        a.stdin,
        a.null,
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given > 1 {
        return Err(Failure::usage("give only one of -m, -f, -l, -s and -n"));
    }
    if given == 0 && a.outbox.is_none() {
        return Err(Failure::usage(
            "no message: give -m MESSAGE, -f FILE, -l, -s or -n",
        ));
    }
    let topic = match a.topics.as_slice() {
        [] if given == 0 => String::new(),
        [] => return Err(Failure::usage("no topic: give -t TOPIC")),
        [t] => t.clone(),
        _ => return Err(Failure::usage("give one topic (-t) to publish on")),
    };
    if given > 0 && tern_client::TopicName::new(topic.as_str()).is_err() {
        return Err(Failure::usage(format!(
            "'{topic}' is not a topic one can publish on"
        )));
    }
    let source = if let Some(m) = a.message.take() {
        Source::One(m)
    } else if let Some(f) = &a.file {
        let data = std::fs::read(f)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", f.display())))?;
        Source::One(data.into())
    } else if a.null {
        Source::One(Bytes::new())
    } else if a.stdin {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)
            .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?;
        Source::One(data.into())
    } else if a.lines {
        Source::Lines
    } else {
        Source::Nothing
    };
    if let Some(path) = &a.outbox {
        o = o.outbox(path.clone());
    } else {
        // Nothing to keep the messages in across a lost connection: report it instead.
        o = o.reconnect(None);
    }
    if let Some(key) = &a.stamp {
        o = o.stamp(key.clone());
    }
    let (qos, retain, debug) = (qos(a.qos), a.retain, a.debug);
    let rt = runtime()?;
    rt.block_on(within(a.timeout, async move {
        let (client, mut events) = Client::connect(o).await.map_err(connect_failure)?;
        if debug {
            tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    eprintln!("tern pub: {e:?}");
                }
            });
        }
        let mut outcomes = VecDeque::new();
        let mut refused = None;
        let mut sent = 0u64;
        let mut settle = |r: Result<ReasonCode, Error>| -> Result<(), Failure> {
            match r {
                Ok(r) if r.is_error() => {
                    let msg = format!("the broker refused a message on '{topic}': {}", hint(r));
                    refused.get_or_insert(msg);
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(Failure(
                    Exit::Connection,
                    format!("a message was not acknowledged: {e}"),
                )),
            }
        };
        let send = |payload: Bytes| -> Result<tern_client::Outcome, Failure> {
            client
                .publish(topic.clone(), payload)
                .qos(qos)
                .retain(retain)
                .send()
                .map_err(|e| match e {
                    Error::Topic(t) => {
                        Failure::usage(format!("'{t}' is not a topic one can publish on"))
                    }
                    e => Failure(Exit::Connection, e.to_string()),
                })
        };
        match source {
            Source::Nothing => {}
            Source::One(p) => {
                outcomes.push_back(send(p)?);
                sent += 1;
            }
            Source::Lines => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
                std::thread::spawn(move || {
                    let stdin = std::io::stdin();
                    let mut line = Vec::new();
                    let mut lock = stdin.lock();
                    loop {
                        line.clear();
                        match std::io::BufRead::read_until(&mut lock, b'\n', &mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                if line.last() == Some(&b'\n') {
                                    line.pop();
                                    if line.last() == Some(&b'\r') {
                                        line.pop();
                                    }
                                }
                                if tx.blocking_send(line.clone()).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                while let Some(line) = rx.recv().await {
                    outcomes.push_back(send(line.into())?);
                    sent += 1;
                    // A bounded window of unacknowledged messages.
                    if outcomes.len() >= 1024
                        && let Some(o) = outcomes.pop_front()
                    {
                        settle(o.await)?;
                    }
                }
            }
        }
        while let Some(o) = outcomes.pop_front() {
            settle(o.await)?;
        }
        // What an earlier run left in the outbox is acknowledged too before we leave.
        client.wait_idle().await.map_err(|e| {
            Failure(
                Exit::Connection,
                format!("not every message was acknowledged: {e}"),
            )
        })?;
        client.disconnect().await;
        if debug {
            eprintln!("tern pub: {sent} message(s) published");
        }
        match refused {
            Some(msg) => Err(Failure(Exit::Rejected, msg)),
            None => Ok(()),
        }
    }))
}

/// `tern sub`.
pub(crate) fn subscribe(cli: SubCli) -> ExitCode {
    finish("sub", subscribe_inner(cli.into()))
}

fn subscribe_inner(mut a: Args) -> Result<(), Failure> {
    let mut o = options(&mut a, format!("tern-sub-{}", std::process::id()))?;
    if a.topics.is_empty() {
        return Err(Failure::usage("no topic filter: give -t FILTER"));
    }
    let format = match (&a.format, a.verbose) {
        (Some(f), _) => f.clone(),
        (None, true) => "%t %p".to_string(),
        (None, false) => "%p".to_string(),
    };
    check_format(&format)?;
    if let Some(f) = a
        .topics
        .iter()
        .find(|f| tern_codec::TopicFilter::new(f.as_str()).is_err())
    {
        return Err(Failure::usage(format!("'{f}' is not a valid topic filter")));
    }
    let mut replay: Vec<(&'static str, String)> = Vec::new();
    if let Some(since) = &a.since {
        if tern_broker::core::since_time(since, std::time::SystemTime::now()).is_none() {
            return Err(Failure::usage(format!(
                "--since '{since}' is neither a duration (90s, 10m, 2h, 1d) nor Unix milliseconds"
            )));
        }
        replay.push((tern_broker::core::REPLAY_SINCE, since.clone()));
    }
    if let Some(from) = a.from {
        replay.push((tern_broker::core::REPLAY_FROM, from.to_string()));
    }
    if !replay.is_empty() && !o.protocol.is_v5() {
        return Err(Failure::usage("--since and --from need MQTT 5 (-V 5)"));
    }
    // Asked once: a resubscription after a reconnect goes on live.
    let replay = std::sync::Arc::new(std::sync::Mutex::new(Some(replay)));
    o = o.reconnect(Some(Backoff::default()));
    let q = qos(a.qos);
    let filters = a.topics.clone();
    let (count, debug) = (a.count, a.debug);
    let mut dedup = a.dedup.as_ref().map(|k| Dedup::new(10_000).key(k.as_str()));
    let rt = runtime()?;
    rt.block_on(within(a.timeout, async move {
        let (client, mut events) = Client::connect(o).await.map_err(connect_failure)?;
        let subscribe = |client: Client| {
            let filters = filters.clone();
            let replay = replay
                .lock()
                .map(|mut r| r.take())
                .unwrap_or_default()
                .unwrap_or_default();
            async move {
                let list: Vec<(&str, SubscriptionOptions)> = filters
                    .iter()
                    .map(|f| {
                        (
                            f.as_str(),
                            SubscriptionOptions {
                                qos: q,
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                let props: Vec<(&str, &str)> =
                    replay.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let codes = client
                    .subscribe_with_properties(&list, &props)
                    .await
                    .map_err(|e| match e {
                        Error::Topic(t) => {
                            Failure::usage(format!("'{t}' is not a valid topic filter"))
                        }
                        e => Failure(Exit::Connection, e.to_string()),
                    })?;
                for (f, c) in filters.iter().zip(&codes) {
                    if c.is_error() {
                        return Err(Failure(
                            Exit::Rejected,
                            format!("the broker refused the subscription to '{f}': {}", hint(*c)),
                        ));
                    }
                    if debug {
                        eprintln!("tern sub: subscribed to '{f}': {}", hint(*c));
                    }
                }
                Ok(())
            }
        };
        subscribe(client.clone()).await?;
        let mut out = std::io::stdout().lock();
        let mut received = 0u64;
        let mut first = true;
        while let Some(e) = events.recv().await {
            match e {
                Event::Message(m) => {
                    if let Some(d) = &mut dedup
                        && !d.is_new(&m)
                    {
                        if debug {
                            eprintln!("tern sub: dropped a repeat on '{}'", m.topic.as_str());
                        }
                        continue;
                    }
                    let mut line = render(&format, &m);
                    line.push(b'\n');
                    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                        // Whoever read our output has gone (a closed pipe): stop quietly.
                        break;
                    }
                    received += 1;
                    if count.is_some_and(|c| received >= c) {
                        break;
                    }
                }
                Event::Connected { session_present } => {
                    if debug {
                        eprintln!("tern sub: connected (session present: {session_present})");
                    }
                    if !first && !session_present {
                        subscribe(client.clone()).await?;
                    }
                    first = false;
                }
                Event::Disconnected { reason } => {
                    eprintln!("tern sub: connection lost ({reason}); reconnecting");
                }
            }
        }
        client.disconnect().await;
        Ok(())
    }))
}

fn check_format(f: &str) -> Result<(), Failure> {
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('t' | 'p' | 'x' | 'q' | 'r' | 'l' | 'U' | 'I' | '%') => {}
                Some(other) => {
                    return Err(Failure::usage(format!(
                        "-F: unknown format '%{other}' (known: %t %p %x %q %r %l %U %I %%)"
                    )));
                }
                None => return Err(Failure::usage("-F: a lone '%' at the end")),
            }
        }
    }
    Ok(())
}

/// One message as `-F` says.
fn render(format: &str, m: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.payload.len() + 32);
    let mut chars = format.chars();
    let mut buf = [0u8; 4];
    while let Some(c) = chars.next() {
        match c {
            '%' => match chars.next() {
                Some('t') => out.extend_from_slice(m.topic.as_str().as_bytes()),
                Some('p') => out.extend_from_slice(&m.payload),
                Some('x') => {
                    for b in m.payload.iter() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                }
                Some('q') => out.push(b'0' + m.qos as u8),
                Some('r') => out.push(if m.retain { b'1' } else { b'0' }),
                Some('l') => out.extend_from_slice(m.payload.len().to_string().as_bytes()),
                Some('U') => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    out.extend_from_slice(
                        format!("{}.{:09}", now.as_secs(), now.subsec_nanos()).as_bytes(),
                    );
                }
                Some('I') => out.extend_from_slice(iso8601_now().as_bytes()),
                Some('%') => out.push(b'%'),
                Some(other) => {
                    out.push(b'%');
                    out.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
                }
                None => out.push(b'%'),
            },
            '\\' => match chars.next() {
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('\\') => out.push(b'\\'),
                Some(other) => {
                    out.push(b'\\');
                    out.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
                }
                None => out.push(b'\\'),
            },
            c => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
        }
    }
    out
}

/// The current time as `2026-11-22T10:04:05Z`.
fn iso8601_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_format_renders_every_specifier_and_escape() {
        let mut m = Message::new(
            tern_client::TopicName::new("a/b").unwrap(),
            "hi",
            QoS::AtLeastOnce,
        );
        m.retain = true;
        let out = render("%t|%p|%x|%q|%r|%l|%%\\t\\n", &m);
        assert_eq!(out, b"a/b|hi|6869|1|1|2|%\t\n");
        assert!(check_format("%z").is_err());
        assert!(check_format("%t %p").is_ok());
        let iso = iso8601_now();
        assert_eq!(
            (iso.len(), &iso[4..5], &iso[10..11]),
            (20, "-", "T"),
            "{iso}"
        );
    }
}
