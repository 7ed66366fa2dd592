// The outbox in a file (Node): the whole outbox as JSON, each batch written to a
// temporary file, fsynced and renamed over the old one (then the directory fsynced), so
// a crash leaves either the old outbox or the new one.

import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import type { Backend, Loaded, Op, PendingRecord, StoredPacket } from './storage.js';

type Encoded = Record<string, unknown>;

/** Bytes survive JSON as base64. */
function encode(v: Record<string, unknown>): Encoded {
  const out: Encoded = {};
  for (const [k, x] of Object.entries(v)) {
    out[k] = x instanceof Uint8Array ? { $bytes: Buffer.from(x).toString('base64') } : x;
  }
  return out;
}

function decode<T>(v: Encoded): T {
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) {
    const b = (x as { $bytes?: string } | null)?.$bytes;
    out[k] = typeof b === 'string' ? Buffer.from(b, 'base64') : x;
  }
  return out as T;
}

export class FileBackend implements Backend {
  private outgoing = new Map<number, Encoded>();
  private incoming = new Map<number, Encoded>();
  private pending = new Map<string, Encoded>();

  private constructor(private file: string) {}

  /** Opens the outbox file `file` (created on the first write). */
  static async open(file: string): Promise<FileBackend> {
    const b = new FileBackend(file);
    let text: string | undefined;
    try {
      text = await fs.readFile(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    if (text !== undefined) {
      const data = JSON.parse(text) as {
        outgoing: [number, Encoded][];
        incoming: [number, Encoded][];
        pending: [string, Encoded][];
      };
      b.outgoing = new Map(data.outgoing);
      b.incoming = new Map(data.incoming);
      b.pending = new Map(data.pending);
    }
    return b;
  }

  async load(): Promise<Loaded> {
    const pending = [...this.pending.values()].map((r) => decode<PendingRecord>(r));
    pending.sort((a, b) => a.seq - b.seq);
    return {
      outgoing: [...this.outgoing.values()].map((p) => decode<StoredPacket>(p)),
      incoming: [...this.incoming.values()].map((p) => decode<StoredPacket>(p)),
      pending,
    };
  }

  async apply(ops: Op[]): Promise<void> {
    for (const op of ops) {
      switch (op.kind) {
        case 'put':
          (op.space === 'outgoing' ? this.outgoing : this.incoming).set(op.id, encode(op.packet));
          break;
        case 'del':
          (op.space === 'outgoing' ? this.outgoing : this.incoming).delete(op.id);
          break;
        case 'putPending':
          this.pending.set(op.record.key, encode(op.record as unknown as Record<string, unknown>));
          break;
        case 'delPending':
          this.pending.delete(op.key);
          break;
      }
    }
    const text = JSON.stringify({
      outgoing: [...this.outgoing],
      incoming: [...this.incoming],
      pending: [...this.pending],
    });
    const tmp = `${this.file}.tmp`;
    const handle = await fs.open(tmp, 'w');
    try {
      await handle.writeFile(text);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(tmp, this.file);
    const dir = await fs.open(path.dirname(path.resolve(this.file)), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }

  async close(): Promise<void> {}
}
