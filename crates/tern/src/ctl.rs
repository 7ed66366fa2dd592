//! `tern ctl`: the admin API (docs/observability.md) from the command line. Listings print
//! as tables (or the API's JSON with `--json`); actions print what was done. Exit codes: 0
//! done, 1 the endpoint could not be reached or answered oddly, 2 bad usage, 3 refused (no
//! token, a wrong one, or the API off), 4 nothing there (no such session, client not
//! connected, no retained message).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

/// `tern ctl`'s flags.
#[derive(clap::Args)]
pub(crate) struct CtlCli {
    /// The broker's metrics/admin endpoint
    #[arg(long, default_value = "127.0.0.1:9090", value_name = "HOST:PORT")]
    endpoint: String,
    /// The admin token (`[admin] token` in the broker's configuration)
    #[arg(
        long,
        env = "TERN_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Print the API's JSON instead of a table
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand)]
enum CtlCommand {
    /// Sessions, queues and connections at a glance
    Overview,
    /// List sessions (client id order)
    Sessions {
        /// Only those whose client id or username contains this
        #[arg(long)]
        search: Option<String>,
        /// Skip this many
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// At most this many (up to 1,000)
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One session: subscriptions, queue, flows in flight, will, connection
    Session {
        /// Its client id
        client_id: String,
    },
    /// Disconnect a client (5.0: DISCONNECT 0x98 Administrative action)
    Kick {
        /// Its client id
        client_id: String,
    },
    /// Drop the messages waiting in a session's queue
    Purge {
        /// Its client id
        client_id: String,
    },
    /// Delete a session (its client is disconnected first)
    DeleteSession {
        /// Its client id
        client_id: String,
    },
    /// List retained messages
    Retained {
        /// Topic filter
        #[arg(default_value = "#")]
        filter: String,
    },
    /// Delete the retained message on a topic
    DeleteRetained {
        /// Its topic
        topic: String,
    },
}

/// Percent-encodes everything but unreserved characters (a client id or topic in a path or
/// a query).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request to the endpoint: the status code and the JSON body.
fn request(
    endpoint: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> Result<(u16, Value), String> {
    let mut s = std::net::TcpStream::connect(endpoint)
        .map_err(|e| format!("cannot reach {endpoint}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Length: 0\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("{endpoint}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{endpoint}: not an HTTP answer"))?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body)
        .map_err(|_| format!("{endpoint}: not the admin API (HTTP {status}): {body}"))?;
    Ok((status, json))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.0}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Prints `rows` of `fields` from `items` as an aligned table.
fn table(items: &[Value], fields: &[(&str, &str)]) {
    let mut rows = vec![
        fields
            .iter()
            .map(|(_, h)| h.to_string())
            .collect::<Vec<_>>(),
    ];
    for item in items {
        rows.push(fields.iter().map(|(k, _)| text(&item[*k])).collect());
    }
    let widths: Vec<usize> = (0..fields.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `tern ctl`.
pub(crate) fn run(cli: CtlCli) -> ExitCode {
    let (method, path) = match &cli.command {
        CtlCommand::Overview => ("GET", "/api/v1/overview".to_string()),
        CtlCommand::Sessions {
            search,
            offset,
            limit,
        } => (
            "GET",
            format!(
                "/api/v1/sessions?offset={offset}&limit={limit}&search={}",
                encode(search.as_deref().unwrap_or(""))
            ),
        ),
        CtlCommand::Session { client_id } => {
            ("GET", format!("/api/v1/sessions/{}", encode(client_id)))
        }
        CtlCommand::Kick { client_id } => (
            "POST",
            format!("/api/v1/sessions/{}/disconnect", encode(client_id)),
        ),
        CtlCommand::Purge { client_id } => (
            "POST",
            format!("/api/v1/sessions/{}/purge", encode(client_id)),
        ),
        CtlCommand::DeleteSession { client_id } => {
            ("DELETE", format!("/api/v1/sessions/{}", encode(client_id)))
        }
        CtlCommand::Retained { filter } => (
            "GET",
            format!("/api/v1/retained?filter={}&limit=1000", encode(filter)),
        ),
        CtlCommand::DeleteRetained { topic } => {
            ("DELETE", format!("/api/v1/retained/{}", encode(topic)))
        }
    };
    let (status, body) = match request(&cli.endpoint, cli.token.as_deref(), method, &path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern ctl: {e}");
            return ExitCode::from(1);
        }
    };
    if status != 200 {
        let why = body["error"].as_str().unwrap_or("refused");
        eprintln!("tern ctl: {why} (HTTP {status})");
        return ExitCode::from(match status {
            401 | 403 => 3,
            404 => 4,
            400 => 2,
            _ => 1,
        });
    }
    if cli.json {
        println!("{body:#}");
        return ExitCode::SUCCESS;
    }
    match &cli.command {
        CtlCommand::Overview => {
            println!(
                "sessions: {} online, {} offline; subscriptions {}; retained {}",
                body["sessions"]["online"],
                body["sessions"]["offline"],
                body["subscriptions"],
                body["retained"]
            );
            println!(
                "queued: {} messages, {} bytes (oldest {} s); in flight: {} out, {} in",
                body["queued"],
                body["queued_bytes"],
                text(&body["oldest_queued_secs"]),
                body["inflight_out"],
                body["inflight_in"]
            );
            if let Some(deepest) = body["deepest_queues"].as_array().filter(|d| !d.is_empty()) {
                println!("deepest queues:");
                table(deepest, &[("client_id", "CLIENT ID"), ("queued", "QUEUED")]);
            }
        }
        CtlCommand::Sessions { .. } => {
            let items = body["sessions"].as_array().cloned().unwrap_or_default();
            table(
                &items,
                &[
                    ("client_id", "CLIENT ID"),
                    ("username", "USER"),
                    ("online", "ONLINE"),
                    ("subscriptions", "SUBS"),
                    ("queued", "QUEUED"),
                    ("queued_bytes", "BYTES"),
                    ("inflight_out", "IN FLIGHT"),
                ],
            );
            println!("({} of {})", items.len(), body["total"]);
        }
        CtlCommand::Session { .. } => {
            for key in [
                "client_id",
                "username",
                "online",
                "queued",
                "queued_bytes",
                "inflight_out",
                "inflight_in",
                "expiry_secs",
                "expires_in_secs",
            ] {
                println!("{key}: {}", text(&body[key]));
            }
            if let Some(c) = body["connection"].as_object() {
                println!("connection: {} from {}", text(&c["id"]), text(&c["peer"]));
            }
            if body["will"].is_object() {
                println!(
                    "will: {} (QoS {}, {} bytes)",
                    text(&body["will"]["topic"]),
                    body["will"]["qos"],
                    body["will"]["payload_bytes"]
                );
            }
            let subs = body["subscriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            table(
                &subs,
                &[
                    ("filter", "FILTER"),
                    ("qos", "QOS"),
                    ("no_local", "NO LOCAL"),
                    ("subscription_id", "ID"),
                ],
            );
        }
        CtlCommand::Retained { .. } => {
            let items = body["retained"].as_array().cloned().unwrap_or_default();
            table(
                &items,
                &[
                    ("topic", "TOPIC"),
                    ("qos", "QOS"),
                    ("payload_bytes", "BYTES"),
                ],
            );
            println!("({} of {})", items.len(), body["total"]);
        }
        CtlCommand::Kick { client_id } => println!("disconnected {client_id}"),
        CtlCommand::Purge { client_id } => println!("purged the queue of {client_id}"),
        CtlCommand::DeleteSession { client_id } => println!("deleted session {client_id}"),
        CtlCommand::DeleteRetained { topic } => println!("deleted the retained message on {topic}"),
    }
    ExitCode::SUCCESS
}
