//! `[[bridge]]`: the bridges `tern broker` runs beside its server
//! ([`tern_client::bridge`]; docs/bridge.md), and their metrics.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tern_client::bridge::{Bridge, BridgeStats, Direction, Route};
use tern_client::{Backoff, Options, Protocol, QoS, TlsConfig};

use crate::config::{BridgeDirection, BridgeTable};

/// The bridge a `[[bridge]]` table describes, its file in `data_dir`, reaching the local
/// broker at `local` (`host:port`) unless the table says where. The error names the
/// bridge and the key.
pub(crate) fn bridge(t: &BridgeTable, data_dir: &Path, local: &str) -> Result<Bridge, String> {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if t.name.is_empty() || !t.name.chars().all(valid) {
        return Err(format!(
            "bridge.name: '{}' must be letters, digits, '-' or '_' (it names the bridge's file)",
            t.name
        ));
    }
    let at = format!("bridge '{}'", t.name);
    let client_id = t
        .client_id
        .clone()
        .unwrap_or_else(|| format!("tern-bridge-{}", t.name));
    if client_id.is_empty() {
        return Err(format!("{at}.client_id must not be empty"));
    }
    let mut remote =
        Options::from_url(&t.address, client_id).map_err(|e| format!("{at}.address: {e}"))?;
    remote.protocol = match t.protocol.as_str() {
        "5" | "5.0" => Protocol::V5,
        "3.1.1" => Protocol::V3_1_1,
        other => {
            return Err(format!(
                "{at}.protocol: '{other}' is not \"5\" or \"3.1.1\""
            ));
        }
    };
    if let Some(user) = &t.username {
        remote.username = Some(user.clone());
    }
    if let Some(password) = &t.password {
        remote.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    }
    if t.ca_file.is_some() || t.cert_file.is_some() || t.key_file.is_some() {
        if !(t.address.starts_with("mqtts://") || t.address.starts_with("wss://")) {
            return Err(format!(
                "{at}: ca_file/cert_file/key_file need an mqtts:// or wss:// address"
            ));
        }
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(format!("{at}: cert_file and key_file go together"));
        }
        let tls = TlsConfig::from_files(
            t.ca_file.as_deref().map(Path::new),
            t.cert_file.as_deref().map(Path::new),
            t.key_file.as_deref().map(Path::new),
        )
        .map_err(|e| format!("{at}: {e}"))?;
        remote = remote.tls(tls);
    }
    if t.session_expiry_secs == 0 {
        return Err(format!(
            "{at}.session_expiry_secs must be at least 1 (the bridge needs its session kept)"
        ));
    }
    if t.max_waiting == 0 {
        return Err(format!("{at}.max_waiting must be at least 1"));
    }
    if t.reconnect_min_ms == 0 || t.reconnect_max_ms < t.reconnect_min_ms {
        return Err(format!(
            "{at}: reconnect_min_ms must be at least 1 and at most reconnect_max_ms"
        ));
    }
    let backoff = Backoff {
        initial: Duration::from_millis(t.reconnect_min_ms),
        max: Duration::from_millis(t.reconnect_max_ms),
    };
    remote.keep_alive = t.keep_alive_secs;
    remote.session_expiry = Duration::from_secs(u64::from(t.session_expiry_secs));
    remote.reconnect = Some(backoff);
    let local_address = t.local_address.as_deref().unwrap_or(local);
    let (host, port) = local_address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("{at}.local_address: '{local_address}' is not host:port"))?;
    let mut local = Options::new(host, port, format!("tern-bridge-{}", t.name));
    local.username = t.local_username.clone();
    local.password = t
        .local_password
        .as_ref()
        .map(|p| Bytes::copy_from_slice(p.as_bytes()));
    local.reconnect = Some(backoff);
    let mut routes = Vec::with_capacity(t.topics.len());
    for (i, r) in t.topics.iter().enumerate() {
        let qos = match r.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            n => return Err(format!("{at}, topic[{i}].qos: {n} is not 0, 1 or 2")),
        };
        let direction = match r.direction {
            BridgeDirection::Out => Direction::Out,
            BridgeDirection::In => Direction::In,
            BridgeDirection::Both => Direction::Both,
        };
        routes.push(
            Route::new(r.pattern.clone(), direction, qos)
                .prefixes(r.local_prefix.clone(), r.remote_prefix.clone()),
        );
    }
    let bridge = Bridge {
        name: t.name.clone(),
        local,
        remote,
        routes,
        store: data_dir.join(format!("bridge-{}.redb", t.name)),
        max_waiting: t.max_waiting,
    };
    bridge.check()?;
    Ok(bridge)
}

/// The bridges' lines for `/metrics`.
pub(crate) fn render(bridges: &[(String, Arc<BridgeStats>)], out: &mut String) {
    if bridges.is_empty() {
        return;
    }
    type Line = (&'static str, &'static str, &'static str);
    const LINES: [Line; 6] = [
        (
            "tern_bridge_connected",
            "gauge",
            "Whether the bridge is connected to the broker (side: local, remote).",
        ),
        (
            "tern_bridge_connects_total",
            "counter",
            "Connections the bridge made to the broker.",
        ),
        (
            "tern_bridge_forwarded_total",
            "counter",
            "Messages passed on (direction out: local to remote; in: remote to local).",
        ),
        (
            "tern_bridge_waiting",
            "gauge",
            "Messages kept for the broker, not yet acknowledged by it.",
        ),
        (
            "tern_bridge_dropped_total",
            "counter",
            "QoS 0 messages not passed on because the other broker was not connected.",
        ),
        (
            "tern_bridge_refused_total",
            "counter",
            "Bridged messages a broker refused with an error reason code.",
        ),
    ];
    for (metric, kind, help) in LINES {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
        for (name, s) in bridges {
            let by_side = |values: [u64; 2], label: &str, names: [&str; 2]| {
                let mut text = String::new();
                for (v, n) in values.into_iter().zip(names) {
                    let _ = writeln!(text, "{metric}{{bridge=\"{name}\",{label}=\"{n}\"}} {v}");
                }
                text
            };
            let text = match metric {
                "tern_bridge_connected" => by_side(
                    s.connected
                        .each_ref()
                        .map(|c| u64::from(c.load(Ordering::Relaxed))),
                    "side",
                    ["local", "remote"],
                ),
                "tern_bridge_connects_total" => by_side(
                    s.connects.each_ref().map(|c| c.load(Ordering::Relaxed)),
                    "side",
                    ["local", "remote"],
                ),
                "tern_bridge_forwarded_total" => by_side(
                    s.forwarded.each_ref().map(|c| c.load(Ordering::Relaxed)),
                    "direction",
                    ["out", "in"],
                ),
                "tern_bridge_waiting" => by_side(
                    s.waiting.each_ref().map(|c| c.load(Ordering::Relaxed)),
                    "side",
                    ["local", "remote"],
                ),
                "tern_bridge_dropped_total" => format!(
                    "{metric}{{bridge=\"{name}\"}} {}\n",
                    s.dropped.load(Ordering::Relaxed)
                ),
                _ => format!(
                    "{metric}{{bridge=\"{name}\"}} {}\n",
                    s.refused.load(Ordering::Relaxed)
                ),
            };
            out.push_str(&text);
        }
    }
}
