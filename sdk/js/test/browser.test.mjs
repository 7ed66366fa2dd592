// The bundled SDK (dist/tern.browser.js) in a real browser: Debian's Chromium, headless,
// driven by puppeteer-core, against a real `tern broker` over ws:// and wss:// (a
// self-signed certificate the test makes), with a subscriber that is not ours (plain
// MQTT.js in Node) counting what arrives.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Tern, watcher, counts, sleep } from './helpers.mjs';
import { servePage, launch } from './browser-helpers.mjs';

let server;
let browser;
let pageUrl;

before(async () => {
  server = await servePage();
  pageUrl = `http://127.0.0.1:${server.address().port}/`;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.close();
});

async function openPage() {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(pageUrl);
  await page.waitForFunction('window.ready === true');
  return page;
}

// The page offline or back online, as DevTools' network panel does it. puppeteer-core
// 25.19's page.setOfflineMode sends Network.emulateNetworkConditionsByRule without the
// top-level `offline` that Chromium 148 requires ("mandatory field missing"), so the two
// commands go from a DevTools session of the page's own, kept for the page's life (the
// emulation ends with the session that set it).
const sessions = new WeakMap();
async function setOffline(page, offline) {
  let cdp = sessions.get(page);
  if (!cdp) {
    cdp = await page.createCDPSession();
    await cdp.send('Network.enable');
    sessions.set(page, cdp);
  }
  const conditions = { offline, latency: 0, downloadThroughput: -1, uploadThroughput: -1 };
  await cdp.send('Network.overrideNetworkState', conditions);
  await cdp.send('Network.emulateNetworkConditionsByRule', {
    offline,
    matchedNetworkConditions: [{ urlPattern: '', ...conditions }],
  });
}

for (const scheme of ['ws', 'wss']) {
  test(`per-message QoS 0, 1 and 2 on one ${scheme}:// connection from the page`, { timeout: 120_000 }, async () => {
    const tern = await new Tern().start();
    const page = await openPage();
    try {
      const w = await watcher(tern.tcp, 'page/#');
      const r = await page.evaluate(async (url) => {
        const c = await window.tern.connect({ url });
        const results = await Promise.all([
          c.publish('page/0', { q: 0 }, { qos: 0 }),
          c.publish('page/1', { q: 1 }, { qos: 1 }),
          c.publish('page/2', { q: 2 }, { qos: 2 }),
        ]);
        const state = c.state;
        const left = c.unacknowledged;
        await c.close();
        return { codes: results.map((x) => x.reasonCode), state, left, id: c.clientId };
      }, tern[scheme]);
      assert.deepEqual(r.codes, [0, 0, 0]);
      assert.equal(r.state, 'connected');
      assert.equal(r.left, 0);
      assert.match(r.id, /^tern-tab-/, 'a client id of its own for the tab');
      const got = await w.until(3);
      assert.deepEqual([...got].sort(), ['{"q":0}', '{"q":1}', '{"q":2}']);
      await w.close();
    } finally {
      await page.close();
      await tern.kill();
    }
  });
}

test('1,000 QoS 2 publishes issued at once in the page complete within the Receive Maximum', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  const page = await openPage();
  try {
    const w = await watcher(tern.tcp, 'burst/#');
    const r = await page.evaluate(async (url) => {
      const c = await window.tern.connect({ url });
      const states = [];
      c.on('state', (s) => states.push(s));
      const all = [];
      for (let i = 0; i < 1000; i++) all.push(c.publish('burst/page', i, { qos: 2 }));
      const done = await Promise.all(all);
      await c.close();
      return { n: done.length, states };
    }, tern.ws);
    assert.equal(r.n, 1000);
    assert.ok(
      !r.states.some((s) => s === 'reconnecting' || s === 'offline'),
      `never disconnected (no 0x93): ${r.states.join(' ')}`,
    );
    const got = await w.until(1000);
    assert.deepEqual(got.map(Number), [...Array(1000).keys()]);
    await w.close();
  } finally {
    await page.close();
    await tern.kill();
  }
});

test('a reload in the middle of QoS 2 flows: the page finishes them on load, each delivered once', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  const page = await openPage();
  const N = 300;
  try {
    const w = await watcher(tern.tcp, 'reload/#');
    await page.evaluate(
      async (url, n) => {
        window.client = await window.tern.connect({ url });
        window.acked = 0;
        for (let i = 0; i < n; i++) {
          window.client.publish('reload/x', i, { qos: 2 }).then(() => window.acked++);
        }
      },
      tern.ws,
      N,
    );
    // Some done, most not: reload now.
    await page.waitForFunction('window.acked >= 30');
    const before = await page.evaluate(() => ({ acked: window.acked, left: window.client.unacknowledged }));
    assert.ok(before.left > 0, `flows still open at the reload: ${JSON.stringify(before)}`);
    await page.reload();
    await page.waitForFunction('window.ready === true');
    const after = await page.evaluate(async (url) => {
      const c = await window.tern.connect({ url });
      const left = c.unacknowledged;
      let settled = 0;
      c.on('settled', () => settled++);
      while (c.unacknowledged > 0) await new Promise((r) => setTimeout(r, 20));
      await c.close();
      return { left, settled, id: c.clientId };
    }, tern.ws);
    assert.ok(after.left > 0, 'the outbox held the open flows across the reload');
    const got = await w.untilAll([...Array(N).keys()], 30000);
    await sleep(500);
    const c = counts(got);
    const missing = [...Array(N).keys()].filter((i) => !c.has(String(i)));
    const doubled = [...c].filter(([, k]) => k > 1);
    assert.deepEqual(missing, [], 'every message delivered');
    assert.deepEqual(doubled, [], 'none twice');
    await w.close();
  } finally {
    await page.close();
    await tern.kill();
  }
});

test('the broker killed with SIGKILL while the page publishes: nothing acknowledged lost, no QoS 2 duplicate', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  const page = await openPage();
  try {
    const w = await watcher(tern.tcp, 'kill/#');
    await page.evaluate(async (url) => {
      window.client = await window.tern.connect({ url, reconnect: { min: 50, max: 500 } });
      window.acked = [];
      window.all = [];
      for (let i = 0; i < 300; i++) {
        const qos = i % 2 === 0 ? 2 : 1;
        window.all.push(window.client.publish(`kill/q${qos}`, i, { qos }).then(() => window.acked.push(i)));
        if (i % 10 === 0) await new Promise((r) => setTimeout(r, 5));
      }
    }, tern.ws);
    await page.waitForFunction('window.acked.length >= 60');
    await tern.restart();
    const acked = await page.evaluate(async () => {
      await Promise.all(window.all);
      return window.acked;
    });
    assert.equal(acked.length, 300);
    const got = await w.untilAll(acked, 30000);
    await sleep(500);
    const c = counts(got);
    for (const i of acked) assert.ok(c.has(String(i)), `acknowledged ${i} delivered`);
    const doubled = [...c].filter(([v, k]) => k > 1 && Number(v) % 2 === 0);
    assert.deepEqual(doubled, [], 'no QoS 2 message twice');
    await page.evaluate(() => window.client.close());
    await w.close();
  } finally {
    await page.close();
    await tern.kill();
  }
});

test('offline in the page: publishes wait in the outbox, unresolved, and drain when back online', { timeout: 120_000 }, async () => {
  const tern = await new Tern().start();
  const page = await openPage();
  try {
    const w = await watcher(tern.tcp, 'offline/#');
    await page.evaluate(async (url) => {
      window.client = await window.tern.connect({ url, reconnect: { min: 50, max: 500 } });
      window.states = [];
      window.client.on('state', (s) => window.states.push(s));
    }, tern.ws);
    await setOffline(page, true);
    await page.waitForFunction('window.client.state === "offline"');
    await page.evaluate(() => {
      window.acked = 0;
      window.all = [];
      for (let i = 0; i < 50; i++) {
        window.all.push(window.client.publish('offline/x', i, { qos: i % 2 ? 1 : 2 }).then(() => window.acked++));
      }
    });
    await sleep(1000);
    const waiting = await page.evaluate(() => ({ acked: window.acked, left: window.client.unacknowledged }));
    assert.deepEqual(waiting, { acked: 0, left: 50 }, 'nothing resolves while offline');
    await setOffline(page, false);
    await page.evaluate(() => Promise.all(window.all));
    const states = await page.evaluate(() => window.states);
    assert.ok(states.includes('offline') && states.at(-1) === 'connected', states.join(' '));
    const got = await w.untilAll([...Array(50).keys()], 30000);
    assert.deepEqual([...new Set(got)].map(Number).sort((a, b) => a - b), [...Array(50).keys()]);
    await page.evaluate(() => window.client.close());
    await w.close();
  } finally {
    await page.close();
    await tern.kill();
  }
});
