// Browser entry: the outbox in IndexedDB, one client id per tab.

import { type ClientOptions, TernClient } from './client.js';
import { IndexedDbBackend } from './idb.js';
import { MemoryBackend } from './storage.js';

export * from './client.js';
export type { Backend } from './storage.js';

const TAB_KEY = 'tern-client-id';

/**
 * This tab's client id: kept in sessionStorage, so a reload keeps it (and its outbox)
 * while every tab has its own. A tab opened as a copy of another (which copies
 * sessionStorage) finds the id held by the other tab's Web Lock and takes a new one, so
 * two tabs never share an outbox or take each other's session.
 */
async function tabClientId(prefix: string): Promise<string> {
  const fresh = () => `${prefix}-${crypto.randomUUID()}`;
  let id = sessionStorage.getItem(TAB_KEY) ?? fresh();
  const locks = (navigator as Navigator & { locks?: LockManager }).locks;
  if (locks) {
    for (let tries = 0; tries < 3; tries++) {
      const held = await new Promise<boolean>((resolve) => {
        void locks.request(`tern:${id}`, { ifAvailable: true }, (lock) => {
          if (!lock) {
            resolve(false);
            return undefined;
          }
          resolve(true);
          // Held for the life of the page.
          return new Promise<void>(() => {});
        });
      });
      if (held) break;
      id = fresh();
    }
  }
  sessionStorage.setItem(TAB_KEY, id);
  return id;
}

/**
 * Connects (and keeps reconnecting) to `options.url` (`ws://` or `wss://`). QoS 1/2
 * messages not yet acknowledged are kept in IndexedDB: after a reload the tab's client
 * resumes its session and finishes them with their packet ids.
 */
export async function connect(options: ClientOptions): Promise<TernClient> {
  const prefix = typeof options.outbox === 'string' ? options.outbox : 'tern-outbox';
  const clientId = options.clientId ?? (await tabClientId('tern-tab'));
  const backend =
    options.outbox === false
      ? new MemoryBackend()
      : await IndexedDbBackend.open(`${prefix}:${clientId}`, options.durability);
  const client = new TernClient(options, clientId, backend);
  await client.start();
  return client;
}
