// Publish throughput from a real browser (headless Chromium, puppeteer-core) through the
// bundled SDK over ws:// to `tern broker` (TERN_BIN, else target/release/tern, else the
// debug build): N messages per QoS issued at once, timed until every promise resolved.
// Prints msgs/s per QoS, median of REPS runs. Not part of the test gate.
//   node bench/browser-bench.mjs        (N=5000, REPS=3)
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const release = path.resolve(here, '../../../target/release/tern');
if (!process.env.TERN_BIN && existsSync(release)) process.env.TERN_BIN = release;
const { Tern } = await import('../test/helpers.mjs');
const { servePage, launch } = await import('../test/browser-helpers.mjs');

const N = Number(process.env.N ?? 5000);
const REPS = Number(process.env.REPS ?? 3);
const server = await servePage();
const browser = await launch();
const tern = await new Tern().start();
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
try {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction('window.ready === true');
  console.log(`broker: ${process.env.TERN_BIN ?? 'debug build'}; ${N} messages per run, ${REPS} runs`);
  for (const [qos, durability] of [[0, 'strict'], [1, 'strict'], [2, 'strict'], [1, 'relaxed'], [2, 'relaxed']]) {
    const rates = [];
    for (let r = 0; r < REPS; r++) {
      const rate = await page.evaluate(async (url, n, q, d) => {
        const c = await window.tern.connect({ url, outbox: `bench-${q}-${Math.random()}`, durability: d });
        await c.whenConnected();
        const t = performance.now();
        const all = [];
        for (let i = 0; i < n; i++) all.push(c.publish('bench/browser', i, { qos: q }));
        await Promise.all(all);
        const s = (performance.now() - t) / 1000;
        await c.close();
        return n / s;
      }, tern.ws, N, qos, durability);
      rates.push(rate);
    }
    const label = qos === 0 ? 'QoS 0' : `QoS ${qos}, outbox ${durability}`;
    console.log(`${label}: ${Math.round(median(rates))} msgs/s (runs: ${rates.map(Math.round).join(', ')})`);
  }
} finally {
  await tern.kill();
  await browser.close();
  server.close();
}
