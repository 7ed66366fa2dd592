// The durable outbox: MQTT.js's packet stores (outgoing: QoS 1/2 PUBLISH and PUBREL
// waiting for their acknowledgement; incoming: QoS 2 PUBLISH waiting for PUBREL) and the
// messages still waiting for room in the broker's Receive Maximum ("pending"), kept by a
// backend (IndexedDB in browsers, a file in Node) that writes each batch of changes
// atomically and durably before the callbacks run.

import mqtt from 'mqtt';

/** A packet as MQTT.js stores it (plain data). */
export type StoredPacket = Record<string, unknown> & { messageId?: number; cmd: string };

/** A message published but not yet handed to MQTT.js (waiting for room in flight). */
export interface PendingRecord {
  /** The idempotency key stamped on it: unique, and the record's identity. */
  key: string;
  /** Order of publication. */
  seq: number;
  topic: string;
  payload: Uint8Array | string;
  qos: 1 | 2;
  retain: boolean;
  properties: Record<string, unknown>;
}

export type Space = 'outgoing' | 'incoming';

export type Op =
  | { kind: 'put'; space: Space; id: number; packet: StoredPacket }
  | { kind: 'del'; space: Space; id: number }
  | { kind: 'putPending'; record: PendingRecord }
  | { kind: 'delPending'; key: string };

export interface Loaded {
  outgoing: StoredPacket[];
  incoming: StoredPacket[];
  pending: PendingRecord[];
}

/** Where the outbox lives. `apply` writes one batch atomically and durably. */
export interface Backend {
  load(): Promise<Loaded>;
  apply(ops: Op[]): Promise<void>;
  close(): Promise<void>;
}

/** Keeps nothing across a restart (`outbox: false`). */
export class MemoryBackend implements Backend {
  async load(): Promise<Loaded> {
    return { outgoing: [], incoming: [], pending: [] };
  }
  async apply(): Promise<void> {}
  async close(): Promise<void> {}
}

/**
 * Batches the changes of one tick into one backend write (group commit): every change
 * made while a write is under way goes into the next one, and each caller's callback runs
 * once its change is durable.
 */
export class Journal {
  private queued: Op[] = [];
  private waiting: Array<(err?: Error) => void> = [];
  private writing = false;

  constructor(private backend: Backend) {}

  /** Writes `ops` (together, atomically) and calls `done` once they are durable. */
  write(ops: Op[], done: (err?: Error) => void): void {
    this.queued.push(...ops);
    this.waiting.push(done);
    if (!this.writing) {
      this.writing = true;
      queueMicrotask(() => this.flush());
    }
  }

  private flush(): void {
    const ops = this.queued;
    const waiting = this.waiting;
    this.queued = [];
    this.waiting = [];
    this.backend.apply(ops).then(
      () => this.finish(waiting),
      (err: Error) => this.finish(waiting, err),
    );
  }

  private finish(waiting: Array<(err?: Error) => void>, err?: Error): void {
    for (const done of waiting) done(err);
    if (this.queued.length > 0) {
      queueMicrotask(() => this.flush());
    } else {
      this.writing = false;
    }
  }
}

/** The user property value of `name` in a packet's properties, if any. */
export function userProperty(properties: unknown, name: string): string | undefined {
  const up = (properties as { userProperties?: Record<string, string | string[]> } | undefined)
    ?.userProperties;
  const v = up?.[name];
  return Array.isArray(v) ? v[0] : v;
}

/**
 * MQTT.js's store with every change written through the journal before MQTT.js goes on
 * (it writes a QoS 1/2 PUBLISH to the socket only in the callback of `put`). An outgoing
 * PUBLISH carrying the key of a pending message replaces that pending record in the same
 * write, so a message is either waiting for room or in flight with its packet id, never
 * both and never neither.
 */
export class DurableStore extends mqtt.Store {
  constructor(
    private space: Space,
    private journal: Journal,
    private keyProperty: string | null,
  ) {
    super({ clean: false });
  }

  /** The packet ids it holds. */
  ids(): Iterable<number> {
    return (this as unknown as { _inflights: Map<number, unknown> })._inflights.keys();
  }

  /** Takes a packet read back from the backend (no write). */
  restore(packet: StoredPacket): void {
    super.put(packet as never, () => {});
  }

  put(packet: never, cb?: () => void): this {
    const p = packet as StoredPacket;
    super.put(packet, () => {});
    const ops: Op[] = [
      { kind: 'put', space: this.space, id: p.messageId ?? 0, packet: plain(p) },
    ];
    const key =
      this.space === 'outgoing' && p.cmd === 'publish' && this.keyProperty
        ? userProperty(p.properties, this.keyProperty)
        : undefined;
    if (key !== undefined) {
      ops.push({ kind: 'delPending', key });
    }
    this.journal.write(ops, (err) => {
      if (err) {
        // The write failed: nothing is sent that is not stored.
        (cb as unknown as (e: Error) => void)?.(err);
        return;
      }
      cb?.();
    });
    return this;
  }

  del(packet: Parameters<mqtt.Store['del']>[0], cb: Parameters<mqtt.Store['del']>[1]): this {
    const id = (packet as StoredPacket).messageId ?? 0;
    super.del(packet, (err, removed) => {
      if (err) {
        cb(err);
        return;
      }
      // Not waited for: a removal the page did not live to write only means the packet
      // goes again after the reload: a QoS 1 PUBLISH (at least once; Tern drops the repeat
      // by its key), or a PUBREL (answered with PUBCOMP again), never a completed QoS 2
      // PUBLISH (PUBREC replaced it with its PUBREL, and that write is waited for).
      this.journal.write([{ kind: 'del', space: this.space, id }], () => {});
      cb(undefined, removed);
    });
    return this;
  }
}

/** A packet as plain data for the backend: MQTT.js's own fields, payload as bytes or text. */
function plain(p: StoredPacket): StoredPacket {
  const out: StoredPacket = { cmd: p.cmd };
  for (const [k, v] of Object.entries(p)) {
    if (v === undefined || typeof v === 'function') continue;
    out[k] = k === 'payload' && v instanceof Uint8Array ? new Uint8Array(v) : v;
  }
  return out;
}
