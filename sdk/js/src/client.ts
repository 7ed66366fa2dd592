// TernClient: per-message QoS over one MQTT 5 connection (MQTT.js underneath), publishes
// whose promises resolve when their QoS's guarantee is met, a durable outbox, flow
// control within the broker's Receive Maximum, reconnect with backoff and jitter.

import mqtt from 'mqtt';
import type { IClientOptions, IPublishPacket, MqttClient } from 'mqtt';
import {
  type Backend,
  DurableStore,
  Journal,
  type PendingRecord,
  type StoredPacket,
  userProperty,
} from './storage.js';

export type QoS = 0 | 1 | 2;

/** What a connection is doing, as `client.state` says and the `state` event tells. */
export type ConnectionState = 'connecting' | 'connected' | 'reconnecting' | 'offline' | 'closed';

export interface ClientOptions {
  /** `ws://`, `wss://` (browsers and Node), `mqtt://`, `mqtts://` (Node). */
  url: string;
  /** The client id; the outbox belongs to it. Browsers: one per tab by default. */
  clientId?: string;
  username?: string;
  password?: string;
  /**
   * Where QoS 1/2 messages and the session's QoS 2 state are kept until acknowledged:
   * browsers: an IndexedDB database name prefix (default `tern-outbox`); Node: a file path
   * (default: none, in memory). `false`: in memory only (lost with the page or process).
   */
  outbox?: string | false;
  /**
   * Browsers: how the outbox's IndexedDB writes count as done. `strict` (default): on
   * disk (a power loss keeps them); `relaxed`: handed to the operating system (a reload, a
   * closed tab or a browser crash keeps them, a machine crash may not), faster.
   */
  durability?: 'strict' | 'relaxed';
  /** How long the broker keeps the session while the client is away (s, default 3600). */
  sessionExpiry?: number;
  /**
   * The user property stamped on every QoS 1/2 message with a unique id (default
   * `msg-id`: Tern's idempotency key, and what `Dedup` reads). `null`: none (then the
   * outbox cannot tell a message in flight from one waiting: keep it).
   */
  keyProperty?: string | null;
  /** Reconnect backoff in ms (full jitter between 0 and min(max, min * 2^attempt)). */
  reconnect?: { min: number; max: number } | false;
  keepalive?: number;
  /** Anything else for MQTT.js (TLS options in Node, for example). */
  mqtt?: Partial<IClientOptions>;
}

export interface PublishOptions {
  qos?: QoS;
  retain?: boolean;
  /** MQTT 5 PUBLISH properties, as MQTT.js names them. */
  properties?: Record<string, unknown>;
}

/** What a publish resolves with. */
export interface PublishResult {
  /** The broker's reason code (0 Success, 16 No matching subscribers). */
  reasonCode: number;
  /** The idempotency key stamped on the message, if any. */
  key?: string;
}

/** A broker's refusal of a publish (PUBACK/PUBREC reason code 0x80 or above). */
export class PublishError extends Error {
  constructor(
    message: string,
    public reasonCode: number,
  ) {
    super(message);
    this.name = 'PublishError';
  }
}

/** A received message. */
export class Message {
  constructor(
    public topic: string,
    public payload: Uint8Array,
    public qos: QoS,
    public retain: boolean,
    public properties: Record<string, unknown>,
  ) {}

  /** The payload as UTF-8 text. */
  text(): string {
    return new TextDecoder().decode(this.payload);
  }

  /** The payload parsed as JSON (the SDK's publish default). */
  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }

  /** A user property's value. */
  userProperty(name: string): string | undefined {
    return userProperty(this.properties, name);
  }
}

/** A subscription: an async iterator of its messages, and `unsubscribe`. */
export class Subscription implements AsyncIterable<Message> {
  private buffer: Message[] = [];
  private waiters: Array<(r: IteratorResult<Message>) => void> = [];
  private ended = false;

  constructor(
    public filter: string,
    public grantedQos: number,
    private onUnsubscribe: () => Promise<void>,
  ) {}

  /** @internal */
  push(m: Message): void {
    const w = this.waiters.shift();
    if (w) w({ value: m, done: false });
    else this.buffer.push(m);
  }

  async unsubscribe(): Promise<void> {
    this.ended = true;
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
    await this.onUnsubscribe();
  }

  [Symbol.asyncIterator](): AsyncIterator<Message> {
    return {
      next: () => {
        const m = this.buffer.shift();
        if (m) return Promise.resolve({ value: m, done: false });
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => this.waiters.push(resolve));
      },
      return: async () => {
        await this.unsubscribe();
        return { value: undefined, done: true };
      },
    };
  }
}

type Listener = (...args: never[]) => void;

/**
 * Message ids MQTT.js may hand out, minus those of packets in the outgoing store that it
 * has not sent again yet: read back from the outbox, or still there when a connection
 * ended. (MQTT.js clears its provider at every CONNACK and registers each stored packet's
 * id as it resends it; a publish in between must not take one of those ids, or it would
 * overwrite that packet in the store.)
 */
class Ids {
  private used = new Set<number>();
  private reserved = new Set<number>();
  private last = 0;

  constructor(private held: () => Iterable<number>) {}

  reserve(id: number): void {
    this.reserved.add(id);
  }
  allocate(): number | null {
    for (let i = 0; i < 65535; i++) {
      this.last = (this.last % 65535) + 1;
      if (!this.used.has(this.last) && !this.reserved.has(this.last)) {
        this.used.add(this.last);
        return this.last;
      }
    }
    return null;
  }
  getLastAllocated(): number | null {
    return this.last || null;
  }
  register(id: number): boolean {
    if (this.reserved.delete(id)) {
      this.used.add(id);
      return true;
    }
    if (this.used.has(id)) return false;
    this.used.add(id);
    return true;
  }
  deallocate(id: number): void {
    this.used.delete(id);
  }
  clear(): void {
    this.used.clear();
    for (const id of this.held()) this.reserved.add(id);
  }
}

interface Waiting {
  record: PendingRecord;
  resolve?: (r: PublishResult) => void;
  reject?: (e: Error) => void;
}

let counter = 0;

/** A unique idempotency key: client id, time, a counter and randomness. */
function newKey(clientId: string): string {
  counter = (counter + 1) % 0x100000;
  const rnd = Math.floor(Math.random() * 0x100000000).toString(36);
  return `${clientId}:${Date.now().toString(36)}:${counter.toString(36)}:${rnd}`;
}

function encodePayload(payload: unknown): Uint8Array | string {
  if (payload instanceof Uint8Array) return payload;
  if (payload instanceof ArrayBuffer) return new Uint8Array(payload);
  return JSON.stringify(payload);
}

export class TernClient {
  /** The connection's state; `on('state', ...)` tells each change. */
  state: ConnectionState = 'connecting';
  readonly clientId: string;
  private mqtt!: MqttClient;
  private journal: Journal;
  private outgoing!: DurableStore;
  private incoming!: DurableStore;
  private ids = new Ids(() => this.outgoing?.ids() ?? []);
  private queue: Waiting[] = [];
  private inflight = new Map<string, Waiting>();
  private receiveMaximum = 65535;
  private seq = 0;
  private listeners = new Map<string, Set<Listener>>();
  private subscriptions = new Map<string, Set<Subscription>>();
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private closing = false;
  private keyProperty: string | null;
  /** Packet ids of messages in flight before a reload or restart, to their keys. */
  private restored = new Map<number, string>();
  /** PUBACK/PUBREC reason codes other than Success, by packet id, until completion. */
  private ackReasons = new Map<number, number>();

  /** @internal use `connect` */
  constructor(
    private options: ClientOptions,
    clientId: string,
    private backend: Backend,
  ) {
    this.clientId = clientId;
    this.keyProperty = options.keyProperty === undefined ? 'msg-id' : options.keyProperty;
    this.journal = new Journal(backend);
  }

  /** @internal */
  async start(): Promise<void> {
    this.outgoing = new DurableStore('outgoing', this.journal, this.keyProperty);
    this.incoming = new DurableStore('incoming', this.journal, null);
    const loaded = await this.backend.load();
    // Packets in flight before a reload or restart go again with their ids.
    for (const p of loaded.outgoing) {
      if (p.messageId) this.ids.reserve(p.messageId);
      this.outgoing.restore(p);
      const key = p.cmd === 'publish' && this.keyProperty
        ? userProperty(p.properties, this.keyProperty)
        : undefined;
      if (key && p.messageId) {
        this.inflight.set(key, { record: { key } as PendingRecord });
        this.restored.set(p.messageId, key);
      }
    }
    for (const p of loaded.incoming) this.incoming.restore(p);
    for (const record of loaded.pending) {
      this.seq = Math.max(this.seq, record.seq);
      this.queue.push({ record });
    }
    const o = this.options;
    const reconnect = o.reconnect === undefined ? { min: 250, max: 10_000 } : o.reconnect;
    this.mqtt = mqtt.connect(o.url, {
      protocolVersion: 5,
      clientId: this.clientId,
      clean: false,
      username: o.username,
      password: o.password,
      keepalive: o.keepalive ?? 30,
      reconnectPeriod: 0,
      connectTimeout: 10_000,
      properties: { sessionExpiryInterval: o.sessionExpiry ?? 3600 },
      outgoingStore: this.outgoing as never,
      incomingStore: this.incoming as never,
      messageIdProvider: this.ids as never,
      ...o.mqtt,
    });
    this.mqtt.on('connect', (connack) => {
      this.attempt = 0;
      this.receiveMaximum = connack.properties?.receiveMaximum ?? 65535;
      this.setState('connected');
      this.pump();
    });
    this.mqtt.on('message', (topic, payload, packet) => this.deliver(topic, payload, packet));
    // Messages of the previous page or process: MQTT.js sends them again with their ids
    // but holds no callback for them; their acknowledgements settle them here.
    this.mqtt.on('packetreceive', (packet) => {
      const p = packet as { cmd: string; messageId?: number; reasonCode?: number };
      if (p.messageId === undefined) return;
      // MQTT.js completes a publish with the packet it stored, not the acknowledgement:
      // the reason (0x10 No matching subscribers) is kept here until then.
      if ((p.cmd === 'puback' || p.cmd === 'pubrec') && (p.reasonCode ?? 0) > 0) {
        this.ackReasons.set(p.messageId, p.reasonCode ?? 0);
      }
      if (this.restored.size === 0) return;
      const key = this.restored.get(p.messageId);
      if (key === undefined) return;
      // (PUBCOMP 0x92: the flow was completed before; see `completed`.)
      const refused = (p.reasonCode ?? 0) >= 0x80 && !(p.cmd === 'pubcomp' && p.reasonCode === 0x92);
      if (p.cmd === 'puback' || p.cmd === 'pubcomp' || (p.cmd === 'pubrec' && refused)) {
        this.restored.delete(p.messageId);
        const err = refused
          ? new PublishError(`refused by the broker (0x${(p.reasonCode ?? 0).toString(16)})`, p.reasonCode ?? 0)
          : undefined;
        this.completed(key, err, p);
      }
    });
    this.mqtt.on('error', (err) => this.emit('error', err));
    this.mqtt.on('close', () => {
      if (this.closing) return;
      if (reconnect === false) {
        this.setState('closed');
        return;
      }
      this.scheduleReconnect(reconnect);
    });
    if (typeof globalThis.addEventListener === 'function' && typeof navigator !== 'undefined') {
      globalThis.addEventListener('offline', this.wentOffline);
      globalThis.addEventListener('online', this.cameOnline);
    }
  }

  private wentOffline = (): void => {
    if (this.closing) return;
    this.setState('offline');
    // A socket that no longer reaches anything may take a keep alive to notice.
    (this.mqtt as unknown as { stream?: { destroy?: () => void } }).stream?.destroy?.();
  };

  private cameOnline = (): void => {
    if (this.closing || this.state === 'connected') return;
    clearTimeout(this.reconnectTimer);
    this.attempt = 0;
    this.reconnectNow();
  };

  private scheduleReconnect(r: { min: number; max: number }): void {
    if (typeof navigator !== 'undefined' && navigator.onLine === false) {
      this.setState('offline');
      return;
    }
    this.setState('reconnecting');
    const cap = Math.min(r.max, r.min * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.reconnectNow(), Math.random() * cap);
  }

  private reconnectNow(): void {
    if (this.closing) return;
    this.setState('reconnecting');
    // MQTT.js's reconnect() without stores starts with empty in-memory ones: ours go again.
    this.mqtt.reconnect({
      incomingStore: this.incoming as never,
      outgoingStore: this.outgoing as never,
    } as never);
  }

  private setState(s: ConnectionState): void {
    if (this.state === s) return;
    this.state = s;
    this.emit('state', s);
  }

  on(event: 'state', fn: (s: ConnectionState) => void): this;
  on(event: 'message', fn: (m: Message) => void): this;
  on(event: 'settled', fn: (key: string, r: PublishResult | Error) => void): this;
  on(event: 'error', fn: (e: Error) => void): this;
  on(event: string, fn: Listener): this {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn);
    return this;
  }

  off(event: string, fn: Listener): this {
    this.listeners.get(event)?.delete(fn);
    return this;
  }

  private emit(event: string, ...args: unknown[]): void {
    for (const fn of this.listeners.get(event) ?? []) (fn as (...a: unknown[]) => void)(...args);
  }

  /** Resolves once the client is connected (at once if it is). */
  whenConnected(): Promise<void> {
    if (this.state === 'connected') return Promise.resolve();
    return new Promise((resolve) => {
      const on = (s: ConnectionState) => {
        if (s === 'connected') {
          this.off('state', on as Listener);
          resolve();
        }
      };
      this.on('state', on);
    });
  }

  /** QoS 1/2 messages not yet acknowledged: waiting for room, and in flight. */
  get unacknowledged(): number {
    return this.queue.length + this.inflight.size;
  }

  /**
   * Publishes `payload` (JSON-encoded, unless it is a Uint8Array or ArrayBuffer, sent as
   * bytes) to `topic`. Resolves when the QoS's guarantee is met: QoS 0 once written to
   * the connection, QoS 1 on PUBACK, QoS 2 on PUBCOMP; rejects with a `PublishError`
   * carrying the broker's reason code if it refuses. A QoS 1/2 message is in the durable
   * outbox before this returns its promise's first tick: after a reload or a restart the
   * client finishes it (and says so with a `settled` event).
   */
  async publish(topic: string, payload: unknown, opts: PublishOptions = {}): Promise<PublishResult> {
    const qos = opts.qos ?? 0;
    const body = encodePayload(payload);
    if (qos === 0) {
      return new Promise((resolve, reject) => {
        this.mqtt.publish(
          topic,
          body as string,
          { qos: 0, retain: opts.retain ?? false, properties: opts.properties as never },
          (err) => (err ? reject(err) : resolve({ reasonCode: 0 })),
        );
      });
    }
    const properties: Record<string, unknown> = { ...(opts.properties ?? {}) };
    const key = this.keyProperty ? newKey(this.clientId) : `${this.clientId}:${++this.seq}`;
    if (this.keyProperty) {
      properties.userProperties = {
        ...((properties.userProperties as Record<string, string>) ?? {}),
        [this.keyProperty]: key,
      };
    }
    const record: PendingRecord = {
      key,
      seq: ++this.seq,
      topic,
      payload: body,
      qos,
      retain: opts.retain ?? false,
      properties,
    };
    await new Promise<void>((resolve, reject) =>
      this.journal.write([{ kind: 'putPending', record }], (err) =>
        err ? reject(err) : resolve(),
      ),
    );
    return new Promise((resolve, reject) => {
      this.queue.push({ record, resolve, reject });
      this.pump();
    });
  }

  /** Hands waiting messages to MQTT.js while the broker's Receive Maximum has room. */
  private pump(): void {
    while (
      this.state === 'connected' &&
      this.queue.length > 0 &&
      this.inflight.size < this.receiveMaximum
    ) {
      const w = this.queue.shift() as Waiting;
      const r = w.record;
      this.inflight.set(r.key, w);
      this.mqtt.publish(
        r.topic,
        r.payload as string,
        { qos: r.qos, retain: r.retain, properties: r.properties as never },
        (err, packet) => this.completed(r.key, err, packet),
      );
    }
  }

  private completed(key: string, err?: Error, packet?: unknown): void {
    const w = this.inflight.get(key);
    this.inflight.delete(key);
    const p = packet as { cmd?: string; messageId?: number; reasonCode?: number } | undefined;
    let reasonCode = (err as { code?: number } | undefined)?.code ?? 0;
    if (p?.messageId !== undefined && this.ackReasons.has(p.messageId)) {
      reasonCode = this.ackReasons.get(p.messageId) ?? reasonCode;
      this.ackReasons.delete(p.messageId);
    } else if (p?.cmd === 'puback' || p?.cmd === 'pubcomp' || p?.cmd === 'pubrec') {
      reasonCode = p.reasonCode ?? reasonCode;
    }
    // PUBCOMP 0x92 (Packet Identifier not found) answers a PUBREL sent again for a flow the
    // broker had already completed (its PUBCOMP was lost with the connection): PUBREC had
    // said the broker has the message, so the publish succeeded.
    if (err && reasonCode === 0x92 && (p?.cmd === 'pubcomp' || p?.cmd === 'pubrel')) {
      err = undefined;
      reasonCode = 0;
    }
    if (err) {
      const e =
        reasonCode >= 0x80 ? new PublishError(err.message, reasonCode) : (err as Error);
      if (w?.reject) w.reject(e);
      else this.emit('settled', key, e);
    } else {
      const result = { reasonCode, key: this.keyProperty ? key : undefined };
      if (w?.resolve) w.resolve(result);
      else this.emit('settled', key, result);
    }
    this.pump();
  }

  /**
   * Subscribes to `filter` at `qos`; the returned subscription is an async iterator of
   * its messages (and `handler`, if given, is called with each).
   */
  async subscribe(
    filter: string,
    qos: QoS = 0,
    handler?: (m: Message) => void,
  ): Promise<Subscription> {
    const granted = await new Promise<number>((resolve, reject) => {
      this.mqtt.subscribe(filter, { qos }, (err, grants) => {
        if (err) return reject(err);
        const g = grants?.[0]?.qos ?? 0x80;
        if (g >= 0x80) return reject(new Error(`subscription to ${filter} refused (0x${g.toString(16)})`));
        resolve(g);
      });
    });
    const sub = new Subscription(filter, granted, async () => {
      const set = this.subscriptions.get(filter);
      set?.delete(sub);
      if (set && set.size === 0) {
        this.subscriptions.delete(filter);
        await this.mqtt.unsubscribeAsync(filter);
      }
    });
    if (handler) {
      void (async () => {
        for await (const m of sub) handler(m);
      })();
    }
    let set = this.subscriptions.get(filter);
    if (!set) this.subscriptions.set(filter, (set = new Set()));
    set.add(sub);
    return sub;
  }

  private deliver(topic: string, payload: Uint8Array, packet: IPublishPacket): void {
    const m = new Message(
      topic,
      new Uint8Array(payload),
      packet.qos as QoS,
      packet.retain,
      (packet.properties ?? {}) as Record<string, unknown>,
    );
    this.emit('message', m);
    for (const [filter, subs] of this.subscriptions) {
      if (matches(filter, topic)) for (const s of subs) s.push(m);
    }
  }

  /** Disconnects (the session stays at the broker for `sessionExpiry`). */
  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.reconnectTimer);
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('offline', this.wentOffline);
      globalThis.removeEventListener('online', this.cameOnline);
    }
    await this.mqtt.endAsync();
    await this.backend.close();
    this.setState('closed');
  }
}

/** Whether `topic` matches the MQTT filter `filter` (shared subscriptions by their filter). */
export function matches(filter: string, topic: string): boolean {
  let f = filter;
  if (f.startsWith('$share/')) f = f.split('/').slice(2).join('/');
  const fl = f.split('/');
  const tl = topic.split('/');
  if (topic.startsWith('$') && (fl[0] === '#' || fl[0] === '+')) return false;
  for (let i = 0; i < fl.length; i++) {
    if (fl[i] === '#') return true;
    if (i >= tl.length) return false;
    if (fl[i] !== '+' && fl[i] !== tl[i]) return false;
  }
  return fl.length === tl.length;
}

/**
 * Drops QoS 1 redeliveries on the receiving side by the idempotency key the publisher
 * stamped (`msg-id` by default), remembering the last `window` keys.
 */
export class Dedup {
  private seen = new Set<string>();
  private order: string[] = [];
  constructor(
    private window = 10_000,
    private key = 'msg-id',
  ) {}

  /** Whether `m` is new (true) or a repeat of a message seen within the window. */
  isNew(m: Message): boolean {
    const k = m.userProperty(this.key);
    if (k === undefined) return true;
    if (this.seen.has(k)) return false;
    this.seen.add(k);
    this.order.push(k);
    if (this.order.length > this.window) this.seen.delete(this.order.shift() as string);
    return true;
  }
}

export type { StoredPacket };
