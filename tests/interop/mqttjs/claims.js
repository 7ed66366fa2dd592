// MQTT.js (npm `mqtt`) against a running Tern broker: one claim per run.
// usage: node claims.js URL PROTOCOL_VERSION CLAIM
//   URL: mqtt://127.0.0.1:PORT or ws://127.0.0.1:PORT/mqtt
// Exits 0 if the claim holds; otherwise prints what went wrong and exits 1.
'use strict';
const mqtt = require('mqtt');

const [url, version, claim] = process.argv.slice(2);
const protocolVersion = Number(version);
const tag = `${claim}-${process.pid}`;

function fail(msg) {
  console.error(`FAIL ${claim} (${url}, v${version}): ${msg}`);
  process.exit(1);
}
setTimeout(() => fail('timed out after 20 s'), 20000).unref();

function connect(clientId, extra = {}) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, {
      clientId, protocolVersion, reconnectPeriod: 0, connectTimeout: 5000, ...extra,
    });
    c.once('connect', (ack) => resolve([c, ack]));
    c.once('error', reject);
  });
}

const claims = {
  // Every QoS arrives once, in order, with its payload, and each publish completes.
  async each_qos_round_trips() {
    const [sub] = await connect(`sub-${tag}`);
    const got = [];
    sub.on('message', (topic, payload, packet) => got.push([topic, payload.toString(), packet.qos]));
    const granted = await sub.subscribeAsync(`t/${tag}/#`, { qos: 2 });
    if (granted[0].qos !== 2) fail(`granted ${JSON.stringify(granted)}`);
    const [pub] = await connect(`pub-${tag}`);
    for (const qos of [0, 1, 2]) {
      await pub.publishAsync(`t/${tag}/${qos}`, `m${qos}`, { qos });
    }
    // A payload bigger than one WebSocket frame of most clients' buffers.
    await pub.publishAsync(`t/${tag}/big`, 'x'.repeat(200000), { qos: 1 });
    const deadline = Date.now() + 5000;
    while (got.length < 4 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    // MQTT.js hands a QoS 2 message over at PUBREL, so arrival order across QoS levels is
    // the client's; each message must arrive exactly once, intact.
    const seen = got.map(([t, p, q]) => [t, p.length > 10 ? `${p.length} bytes` : p, q]);
    seen.sort((a, b) => (a[0] < b[0] ? -1 : 1));
    const want = [
      [`t/${tag}/0`, 'm0', 0], [`t/${tag}/1`, 'm1', 1], [`t/${tag}/2`, 'm2', 2],
      [`t/${tag}/big`, '200000 bytes', 1],
    ];
    if (JSON.stringify(seen) !== JSON.stringify(want)) fail(`got ${JSON.stringify(seen)}`);
    await pub.endAsync();
    await sub.endAsync();
  },

  // A persistent session keeps QoS 1 messages published while its client was away.
  async offline_messages_wait_in_the_session() {
    const id = `persist-${tag}`;
    const opts = protocolVersion === 5
      ? { clean: false, properties: { sessionExpiryInterval: 60 } }
      : { clean: false };
    let [sub] = await connect(id, opts);
    await sub.subscribeAsync(`t/q/${tag}`, { qos: 1 });
    await sub.endAsync();
    const [pub] = await connect(`pub-${tag}`);
    for (let i = 0; i < 5; i++) await pub.publishAsync(`t/q/${tag}`, `n${i}`, { qos: 1 });
    await pub.endAsync();
    const got = [];
    sub = mqtt.connect(url, { clientId: id, protocolVersion, reconnectPeriod: 0, ...opts });
    sub.on('message', (_t, payload) => got.push(payload.toString()));
    const ack = await new Promise((resolve, reject) => {
      sub.once('connect', resolve);
      sub.once('error', reject);
    });
    if (!ack.sessionPresent) fail('session not present');
    const deadline = Date.now() + 5000;
    while (got.length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    if (got.join(',') !== 'n0,n1,n2,n3,n4') fail(`got ${got}`);
    await sub.endAsync();
  },
};

if (!claims[claim]) fail('no such claim');
claims[claim]().then(() => process.exit(0), (e) => fail(e.stack || String(e)));
