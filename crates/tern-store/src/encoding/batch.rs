//! Whole batches of ops, as records of the write-ahead log.

use super::*;

/// One message of a session: its body, the session's id for it, when it entered, and the
/// shared subscription it came through.
fn put_entry(
    w: &mut Writer,
    e: &Entry,
    shared: Option<&Str>,
    anchor: Anchor,
) -> Result<(), StoreError> {
    w.bytes(&message(&e.message, anchor)?);
    w.u64(e.id.get());
    w.time(anchor.to_wall(e.since));
    shared_tag(w, shared);
    Ok(())
}

/// Reads what [`put_entry`] wrote, or (`legacy`) a message as logs written before message
/// ids held it: such a message gets the next id of `legacy`, counted from 2^62 so that it
/// meets no id the session gave.
fn read_entry(
    r: &mut Reader<'_>,
    anchor: Anchor,
    legacy: Option<&mut u64>,
) -> Result<(Entry, Option<Str>), StoreError> {
    let body = read_body(r.bytes()?, anchor)?;
    match legacy {
        None => {
            let id = MessageId::new(r.u64()?).ok_or_else(|| corrupt(r.what))?;
            let since = anchor.to_instant(r.time()?);
            let shared = read_shared_tag(r)?;
            Ok((
                Entry {
                    id,
                    since,
                    message: body.message,
                },
                shared,
            ))
        }
        Some(next) => {
            *next += 1;
            let id = MessageId::new(*next).expect("counted from 2^62");
            let since = body.queued_at.unwrap_or(anchor.instant);
            Ok((
                Entry {
                    id,
                    since,
                    message: body.message,
                },
                body.shared,
            ))
        }
    }
}

fn outbound(s: OutboundState) -> u8 {
    match s {
        OutboundState::Published => 0,
        OutboundState::Released => 1,
    }
}

fn read_outbound(b: u8) -> Result<OutboundState, StoreError> {
    match b {
        0 => Ok(OutboundState::Published),
        1 => Ok(OutboundState::Released),
        _ => Err(corrupt("logged batch")),
    }
}

/// Op tags. 2 and 3 are the delivery ops as logged before message ids (read, never
/// written).
pub(super) const PUT_SESSION: u8 = 0;
pub(super) const DELETE_SESSION: u8 = 1;
pub(super) const PUT_DELIVERY_LEGACY: u8 = 2;
pub(super) const CHANGE_LEGACY: u8 = 3;
pub(super) const PUT_RETAINED: u8 = 4;
pub(super) const DELETE_RETAINED: u8 = 5;
pub(super) const PUT_DELIVERY: u8 = 6;
pub(super) const CHANGE: u8 = 7;
pub(super) const PUT_WILL: u8 = 8;
pub(super) const DELETE_WILL: u8 = 9;
pub(super) const PUT_KEY: u8 = 10;
pub(super) const DELETE_KEY: u8 = 11;
pub(super) const PUT_HISTORY: u8 = 12;
pub(super) const TRIM_HISTORY: u8 = 13;
pub(super) const CLUSTER_APPLIED: u8 = 14;
pub(super) const CLUSTER_FORWARDED: u8 = 15;

/// A batch of ops as one record of the write-ahead log.
pub(crate) fn batch(ops: &[crate::Op], anchor: Anchor) -> Result<Vec<u8>, StoreError> {
    use crate::Op;
    use tern_proto::Change;
    let mut w = Writer::new();
    for op in ops {
        match op {
            Op::PutSession {
                client_id,
                record: r,
            } => {
                w.u8(PUT_SESSION);
                w.bytes(client_id.as_bytes());
                w.bytes(&record(r)?);
            }
            Op::DeleteSession { client_id } => {
                w.u8(DELETE_SESSION);
                w.bytes(client_id.as_bytes());
            }
            Op::PutDelivery {
                client_id,
                state,
                shared,
            } => {
                w.u8(PUT_DELIVERY);
                w.bytes(client_id.as_bytes());
                w.u16(state.last_id());
                let flows: Vec<_> = state.inflight().collect();
                w.u32(flows.len() as u32);
                for f in flows {
                    w.u16(f.id.get());
                    w.u8(outbound(f.state));
                    let e = Entry {
                        id: f.message_id,
                        since: f.since,
                        message: f.message.clone(),
                    };
                    put_entry(&mut w, &e, shared.get(&f.message_id), anchor)?;
                }
                w.u32(state.queued_len() as u32);
                for e in state.queued() {
                    put_entry(&mut w, e, shared.get(&e.id), anchor)?;
                }
                let ids: Vec<_> = state.inbound_qos2().collect();
                w.u32(ids.len() as u32);
                for (id, s) in ids {
                    w.u16(id.get());
                    w.u8(inbound(s));
                }
            }
            Op::Change {
                client_id,
                change,
                shared,
            } => {
                w.u8(CHANGE);
                w.bytes(client_id.as_bytes());
                let shared = shared.as_ref();
                match change {
                    Change::Queued(e) => {
                        w.u8(0);
                        put_entry(&mut w, e, shared, anchor)?;
                    }
                    Change::Unqueued => w.u8(1),
                    Change::Requeued(e) => {
                        w.u8(2);
                        put_entry(&mut w, e, shared, anchor)?;
                    }
                    Change::Sent(id, e) => {
                        w.u8(3);
                        w.u16(id.get());
                        put_entry(&mut w, e, shared, anchor)?;
                    }
                    Change::Released(id) => {
                        w.u8(4);
                        w.u16(id.get());
                    }
                    Change::Completed(id) => {
                        w.u8(5);
                        w.u16(id.get());
                    }
                    Change::Inbound(id, s) => {
                        w.u8(6);
                        w.u16(id.get());
                        w.u8(inbound(*s));
                    }
                    Change::InboundDone(id) => {
                        w.u8(7);
                        w.u16(id.get());
                    }
                    Change::Launched(id) => {
                        w.u8(8);
                        w.u16(id.get());
                    }
                    Change::Removed(id) => {
                        w.u8(9);
                        w.u64(id.get());
                    }
                }
            }
            Op::PutRetained { message: m } => {
                w.u8(PUT_RETAINED);
                w.bytes(&message(m, anchor)?);
            }
            Op::DeleteRetained { topic } => {
                w.u8(DELETE_RETAINED);
                w.bytes(topic.as_str().as_bytes());
            }
            Op::PutWill {
                client_id,
                will: lw,
            } => {
                w.u8(PUT_WILL);
                w.bytes(client_id.as_bytes());
                w.bytes(&will_record(lw)?);
            }
            Op::DeleteWill { client_id } => {
                w.u8(DELETE_WILL);
                w.bytes(client_id.as_bytes());
            }
            Op::PutKey {
                identity,
                slot,
                key,
                expires,
            } => {
                w.u8(PUT_KEY);
                w.bytes(identity.as_bytes());
                w.u32(*slot);
                w.bytes(key.as_bytes());
                w.time(*expires);
            }
            Op::DeleteKey { identity, slot } => {
                w.u8(DELETE_KEY);
                w.bytes(identity.as_bytes());
                w.u32(*slot);
            }
            Op::PutHistory {
                policy,
                seq,
                at,
                message: m,
            } => {
                w.u8(PUT_HISTORY);
                w.bytes(policy.as_bytes());
                w.u64(*seq);
                w.time(*at);
                w.bytes(&message(m, anchor)?);
            }
            Op::TrimHistory { policy, through } => {
                w.u8(TRIM_HISTORY);
                w.bytes(policy.as_bytes());
                w.u64(*through);
            }
            Op::ClusterApplied(seq) => {
                w.u8(CLUSTER_APPLIED);
                w.u64(*seq);
            }
            Op::ClusterForwarded(n) => {
                w.u8(CLUSTER_FORWARDED);
                w.u64(*n);
            }
        }
    }
    Ok(w.finish())
}

pub(crate) fn read_batch(buf: &[u8], anchor: Anchor) -> Result<Vec<crate::Op>, StoreError> {
    use crate::Op;
    use tern_proto::{Change, SessionState};
    let what = "logged batch";
    let mut r = Reader::new(buf, what)?;
    let mut ops = Vec::new();
    let pid = |r: &mut Reader<'_>| -> Result<PacketId, StoreError> {
        PacketId::new(r.u16()?).ok_or_else(|| corrupt(what))
    };
    let mut legacy_ids = 1u64 << 62;
    while !r.buf.is_empty() {
        let tag = r.u8()?;
        let legacy = matches!(tag, PUT_DELIVERY_LEGACY | CHANGE_LEGACY);
        let op = match tag {
            PUT_SESSION => Op::PutSession {
                client_id: Str::from(r.str()?),
                record: read_record(r.bytes()?)?,
            },
            DELETE_SESSION => Op::DeleteSession {
                client_id: Str::from(r.str()?),
            },
            PUT_DELIVERY | PUT_DELIVERY_LEGACY => {
                let client_id = Str::from(r.str()?);
                let last_id = r.u16()?;
                let mut shared = std::collections::BTreeMap::new();
                let mut flows = Vec::new();
                for _ in 0..r.u32()? {
                    let id = pid(&mut r)?;
                    let state = read_outbound(r.u8()?)?;
                    let (e, group) = read_entry(&mut r, anchor, legacy.then_some(&mut legacy_ids))?;
                    if let Some(group) = group {
                        shared.insert(e.id, group);
                    }
                    flows.push((id, e, state));
                }
                let mut queue = Vec::new();
                for _ in 0..r.u32()? {
                    let (e, group) = read_entry(&mut r, anchor, legacy.then_some(&mut legacy_ids))?;
                    if let Some(group) = group {
                        shared.insert(e.id, group);
                    }
                    queue.push(e);
                }
                let mut ids = Vec::new();
                for _ in 0..r.u32()? {
                    let id = pid(&mut r)?;
                    ids.push((id, read_inbound(r.u8()?)?));
                }
                Op::PutDelivery {
                    client_id,
                    state: SessionState::restore(last_id, flows, queue, ids),
                    shared,
                }
            }
            CHANGE | CHANGE_LEGACY => {
                let client_id = Str::from(r.str()?);
                let mut shared = None;
                let mut entry = |r: &mut Reader<'_>| -> Result<Entry, StoreError> {
                    let (e, group) = read_entry(r, anchor, legacy.then_some(&mut legacy_ids))?;
                    shared = group;
                    Ok(e)
                };
                let change = match r.u8()? {
                    0 => Change::Queued(entry(&mut r)?),
                    1 => Change::Unqueued,
                    2 => Change::Requeued(entry(&mut r)?),
                    3 => {
                        let id = pid(&mut r)?;
                        Change::Sent(id, entry(&mut r)?)
                    }
                    4 => Change::Released(pid(&mut r)?),
                    5 => Change::Completed(pid(&mut r)?),
                    6 => {
                        let id = pid(&mut r)?;
                        Change::Inbound(id, read_inbound(r.u8()?)?)
                    }
                    7 => Change::InboundDone(pid(&mut r)?),
                    8 => Change::Launched(pid(&mut r)?),
                    9 => Change::Removed(MessageId::new(r.u64()?).ok_or_else(|| corrupt(what))?),
                    _ => return Err(corrupt(what)),
                };
                Op::Change {
                    client_id,
                    change,
                    shared,
                }
            }
            PUT_RETAINED => Op::PutRetained {
                message: read_message(r.bytes()?, anchor)?,
            },
            DELETE_RETAINED => Op::DeleteRetained {
                topic: tern_codec::TopicName::new(r.str()?).map_err(|_| corrupt(what))?,
            },
            PUT_WILL => Op::PutWill {
                client_id: Str::from(r.str()?),
                will: read_will_record(r.bytes()?)?,
            },
            DELETE_WILL => Op::DeleteWill {
                client_id: Str::from(r.str()?),
            },
            PUT_KEY => Op::PutKey {
                identity: Str::from(r.str()?),
                slot: r.u32()?,
                key: Str::from(r.str()?),
                expires: r.time()?,
            },
            DELETE_KEY => Op::DeleteKey {
                identity: Str::from(r.str()?),
                slot: r.u32()?,
            },
            PUT_HISTORY => Op::PutHistory {
                policy: Str::from(r.str()?),
                seq: r.u64()?,
                at: r.time()?,
                message: read_message(r.bytes()?, anchor)?,
            },
            TRIM_HISTORY => Op::TrimHistory {
                policy: Str::from(r.str()?),
                through: r.u64()?,
            },
            CLUSTER_APPLIED => Op::ClusterApplied(r.u64()?),
            CLUSTER_FORWARDED => Op::ClusterForwarded(r.u64()?),
            _ => return Err(corrupt(what)),
        };
        ops.push(op);
    }
    Ok(ops)
}
