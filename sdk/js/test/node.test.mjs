// The SDK in Node against a real `tern broker` (TCP and WebSocket) and Debian's Mosquitto,
// with a subscriber that is not ours (plain MQTT.js). Run by crates/tern/tests/js_sdk.rs
// (TERN_BIN set) or `npm test` after `cargo build -p tern`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';
import { connect, Dedup, PublishError } from '../dist/index.js';
import { Tern, Mosquitto, watcher, counts, sleep } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));

for (const transport of ['tcp', 'ws']) {
  test(`per-message QoS 0, 1 and 2 on one ${transport} connection, each promise at its guarantee`, { timeout: 120_000 }, async () => {
    const tern = await new Tern().start();
    try {
      const w = await watcher(tern.tcp, 'qos/#');
      const client = await connect({ url: tern[transport] });
      const states = [];
      client.on('state', (s) => states.push(s));
      const results = await Promise.all([
        client.publish('qos/0', { n: 0 }, { qos: 0 }),
        client.publish('qos/1', { n: 1 }, { qos: 1 }),
        client.publish('qos/2', { n: 2 }, { qos: 2 }),
      ]);
      assert.deepEqual(results.map((r) => r.reasonCode), [0, 0, 0]);
      assert.ok(results[1].key && results[2].key, 'QoS 1/2 carry an idempotency key');
      assert.equal(client.unacknowledged, 0);
      // Bytes when asked: a Uint8Array goes as is.
      await client.publish('qos/bytes', new Uint8Array([1, 2, 255]), { qos: 1 });
      const got = await w.until(4);
      assert.deepEqual(got.slice(0, 3).sort(), ['{"n":0}', '{"n":1}', '{"n":2}']);
      assert.equal(got[3], Buffer.from([1, 2, 255]).toString());
      // A subscription of our own, as an async iterator, JSON by default.
      const sub = await client.subscribe('echo/+', 1);
      await client.publish('echo/a', { hello: 'world' }, { qos: 1 });
      const it = sub[Symbol.asyncIterator]();
      const { value } = await it.next();
      assert.deepEqual(value.json(), { hello: 'world' });
      assert.equal(value.qos, 1);
      await sub.unsubscribe();
      await client.close();
      assert.equal(client.state, 'closed');
      await w.close();
    } finally {
      await tern.kill();
    }
  });
}

test('a refusal rejects with the broker reason code (a topic policy: QoS 2 minimum)', { timeout: 120_000 }, async () => {
  const tern = await new Tern('[[topic]]\nfilter = "pay/#"\nmin_qos = 2\n').start();
  try {
    const client = await connect({ url: tern.tcp });
    await assert.rejects(client.publish('pay/1', { amount: 5 }, { qos: 1 }), (e) => {
      assert.ok(e instanceof PublishError, String(e));
      assert.equal(e.reasonCode, 0x83);
      return true;
    });
    const ok = await client.publish('pay/1', { amount: 5 }, { qos: 2 });
    assert.equal(ok.reasonCode, 16, 'accepted (0x10: nobody subscribed)');
    await client.close();
  } finally {
    await tern.kill();
  }
});

test('1,000 QoS 2 publishes at once stay within the Receive Maximum and all complete', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  try {
    const w = await watcher(tern.tcp, 'burst/#');
    const client = await connect({ url: tern.tcp });
    let disconnected = false;
    client.on('state', (s) => {
      if (s !== 'connected') disconnected = true;
    });
    const all = [];
    for (let i = 0; i < 1000; i++) all.push(client.publish('burst/x', i, { qos: 2 }));
    const results = await Promise.all(all);
    assert.equal(results.length, 1000);
    assert.equal(disconnected, false, 'no DISCONNECT 0x93 (Receive Maximum exceeded)');
    const got = await w.until(1000);
    assert.equal(got.length, 1000);
    assert.deepEqual(got.map(Number), [...Array(1000).keys()], 'in order, once each');
    await client.close();
    await w.close();
  } finally {
    await tern.kill();
  }
});

test('plain MQTT.js with 300 QoS 2 publishes at once is disconnected (0x93): what flow control prevents', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  try {
    const c = mqtt.connect(tern.tcp, { protocolVersion: 5, reconnectPeriod: 0 });
    await new Promise((r) => c.once('connect', r));
    const reason = new Promise((r) => c.once('disconnect', (p) => r(p.reasonCode)));
    for (let i = 0; i < 300; i++) c.publish('burst/plain', String(i), { qos: 2 });
    assert.equal(await reason, 0x93);
    c.end(true);
  } finally {
    await tern.kill();
  }
});

test('the outbox file survives kill -9 of the publishing process: QoS 2 exactly once', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  try {
    const w = await watcher(tern.tcp, 'outbox/#');
    const dir = mkdtempSync(path.join(tmpdir(), 'tern-sdk-outbox-'));
    const outbox = path.join(dir, 'outbox.json');
    const run = (count, killAfter) =>
      new Promise((resolve) => {
        const child = spawn(
          process.execPath,
          [path.join(here, 'publisher.mjs'), tern.tcp, outbox, String(count)],
          { stdio: ['ignore', 'pipe', 'ignore'] },
        );
        let acked = 0;
        child.stdout.on('data', (d) => {
          acked += (d.toString().match(/acked/g) ?? []).length;
          if (killAfter !== undefined && acked >= killAfter) child.kill('SIGKILL');
        });
        child.on('exit', (code, signal) => resolve({ code, signal, acked }));
      });
    // The first process publishes 300 and is killed once 60 are acknowledged: the rest
    // are in its outbox (in flight with packet ids, or waiting for room).
    const first = await run(300, 60);
    assert.equal(first.signal, 'SIGKILL');
    // The second, same client id and outbox, publishes nothing new: it finishes them.
    const second = await run(0);
    assert.equal(second.code, 0);
    const got = await w.untilAll([...Array(300).keys()], 30000);
    await sleep(500);
    const c = counts(got);
    const missing = [...Array(300).keys()].filter((i) => !c.has(String(i)));
    const doubled = [...c].filter(([, n]) => n > 1);
    assert.deepEqual(missing, [], 'every message published');
    assert.deepEqual(doubled, [], 'none twice');
    await w.close();
  } finally {
    await tern.kill();
  }
});

test('the broker killed with SIGKILL while publishing QoS 1/2: nothing acknowledged lost, no QoS 2 duplicate', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  try {
    const w = await watcher(tern.tcp, 'crash/#');
    const client = await connect({ url: tern.ws, reconnect: { min: 50, max: 500 } });
    const acked = [];
    const all = [];
    for (let i = 0; i < 400; i++) {
      const qos = i % 2 === 0 ? 2 : 1;
      all.push(client.publish(`crash/q${qos}`, i, { qos }).then(() => acked.push(i)));
      if (i === 150) {
        await sleep(20);
        await tern.restart();
      }
      if (i % 50 === 0) await sleep(5);
    }
    await Promise.all(all);
    assert.equal(acked.length, 400, 'every publish completed');
    const got = await w.untilAll(acked, 30000);
    // What a late QoS 2 duplicate would need to show up.
    await sleep(500);
    const c = counts(got);
    for (const i of acked) assert.ok(c.has(String(i)), `acknowledged ${i} delivered`);
    const doubledQos2 = [...c].filter(([v, n]) => n > 1 && Number(v) % 2 === 0);
    assert.deepEqual(doubledQos2, [], 'no QoS 2 message twice');
    await client.close();
    await w.close();
  } finally {
    await tern.kill();
  }
});

test('against Mosquitto: per-message QoS and 1,000 QoS 2 at once', { timeout: 120_000 }, async () => {
  const mosq = await new Mosquitto().start();
  try {
    const w = await watcher(mosq.tcp, 'm/#');
    const client = await connect({ url: mosq.tcp });
    const r = await Promise.all([0, 1, 2].map((qos) => client.publish(`m/${qos}`, qos, { qos })));
    assert.deepEqual(r.map((x) => x.reasonCode).filter((c) => c >= 0x80), []);
    const all = [];
    for (let i = 0; i < 1000; i++) all.push(client.publish('m/burst', i, { qos: 2 }));
    await Promise.all(all);
    const got = await w.until(1003);
    assert.equal(got.length, 1003);
    await client.close();
    await w.close();
  } finally {
    await mosq.kill();
  }
});

test('Dedup drops a repeat of a stamped message', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  try {
    const client = await connect({ url: tern.tcp });
    const sub = await client.subscribe('d/#', 1);
    await client.publish('d/1', 'x', { qos: 1 });
    const it = sub[Symbol.asyncIterator]();
    const { value } = await it.next();
    const dedup = new Dedup(100);
    assert.equal(dedup.isNew(value), true);
    assert.equal(dedup.isNew(value), false);
    await client.close();
  } finally {
    await tern.kill();
  }
});
