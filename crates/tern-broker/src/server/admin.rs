//! The admin API on the operators' HTTP endpoint (JSON, `/api/v1/...`), answered by the
//! core from its state at the moment it is asked:
//! - `GET /api/v1/overview`: sessions online and offline, subscriptions, retained
//!   messages, queued messages and bytes, flows in flight, the deepest queues, and the
//!   connections per listener and protocol;
//! - `GET /api/v1/sessions?search=S&offset=N&limit=N`: sessions whose client id or
//!   username contains S, in client id order, a page at a time (limit 100 by default, at
//!   most 1,000), with the total;
//! - `GET /api/v1/sessions/{client id}` (percent-encoded): one session's subscriptions,
//!   queue, flows in flight, will, expiry and connection.
//!
//! Off unless `[admin] token` is set; every request carries `Authorization: Bearer
//! TOKEN` (401 without it or with another, logged). The endpoint listens on loopback
//! unless configured otherwise, like the rest of Tern.

use std::time::Instant;

use serde_json::{Value, json};
use tern_broker_core::{
    AdminAction, Broker, Gauges, RetainedView, SessionSummary, SessionView, SessionsPage,
};
use tern_codec::TopicFilter;

use super::monitor::Monitor;

/// What the API asks the core.
pub(crate) enum Query {
    Overview,
    Sessions {
        search: String,
        offset: usize,
        limit: usize,
    },
    Session(String),
    Retained {
        filter: TopicFilter,
        offset: usize,
        limit: usize,
    },
    Act(AdminAction),
}

/// The core's answer.
pub(crate) enum Answer {
    Overview(Box<(Gauges, Value)>),
    Sessions(SessionsPage),
    Session(Option<Box<SessionView>>),
    Retained(usize, Vec<RetainedView>),
    /// Whether the action found something to act on.
    Acted(bool),
}

/// Answers `query` from the core's state (on the core task).
pub(crate) fn answer(broker: &mut Broker, query: Query, now: Instant) -> Answer {
    match query {
        Query::Overview => {
            let s = broker.settings();
            let limits = json!({
                "max_queued_messages": s.max_queued_messages,
                "max_queued_bytes": s.max_queued_bytes,
                "max_queued_total_bytes": s.max_queued_total,
                "queue_policy": format!("{:?}", s.queue_policy),
                "memory_window": s.queue_window,
                "receive_maximum": s.receive_maximum,
                "maximum_qos": s.maximum_qos as u8,
                "max_packet_size": s.max_packet_size,
                "max_keep_alive": s.max_keep_alive,
                "max_write_backlog_bytes": s.max_write_backlog,
                "retain_available": s.retain_available,
            });
            Answer::Overview(Box::new((broker.gauges(now, 10), limits)))
        }
        Query::Sessions {
            search,
            offset,
            limit,
        } => Answer::Sessions(broker.sessions_page(&search, offset, limit, now)),
        Query::Session(id) => Answer::Session(broker.session_view(&id, now).map(Box::new)),
        Query::Retained {
            filter,
            offset,
            limit,
        } => {
            let (total, page) = broker.retained_matching(&filter, offset, limit);
            Answer::Retained(total, page)
        }
        Query::Act(action) => Answer::Acted(broker.handle_admin(&action, now)),
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn error(message: &str) -> String {
    json!({ "error": message }).to_string()
}

/// `%XX` escapes and `+` (in a query) decoded; `None` for a bad escape or bytes that are
/// not UTF-8.
fn decode(s: &str, plus: bool) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' if plus => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| decode(v, true))
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

fn summary(s: &SessionSummary) -> Value {
    json!({
        "client_id": &*s.client_id,
        "username": s.username.as_deref(),
        "online": s.online,
        "subscriptions": s.subscriptions,
        "queued": s.queued,
        "queued_bytes": s.queued_bytes,
        "inflight_out": s.inflight_out,
        "inflight_in": s.inflight_in,
        "expiry_secs": secs(s.expiry),
        "expires_in_secs": s.expires_in.map(secs),
    })
}

fn overview(g: &Gauges, limits: &Value, monitor: &Monitor) -> Value {
    json!({
        "limits": limits,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": monitor.is_ready(),
        "sessions": { "online": g.online, "offline": g.offline },
        "subscriptions": g.subscriptions,
        "retained": g.retained,
        "queued": g.queued,
        "queued_bytes": g.queued_bytes,
        "oldest_queued_secs": secs(g.oldest),
        "inflight_out": g.inflight_out,
        "inflight_in": g.inflight_in,
        "deepest_queues": g.largest.iter().map(|s| json!({
            "client_id": &*s.client_id,
            "queued": s.queued,
            "oldest_secs": secs(s.oldest),
        })).collect::<Vec<_>>(),
        "deliveries_by_qos": g.counters.deliveries,
        "dropped": tern_broker_core::DropReason::ALL.iter().map(|r| (r.label(), g.counters.dropped(*r))).collect::<std::collections::BTreeMap<_, _>>(),
        "qos2_duplicates": g.counters.qos2_duplicates,
        "commits": {
            "count": monitor.metrics().commit_latency.count(),
            "seconds": monitor.metrics().commit_latency.sum_secs(),
        },
        "connections": monitor.connections().into_iter().map(|(listener, protocol, n)| json!({
            "listener": listener,
            "protocol": protocol,
            "connections": n,
        })).collect::<Vec<_>>(),
    })
}

fn session(v: &SessionView) -> Value {
    let mut out = summary(&v.summary);
    out["subscriptions"] = v
        .subscriptions
        .iter()
        .map(|s| {
            json!({
                "filter": &*s.filter,
                "qos": s.options.qos as u8,
                "no_local": s.options.no_local,
                "retain_as_published": s.options.retain_as_published,
                "retain_handling": s.options.retain_handling as u8,
                "subscription_id": s.id,
            })
        })
        .collect();
    out["will"] = v.will.as_ref().map_or(Value::Null, |w| {
        json!({
            "topic": &*w.topic,
            "qos": w.qos as u8,
            "retain": w.retain,
            "payload_bytes": w.payload_bytes,
            "due_in_secs": w.due_in.map(secs),
        })
    });
    out["connection"] = v.connection.as_ref().map_or(
        Value::Null,
        |(id, peer)| json!({ "id": id, "peer": &**peer }),
    );
    out["inflight"] = v
        .inflight
        .iter()
        .map(|f| {
            let state = match (f.released, f.qos as u8) {
                (true, _) => "awaiting PUBCOMP",
                (false, 2) => "awaiting PUBREC",
                _ => "awaiting PUBACK",
            };
            json!({
                "packet_id": f.packet_id,
                "topic": &*f.topic,
                "qos": f.qos as u8,
                "state": state,
                "payload_bytes": f.payload_bytes,
                "age_secs": secs(f.age),
            })
        })
        .collect();
    out
}

/// One request: its method, target (path and query) and head (for the token). Returns
/// the status line's text and the JSON body.
pub(crate) async fn handle(
    monitor: &Monitor,
    method: &str,
    target: &str,
    head: &str,
) -> (&'static str, String) {
    let Some(token) = monitor.admin_token() else {
        return (
            "403 Forbidden",
            error("the admin API is off: set [admin] token in the configuration"),
        );
    };
    let given = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("authorization").then(|| {
            value
                .trim()
                .strip_prefix("Bearer ")
                .unwrap_or("")
                .to_string()
        })
    });
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        tracing::warn!(%method, %path, "admin API: request refused (no token, or not the configured one)");
        return (
            "401 Unauthorized",
            error("a bearer token is required (Authorization: Bearer TOKEN)"),
        );
    }
    let number = |name: &str, default: usize| {
        param(query, name).map_or(Ok(default), |v| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: expected a number"))
        })
    };
    let page = || -> Result<(usize, usize), String> {
        Ok((number("offset", 0)?, number("limit", 100)?.min(1000)))
    };
    let session_id = path
        .strip_prefix("/api/v1/sessions/")
        .map(|rest| rest.split_once('/').unwrap_or((rest, "")))
        .map(|(id, action)| (decode(id, false), action));
    let query_of = match (method, path, session_id) {
        ("GET", "/api/v1/overview", _) => Query::Overview,
        ("GET", "/api/v1/sessions", _) => match page() {
            Ok((offset, limit)) => Query::Sessions {
                search: param(query, "search").unwrap_or_default(),
                offset,
                limit,
            },
            Err(e) => return ("400 Bad Request", error(&e)),
        },
        ("GET", "/api/v1/retained", _) => {
            let filter = param(query, "filter").unwrap_or_else(|| "#".into());
            let Ok(filter) = TopicFilter::new(filter.as_str()) else {
                return (
                    "400 Bad Request",
                    error(&format!("'{filter}' is not a topic filter")),
                );
            };
            match page() {
                Ok((offset, limit)) => Query::Retained {
                    filter,
                    offset,
                    limit,
                },
                Err(e) => return ("400 Bad Request", error(&e)),
            }
        }
        (_, _, Some((None, _))) => {
            return ("400 Bad Request", error("a client id that does not decode"));
        }
        ("GET", _, Some((Some(id), ""))) => Query::Session(id),
        ("DELETE", _, Some((Some(id), ""))) => Query::Act(AdminAction::DeleteSession(id.into())),
        ("POST", _, Some((Some(id), "disconnect"))) => {
            Query::Act(AdminAction::Disconnect(id.into()))
        }
        ("POST", _, Some((Some(id), "purge"))) => Query::Act(AdminAction::PurgeQueue(id.into())),
        ("DELETE", p, _) if p.starts_with("/api/v1/retained/") => {
            match decode(&p["/api/v1/retained/".len()..], false) {
                Some(topic) => Query::Act(AdminAction::DeleteRetained(topic.into())),
                None => return ("400 Bad Request", error("a topic that does not decode")),
            }
        }
        _ => {
            return (
                "404 Not Found",
                error("no such endpoint (or not with that method)"),
            );
        }
    };
    let acting = matches!(query_of, Query::Act(_));
    if acting {
        tracing::info!(%method, %path, "admin API: action");
    }
    let body = match monitor.ask(query_of).await {
        Some(Answer::Overview(o)) => overview(&o.0, &o.1, monitor),
        Some(Answer::Sessions(page)) => json!({
            "total": page.total,
            "sessions": page.sessions.iter().map(summary).collect::<Vec<_>>(),
        }),
        Some(Answer::Session(Some(v))) => session(&v),
        Some(Answer::Session(None)) => {
            return ("404 Not Found", error("no session with that client id"));
        }
        Some(Answer::Retained(total, page)) => json!({
            "total": total,
            "retained": page.iter().map(|r| json!({
                "topic": &*r.topic,
                "qos": r.qos as u8,
                "payload_bytes": r.payload_bytes,
            })).collect::<Vec<_>>(),
        }),
        Some(Answer::Acted(true)) => json!({ "done": true }),
        Some(Answer::Acted(false)) => {
            return (
                "404 Not Found",
                error(
                    "nothing to act on (no such session, client not connected, or no retained message there)",
                ),
            );
        }
        None => {
            return (
                "503 Service Unavailable",
                error(
                    "no answer: the broker is not running, or a store failure may have lost the change",
                ),
            );
        }
    };
    ("200 OK", body.to_string())
}
