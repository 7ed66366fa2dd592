//! `tern bench`: load scenarios against any MQTT broker, counting loss, duplicates and
//! reordering in every run. Each payload starts with the publisher's number, a sequence
//! number and the send time, so the subscribers can check every message they get.
//! Output: a readable table and one JSON line per run.
//!
//! Over 700 lines: its six scenarios share the payload format, the connection helpers and
//! the loss/duplicate/order accounting above them; split by scenario, each file would
//! import all of it. The flags are clap's (`BenchCli`).

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tern_client::{Client, Event, Events, Options, Protocol, QoS};

/// `tern bench`'s flags.
#[derive(clap::Args)]
#[command(after_help = "scenarios:
  fanin      P publishers -> 1 subscriber           (--publishers, default 8)
  fanout     1 publisher -> S subscribers           (--subscribers, default 16)
  pairs      N publisher/subscriber pairs           (--pairs, default 8)
  latency    1 publisher at a fixed rate -> 1 subscriber: p50/p90/p99/p99.9 (--rate, default 1000)
  idle       open N idle connections; broker memory per connection from /proc (--connections, --pid)
  backlog    K messages queued for an offline persistent subscriber, then replayed (--count;
             the broker's offline queue limit applies: raise it, or the excess counts as lost)
  replay     K messages kept in a topic history, then replayed to a new subscriber (Tern,
             with a [[topic]] policy keeping history for bench/replay/#; --count)
exit code: 0 when every QoS 1/2 message arrived once and in order per publisher, 1 otherwise")]
pub(crate) struct BenchCli {
    /// fanin, fanout, pairs, latency, idle or backlog
    #[arg(value_parser = ["fanin", "fanout", "pairs", "latency", "idle", "backlog", "replay"])]
    scenario: String,
    /// The broker's host
    #[arg(short = 'h', long, default_value = "127.0.0.1")]
    host: String,
    /// The broker's port
    #[arg(short, long, default_value_t = 1883)]
    port: u16,
    /// QoS of publishes and subscriptions: 0, 1 or 2
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Protocol version: 5 or 311
    #[arg(short = 'V', default_value = "5", value_parser = parse_version)]
    version: Protocol,
    /// Payload size in bytes (at least 20)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per publisher [default: 100000 at QoS 0, 20000 at QoS 1/2]
    #[arg(long)]
    count: Option<u64>,
    /// latency: how long to send [default: 10]; others: give up after [default: 60]
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// latency: seconds of sending not counted
    #[arg(long, value_name = "SECS", default_value_t = 1)]
    warmup: u64,
    /// QoS 1/2 messages in flight per connection (3.1.1; 5.0 brokers say theirs)
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Publishes a publisher has under way at once
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// latency: messages per second
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// fanin: publishers
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// fanout: subscribers
    #[arg(long, default_value_t = 16)]
    subscribers: usize,
    /// pairs: publisher/subscriber pairs
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// idle: how many connections
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// The broker's process id: idle reads its memory; the others add its CPU time per
    /// delivered message (from /proc/PID/stat)
    #[arg(long)]
    pid: Option<u32>,
    /// Put an idempotency key (user property msg-id, unique per message) on every
    /// publish (5.0)
    #[arg(long)]
    key: bool,
    /// Persistent sessions (expiry one hour) for every client, so QoS 1/2 deliveries are
    /// committed to the store as they go
    #[arg(long)]
    persistent: bool,
    /// Subscribers connect to this port instead (fanin, fanout, pairs, latency): the far
    /// end of a bridge whose near end (--port) takes the publishes
    #[arg(long, value_name = "PORT")]
    sub_port: Option<u16>,
    /// Ask a routed delivery receipt for every publish (5.0; Response Topic
    /// bench/receipts/CLIENT, which the publisher receives without subscribing)
    #[arg(long)]
    receipt: bool,
    /// Print help (-h is the host)
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

fn parse_version(v: &str) -> Result<Protocol, String> {
    match v {
        "5" => Ok(Protocol::V5),
        "311" => Ok(Protocol::V3_1_1),
        _ => Err("the version is 5 or 311".into()),
    }
}

/// What one run measured.
#[derive(Debug, Default)]
struct Report {
    scenario: String,
    qos: u8,
    version: String,
    size: usize,
    sent: u64,
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    seconds: f64,
    latency_us: Option<[f64; 4]>,
    extra: Vec<(String, f64)>,
}

impl Report {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.delivered as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn print(&self) {
        // One list of fields feeds both the table and the JSON line.
        let mut fields: Vec<(&str, String, bool)> = vec![
            ("scenario", self.scenario.clone(), true),
            ("qos", self.qos.to_string(), false),
            ("version", self.version.clone(), true),
            ("size", self.size.to_string(), false),
            ("sent", self.sent.to_string(), false),
            ("expected", self.expected.to_string(), false),
            ("delivered", self.delivered.to_string(), false),
            ("lost", self.lost.to_string(), false),
            ("duplicates", self.duplicates.to_string(), false),
            ("reordered", self.reordered.to_string(), false),
            ("seconds", format!("{:.6}", self.seconds), false),
            ("msgs_per_sec", format!("{:.1}", self.rate()), false),
        ];
        let header: Vec<String> = fields.iter().map(|(k, _, _)| format!("{k:>10}")).collect();
        let row: Vec<String> = fields.iter().map(|(_, v, _)| format!("{v:>10}")).collect();
        println!("{}\n{}", header.join(" "), row.join(" "));
        if let Some([p50, p90, p99, p999]) = self.latency_us {
            println!("latency (us): p50 {p50:.0}  p90 {p90:.0}  p99 {p99:.0}  p99.9 {p999:.0}");
            for (k, v) in [
                ("p50_us", p50),
                ("p90_us", p90),
                ("p99_us", p99),
                ("p999_us", p999),
            ] {
                fields.push((k, format!("{v:.1}"), false));
            }
        }
        for (k, v) in &self.extra {
            println!("{k}: {v:.1}");
            fields.push((k, format!("{v:.1}"), false));
        }
        let json: Vec<String> = fields
            .iter()
            .map(|(k, v, quoted)| {
                if *quoted {
                    format!("\"{k}\":\"{v}\"")
                } else {
                    format!("\"{k}\":{v}")
                }
            })
            .collect();
        println!("{{{}}}", json.join(","));
    }
}

struct Args {
    scenario: String,
    host: String,
    port: u16,
    qos: u8,
    version: Protocol,
    size: usize,
    count: Option<u64>,
    duration: Option<Duration>,
    warmup: Duration,
    inflight: u16,
    window: usize,
    rate: u64,
    publishers: usize,
    subscribers: usize,
    pairs: usize,
    connections: usize,
    pid: Option<u32>,
    key: bool,
    receipt: bool,
    persistent: bool,
    sub_port: Option<u16>,
}

impl From<BenchCli> for Args {
    fn from(c: BenchCli) -> Args {
        Args {
            scenario: c.scenario,
            host: c.host,
            port: c.port,
            qos: c.qos,
            version: c.version,
            size: c.size.max(HEADER),
            count: c.count,
            duration: c.duration.map(Duration::from_secs),
            warmup: Duration::from_secs(c.warmup),
            inflight: c.inflight,
            window: c.window.max(1),
            rate: c.rate.max(1),
            publishers: c.publishers.max(1),
            subscribers: c.subscribers.max(1),
            pairs: c.pairs.max(1),
            connections: c.connections,
            pid: c.pid,
            key: c.key,
            receipt: c.receipt,
            persistent: c.persistent,
            sub_port: c.sub_port,
        }
    }
}

/// `tern bench`.
pub(crate) fn run(cli: BenchCli) -> ExitCode {
    let a = Args::from(cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match a.scenario.as_str() {
            "fanin" => flow(&a, a.publishers, 1, false).await,
            "fanout" => flow(&a, 1, a.subscribers, false).await,
            "pairs" => flow(&a, a.pairs, a.pairs, true).await,
            "latency" => latency(&a).await,
            "idle" => idle(&a).await,
            "replay" => replay(&a).await,
            _ => backlog(&a).await,
        }
    });
    match result {
        Ok(r) => {
            r.print();
            if r.qos > 0 && (r.lost > 0 || r.duplicates > 0 || r.reordered > 0) {
                eprintln!(
                    "tern bench: QoS {} broke its promise: {} lost, {} duplicated, {} out of order",
                    r.qos, r.lost, r.duplicates, r.reordered
                );
                if r.lost > 0 && r.duplicates == 0 && r.reordered == 0 {
                    eprintln!(
                        "tern bench: (a broker drops what its queue limits do not hold, and says so: \
                         Tern in tern_dropped_total{{reason=\"queue_full\"}} and its log; raise \
                         [sessions] max_queued_bytes / max_queued_messages to measure without them)"
                    );
                }
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Publisher number (u32), sequence number (u64), send time in ns since the run's epoch (u64).
const HEADER: usize = 20;

fn payload(publisher: u32, seq: u64, epoch: Instant, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u32(publisher);
    b.put_u64(seq);
    b.put_u64(epoch.elapsed().as_nanos() as u64);
    b.resize(size, b'x');
    b.freeze()
}

fn header(p: &[u8]) -> Option<(u32, u64, u64)> {
    if p.len() < HEADER {
        return None;
    }
    let publisher = u32::from_be_bytes(p[0..4].try_into().ok()?);
    let seq = u64::from_be_bytes(p[4..12].try_into().ok()?);
    let sent = u64::from_be_bytes(p[12..20].try_into().ok()?);
    Some((publisher, seq, sent))
}

/// What one subscriber saw, per publisher: each sequence number once, in order.
struct Tally {
    seen: Vec<Vec<u64>>,
    next: Vec<u64>,
    delivered: u64,
    duplicates: u64,
    reordered: u64,
    latencies: Vec<u64>,
    last: Option<Instant>,
}

impl Tally {
    fn new(publishers: usize, count: u64) -> Tally {
        let words = (count as usize).div_ceil(64);
        Tally {
            seen: vec![vec![0; words]; publishers],
            next: vec![0; publishers],
            delivered: 0,
            duplicates: 0,
            reordered: 0,
            latencies: Vec::new(),
            last: None,
        }
    }

    fn record(&mut self, payload: &[u8], epoch: Instant, keep_latency: bool) {
        let Some((p, seq, sent)) = header(payload) else {
            return;
        };
        let (p, i) = (p as usize, seq as usize);
        let Some(bits) = self.seen.get_mut(p) else {
            return;
        };
        let Some(word) = bits.get_mut(i / 64) else {
            return;
        };
        if *word & (1 << (i % 64)) != 0 {
            self.duplicates += 1;
            return;
        }
        *word |= 1 << (i % 64);
        self.delivered += 1;
        if seq < self.next[p] {
            self.reordered += 1;
        } else {
            self.next[p] = seq + 1;
        }
        if keep_latency {
            let now = epoch.elapsed().as_nanos() as u64;
            self.latencies.push(now.saturating_sub(sent));
        }
    }
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn options(a: &Args, id: String) -> Options {
    let mut o = Options::new(a.host.clone(), a.port, id).protocol(a.version);
    if a.key {
        o = o.stamp("msg-id");
    }
    if a.persistent {
        o = o.persistent(Duration::from_secs(3600));
    }

    o.inflight = a.inflight;
    o.keep_alive = 60;
    // The load generator measures the broker: its subscribers read whatever arrives, and
    // a moment's lag in tallying must not turn into the client holding the broker back.
    o.max_unread = usize::MAX;
    o
}

/// The Response Topic of `--receipt` (receipts go to the publisher's own session, whatever
/// the topic: one name serves every publisher).
fn receipt_topic(on: bool) -> Option<tern_codec::TopicName> {
    on.then(|| tern_codec::TopicName::new("bench/receipts").expect("a valid topic"))
}

/// The properties of a publish asking for a routed receipt on `to` (none without one).
fn receipt_properties(
    to: &Option<tern_codec::TopicName>,
) -> tern_codec::properties::PublishProperties {
    let mut p = tern_codec::properties::PublishProperties::default();
    if let Some(to) = to {
        p.response_topic = Some(to.clone());
        p.user_properties
            .push(("tern-receipt".into(), "routed".into()));
    }
    p
}

async fn connect(a: &Args, id: String) -> Result<(Client, Events), String> {
    Client::connect(options(a, id))
        .await
        .map_err(|e| e.to_string())
}

/// As [`connect`], for a subscriber: at `--sub-port` if given.
async fn connect_sub(a: &Args, id: String) -> Result<(Client, Events), String> {
    let mut o = options(a, id);
    o.port = a.sub_port.unwrap_or(a.port);
    Client::connect(o).await.map_err(|e| e.to_string())
}

/// Publishes `count` messages as publisher `n` on `topic`, `window` under way at once.
async fn publish_all(
    client: Client,
    topic: String,
    n: u32,
    count: u64,
    a: (QoS, usize, usize, bool),
    epoch: Instant,
    sent: Arc<AtomicU64>,
) -> Result<(), String> {
    let (qos, size, window, receipt) = a;
    let receipt_to = receipt_topic(receipt);
    let mut outcomes = VecDeque::with_capacity(window);
    for seq in 0..count {
        let o = client
            .publish(topic.clone(), payload(n, seq, epoch, size))
            .qos(qos)
            .properties(receipt_properties(&receipt_to))
            .send()
            .map_err(|e| e.to_string())?;
        outcomes.push_back(o);
        if outcomes.len() >= window
            && let Some(o) = outcomes.pop_front()
        {
            o.await.map_err(|e| e.to_string())?;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    for o in outcomes {
        o.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads messages into a tally until `expected` arrived or nothing came for 5 s (or the
/// deadline passed).
async fn collect(
    mut events: Events,
    mut tally: Tally,
    expected: u64,
    epoch: Instant,
    deadline: Instant,
    latency: bool,
) -> Tally {
    // Clock readings cost the load generator a fifth of its time at a million messages a
    // second, so there is no timeout per message: a timer checks every 5 s whether anything
    // arrived since its last look (so a silence ends the run after 5 to 10 s), and the
    // arrival time of the last message is read every 64 messages and at the end.
    let quiet = Duration::from_secs(5);
    let next_look = || (Instant::now() + quiet).min(deadline);
    let look = tokio::time::sleep_until(next_look().into());
    tokio::pin!(look);
    let mut arrived = false;
    while tally.delivered < expected {
        tokio::select! {
            e = events.recv() => match e {
                Some(Event::Message(m)) => {
                    tally.record(&m.payload, epoch, latency);
                    arrived = true;
                    if tally.delivered.is_multiple_of(64) || tally.delivered == expected {
                        tally.last = Some(Instant::now());
                    }
                }
                Some(_) => {}
                None => break,
            },
            () = &mut look => {
                if !std::mem::take(&mut arrived) || Instant::now() >= deadline {
                    break;
                }
                look.as_mut().reset(next_look().into());
            }
        }
    }
    if arrived {
        tally.last = Some(Instant::now());
    }
    // Late duplicates: a short look.
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
        if let Event::Message(m) = e {
            tally.record(&m.payload, epoch, latency);
        }
    }
    tally
}

fn default_count(a: &Args) -> u64 {
    a.count.unwrap_or(if a.qos == 0 { 100_000 } else { 20_000 })
}

/// fanin, fanout and pairs: `publishers` publishers, `subscribers` subscribers; `paired`:
/// subscriber i reads only publisher i's topic.
async fn flow(
    a: &Args,
    publishers: usize,
    subscribers: usize,
    paired: bool,
) -> Result<Report, String> {
    let count = default_count(a);
    let qos = qos_of(a.qos);
    let epoch = Instant::now();
    let deadline = Instant::now() + a.duration.unwrap_or(Duration::from_secs(60));
    let run = format!(
        "{:x}",
        epoch.elapsed().as_nanos() ^ u128::from(std::process::id())
    );
    let topic = |i: usize| format!("bench/{run}/{i}");
    let mut readers = Vec::new();
    let mut subs = Vec::new();
    for s in 0..subscribers {
        let (client, events) = connect_sub(a, format!("bench-sub-{run}-{s}")).await?;
        let filter = if paired {
            topic(s)
        } else {
            format!("bench/{run}/+")
        };
        let code = client
            .subscribe(&filter, qos)
            .await
            .map_err(|e| e.to_string())?;
        if code.is_error() {
            return Err(format!("the broker refused the subscription: {code:?}"));
        }
        let expected = if paired {
            count
        } else {
            count * publishers as u64
        };
        let tally = Tally::new(publishers, count);
        readers.push(tokio::spawn(collect(
            events, tally, expected, epoch, deadline, false,
        )));
        subs.push(client);
    }
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let (client, _events) = connect(a, format!("bench-pub-{run}-{p}")).await?;
        pubs.push(client);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_before = a.pid.and_then(cpu_ticks);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (p, client) in pubs.iter().enumerate() {
        tasks.push(tokio::spawn(publish_all(
            client.clone(),
            topic(p),
            p as u32,
            count,
            (qos, a.size, a.window, a.receipt),
            epoch,
            sent.clone(),
        )));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let mut report = Report {
        scenario: a.scenario.clone(),
        qos: a.qos,
        version: version(a.version),
        size: a.size,
        sent: sent.load(Ordering::Relaxed),
        ..Report::default()
    };
    let mut last = start;
    for r in readers {
        let tally = r.await.map_err(|e| e.to_string())?;
        let expected = if paired {
            count
        } else {
            count * publishers as u64
        };
        report.expected += expected;
        report.delivered += tally.delivered;
        report.lost += expected.saturating_sub(tally.delivered);
        report.duplicates += tally.duplicates;
        report.reordered += tally.reordered;
        if let Some(l) = tally.last {
            last = last.max(l);
        }
    }
    report.seconds = (last - start).as_secs_f64();
    add_cpu(&mut report, a.pid, cpu_before);
    for c in pubs.iter().chain(&subs) {
        c.disconnect().await;
    }
    Ok(report)
}

fn version(v: Protocol) -> String {
    if v.is_v5() { "5" } else { "311" }.to_string()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// One publisher at a fixed rate, one subscriber; latency from the send time in the payload.
async fn latency(a: &Args) -> Result<Report, String> {
    let qos = qos_of(a.qos);
    let epoch = Instant::now();
    let run = format!("{:x}", std::process::id());
    let topic = format!("bench/lat/{run}");
    let duration = a.duration.unwrap_or(Duration::from_secs(10));
    let total = a.rate * (duration + a.warmup).as_secs();
    let warm = a.rate * a.warmup.as_secs();
    let (sub, events) = connect_sub(a, format!("bench-lat-sub-{run}")).await?;
    sub.subscribe(&topic, qos)
        .await
        .map_err(|e| e.to_string())?;
    let (publisher, _e) = connect(a, format!("bench-lat-pub-{run}")).await?;
    let receipt_to = receipt_topic(a.receipt);
    let tally = Tally::new(1, total);
    let deadline = Instant::now() + duration + a.warmup + Duration::from_secs(30);
    let reader = tokio::spawn(collect(events, tally, total, epoch, deadline, true));
    let interval = Duration::from_nanos(1_000_000_000 / a.rate);
    let cpu_before = a.pid.and_then(cpu_ticks);
    let start = tokio::time::Instant::now();
    let mut outcomes = VecDeque::new();
    for seq in 0..total {
        tokio::time::sleep_until(start + interval * seq as u32).await;
        outcomes.push_back(
            publisher
                .publish(topic.clone(), payload(0, seq, epoch, a.size))
                .qos(qos)
                .properties(receipt_properties(&receipt_to))
                .send()
                .map_err(|e| e.to_string())?,
        );
        while outcomes.len() > a.window {
            if let Some(o) = outcomes.pop_front() {
                o.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for o in outcomes {
        o.await.map_err(|e| e.to_string())?;
    }
    let tally = reader.await.map_err(|e| e.to_string())?;
    // Latencies are recorded in arrival order; the warm-up's come first, roughly.
    let mut lat: Vec<u64> = tally
        .latencies
        .iter()
        .skip(warm as usize)
        .copied()
        .collect();
    lat.sort_unstable();
    publisher.disconnect().await;
    sub.disconnect().await;
    let mut report = Report {
        scenario: "latency".into(),
        qos: a.qos,
        version: version(a.version),
        size: a.size,
        sent: total,
        expected: total,
        delivered: tally.delivered,
        lost: total.saturating_sub(tally.delivered),
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        seconds: (duration + a.warmup).as_secs_f64(),
        latency_us: Some([
            percentile(&lat, 0.50),
            percentile(&lat, 0.90),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999),
        ]),
        extra: vec![("rate".into(), a.rate as f64)],
    };
    add_cpu(&mut report, a.pid, cpu_before);
    Ok(report)
}

/// CPU time (user + system) `pid` has used, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state is field 3; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Adds the broker's CPU per delivered message to `report`, from ticks before and after.
fn add_cpu(report: &mut Report, pid: Option<u32>, before: Option<u64>) {
    if let (Some(pid), Some(before)) = (pid, before)
        && let Some(after) = cpu_ticks(pid)
    {
        let seconds = (after.saturating_sub(before)) as f64 / 100.0;
        report.extra.push(("broker_cpu_seconds".into(), seconds));
        if report.delivered > 0 {
            report.extra.push((
                "broker_cpu_us_per_msg".into(),
                seconds * 1e6 / report.delivered as f64,
            ));
        }
    }
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// N idle 3.1.1 connections (keep alive 0), from several 127.x.y.1 source addresses when
/// the host is loopback (20,000 per address); the broker's memory before and after.
async fn idle(a: &Args) -> Result<Report, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pid = a
        .pid
        .ok_or("idle needs --pid PID (the broker's process id)")?;
    let before = rss_kib(pid)?;
    let start = Instant::now();
    let target: std::net::SocketAddr = tokio::net::lookup_host((a.host.as_str(), a.port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the host has no address")?;
    let loopback = target.ip().is_loopback() && target.is_ipv4();
    let mut held = Vec::with_capacity(a.connections);
    let run = std::process::id();
    for i in 0..a.connections {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if loopback {
            // A /16 of loopback per run (by pid), a new address every 20,000 connections:
            // earlier runs' TIME_WAIT ports do not run this one out of source ports.
            let ip = std::net::Ipv4Addr::new(127, 1 + (run % 200) as u8, (i / 20_000) as u8, 1);
            socket
                .bind((ip, 0).into())
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let mut s = socket
            .connect(target)
            .await
            .map_err(|e| format!("connection {i}: {e}"))?;
        let mut c = tern_codec::Connect::new(Protocol::V3_1_1, format!("idle-{run}-{i}").as_str());
        c.keep_alive = 0;
        let mut out = BytesMut::new();
        tern_codec::encode(
            &tern_codec::Packet::Connect(Box::new(c)),
            Protocol::V3_1_1,
            &mut out,
        )
        .map_err(|e| e.to_string())?;
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack)
            .await
            .map_err(|e| format!("connection {i}: no CONNACK: {e}"))?;
        if ack[0] != 0x20 || ack[3] != 0 {
            return Err(format!("connection {i}: refused (CONNACK {ack:02x?})"));
        }
        held.push(s);
    }
    let seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before) * 1024) as f64 / a.connections.max(1) as f64;
    drop(held);
    Ok(Report {
        scenario: "idle".into(),
        version: "311".into(),
        sent: a.connections as u64,
        expected: a.connections as u64,
        delivered: a.connections as u64,
        seconds,
        extra: vec![
            ("connections".into(), a.connections as f64),
            ("broker_rss_before_kib".into(), before as f64),
            ("broker_rss_after_kib".into(), after as f64),
            ("bytes_per_connection".into(), per),
        ],
        ..Report::default()
    })
}

/// A persistent subscriber goes offline, K messages are published, the subscriber comes
/// back: how fast the broker replays them.
/// K messages published to a topic whose history the broker keeps, then a new subscriber
/// asks for them (`replay-since` the moment before the first) and the time to receive
/// them all is measured.
async fn replay(a: &Args) -> Result<Report, String> {
    let count = default_count(a);
    let qos = qos_of(a.qos.max(1));
    let epoch = Instant::now();
    let run = format!("{:x}", std::process::id());
    let topic = format!("bench/replay/{run}");
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .saturating_sub(1000);
    let (publisher, _e) = connect(a, format!("bench-replay-pub-{run}")).await?;
    let sent = Arc::new(AtomicU64::new(0));
    publish_all(
        publisher.clone(),
        topic.clone(),
        0,
        count,
        (qos, a.size, a.window, a.receipt),
        epoch,
        sent.clone(),
    )
    .await?;
    publisher.disconnect().await;
    let start = Instant::now();
    let (sub, events) = connect(a, format!("bench-replay-sub-{run}")).await?;
    let options = tern_client::SubscriptionOptions {
        qos,
        ..Default::default()
    };
    let since = since.to_string();
    sub.subscribe_with_properties(
        &[(topic.as_str(), options)],
        &[(tern_broker::core::REPLAY_SINCE, since.as_str())],
    )
    .await
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + a.duration.unwrap_or(Duration::from_secs(60));
    let tally = collect(events, Tally::new(1, count), count, epoch, deadline, false).await;
    let last = tally.last.unwrap_or(start);
    sub.disconnect().await;
    Ok(Report {
        scenario: "replay".into(),
        qos: a.qos.max(1),
        version: version(a.version),
        size: a.size,
        sent: sent.load(Ordering::Relaxed),
        expected: count,
        delivered: tally.delivered,
        lost: count.saturating_sub(tally.delivered),
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        seconds: (last - start).as_secs_f64(),
        ..Report::default()
    })
}

async fn backlog(a: &Args) -> Result<Report, String> {
    let count = default_count(a);
    let qos = qos_of(a.qos.max(1));
    let epoch = Instant::now();
    let run = format!("{:x}", std::process::id());
    let topic = format!("bench/backlog/{run}");
    let id = format!("bench-backlog-sub-{run}");
    let persistent = |o: Options| o.persistent(Duration::from_secs(3600));
    let (sub, _events) = Client::connect(persistent(options(a, id.clone())))
        .await
        .map_err(|e| e.to_string())?;
    sub.subscribe(&topic, qos)
        .await
        .map_err(|e| e.to_string())?;
    sub.disconnect().await;
    let (publisher, _e) = connect(a, format!("bench-backlog-pub-{run}")).await?;
    let sent = Arc::new(AtomicU64::new(0));
    publish_all(
        publisher.clone(),
        topic,
        0,
        count,
        (qos, a.size, a.window, a.receipt),
        epoch,
        sent.clone(),
    )
    .await?;
    publisher.disconnect().await;
    let start = Instant::now();
    let id_again = id.clone();
    let (sub, events) = Client::connect(persistent(options(a, id)))
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + a.duration.unwrap_or(Duration::from_secs(60));
    let tally = collect(events, Tally::new(1, count), count, epoch, deadline, false).await;
    let last = tally.last.unwrap_or(start);
    sub.disconnect().await;
    // Leave nothing behind on the broker: a clean start ends the stored session.
    if let Ok((c, _)) = Client::connect(options(a, id_again)).await {
        c.disconnect().await;
    }
    Ok(Report {
        scenario: "backlog".into(),
        qos: a.qos.max(1),
        version: version(a.version),
        size: a.size,
        sent: sent.load(Ordering::Relaxed),
        expected: count,
        delivered: tally.delivered,
        lost: count.saturating_sub(tally.delivered),
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        seconds: (last - start).as_secs_f64(),
        ..Report::default()
    })
}
