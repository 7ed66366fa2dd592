// Node entry: the outbox in a file (`outbox: '/path/to/file'`), or in memory.

import { randomUUID } from 'node:crypto';
import { type ClientOptions, TernClient } from './client.js';
import { FileBackend } from './file.js';
import { MemoryBackend } from './storage.js';

export * from './client.js';
export type { Backend } from './storage.js';

/**
 * Connects (and keeps reconnecting) to `options.url`. With `outbox: FILE`, QoS 1/2
 * messages not yet acknowledged survive a restart of the process and are finished by the
 * next client with the same `clientId` (which is then required).
 */
export async function connect(options: ClientOptions): Promise<TernClient> {
  if (options.outbox && !options.clientId) {
    throw new Error('an outbox file belongs to a client id: give clientId');
  }
  const clientId = options.clientId ?? `tern-${randomUUID()}`;
  const backend = options.outbox ? await FileBackend.open(options.outbox) : new MemoryBackend();
  const client = new TernClient(options, clientId, backend);
  await client.start();
  return client;
}
