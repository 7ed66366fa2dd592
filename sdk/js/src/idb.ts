// The outbox in IndexedDB (browsers): one database per client id, three object stores,
// each batch of changes one read-write transaction with strict durability (Chromium
// flushes it to disk before `complete`).

import type { Backend, Loaded, Op, PendingRecord, StoredPacket } from './storage.js';

const STORES = ['outgoing', 'incoming', 'pending'] as const;

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error ?? new Error('IndexedDB request failed'));
  });
}

export class IndexedDbBackend implements Backend {
  private constructor(
    private db: IDBDatabase,
    private durability: 'strict' | 'relaxed',
  ) {}

  /**
   * Opens (or creates) the outbox database `name`. `strict`: each write is on disk before
   * it counts (survives a power loss); `relaxed`: handed to the operating system (survives a
   * reload, a closed tab, a browser crash; not a machine crash), several times faster.
   */
  static async open(
    name: string,
    durability: 'strict' | 'relaxed' = 'strict',
  ): Promise<IndexedDbBackend> {
    const open = indexedDB.open(name, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      for (const s of STORES) {
        if (!db.objectStoreNames.contains(s)) db.createObjectStore(s);
      }
    };
    const db = await request(open);
    return new IndexedDbBackend(db, durability);
  }

  async load(): Promise<Loaded> {
    const tx = this.db.transaction([...STORES], 'readonly');
    const all = <T>(s: string) => request(tx.objectStore(s).getAll() as IDBRequest<T[]>);
    const [outgoing, incoming, pending] = await Promise.all([
      all<StoredPacket>('outgoing'),
      all<StoredPacket>('incoming'),
      all<PendingRecord>('pending'),
    ]);
    pending.sort((a, b) => a.seq - b.seq);
    return { outgoing, incoming, pending };
  }

  apply(ops: Op[]): Promise<void> {
    if (ops.length === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      // `durability` is a Chromium/Firefox option of the transaction (not yet in every
      // TypeScript lib): strict waits for the disk.
      const tx = (
        this.db.transaction as (
          s: string[],
          m: IDBTransactionMode,
          o: { durability: string },
        ) => IDBTransaction
      ).call(this.db, [...STORES], 'readwrite', { durability: this.durability });
      (globalThis as { __ternTx?: number[] }).__ternTx?.push(ops.length);
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error ?? new Error('IndexedDB transaction failed'));
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
      for (const op of ops) {
        switch (op.kind) {
          case 'put':
            tx.objectStore(op.space).put(op.packet, op.id);
            break;
          case 'del':
            tx.objectStore(op.space).delete(op.id);
            break;
          case 'putPending':
            tx.objectStore('pending').put(op.record, op.record.key);
            break;
          case 'delPending':
            tx.objectStore('pending').delete(op.key);
            break;
        }
      }
    });
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
