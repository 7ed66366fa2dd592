// MQTT.js in a real browser (Debian's headless Chromium, driven by puppeteer-core) against
// a running Tern broker: what a web page does. One claim per run.
// usage: node browser.js URL PROTOCOL_VERSION
//   URL: wss://127.0.0.1:PORT/mqtt (or ws://...)
// Exits 0 if every QoS round-trips once between two clients in the page; otherwise prints
// what went wrong and exits 1.
'use strict';
const fs = require('fs');
const http = require('http');
const path = require('path');
const puppeteer = require('puppeteer-core');

const [url, version] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function fail(msg) {
  console.error(`FAIL browser (${url}, v${version}): ${msg}`);
  process.exit(1);
}
setTimeout(() => fail('timed out after 60 s'), 60000).unref();

// The page comes from a local origin, as an app served next to its broker would: Chromium
// blocks a page from about:blank (a public context) reaching 127.0.0.1
// (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS).
function servePage() {
  const mqttJs = fs.readFileSync(path.join(__dirname, 'node_modules/mqtt/dist/mqtt.min.js'));
  const server = http.createServer((req, res) => {
    if (req.url === '/mqtt.min.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(mqttJs);
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<!doctype html><title>tern</title><script src="/mqtt.min.js"></script>');
    }
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

(async () => {
  const server = await servePage();
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // The test broker's certificate is signed by a throwaway CA the browser does not
    // know; everything else about the TLS handshake (ALPN included) is the browser's own.
    acceptInsecureCerts: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    const result = await page.evaluate(async (url, protocolVersion) => {
      const tag = `browser-${Math.random().toString(36).slice(2)}`;
      const connect = (clientId) => new Promise((resolve, reject) => {
        const c = mqtt.connect(url, { clientId, protocolVersion, reconnectPeriod: 0, connectTimeout: 10000 });
        c.once('connect', () => resolve(c));
        c.once('error', (e) => reject(new Error(`connect ${clientId}: ${e && e.message}`)));
        c.once('close', () => reject(new Error(`connect ${clientId}: closed`)));
      });
      const sub = await connect(`sub-${tag}`);
      const got = [];
      sub.on('message', (topic, payload, packet) => got.push([topic, String(payload), packet.qos]));
      const granted = await sub.subscribeAsync(`t/${tag}/#`, { qos: 2 });
      const pub = await connect(`pub-${tag}`);
      for (const qos of [0, 1, 2]) {
        await pub.publishAsync(`t/${tag}/${qos}`, `m${qos}`, { qos });
      }
      const deadline = Date.now() + 10000;
      while (got.length < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 200)); // nothing more (no duplicate) arrives
      await pub.endAsync();
      await sub.endAsync();
      got.sort((a, b) => (a[0] < b[0] ? -1 : 1));
      return { granted: granted.map((g) => g.qos), got, tag, agent: navigator.userAgent };
    }, url, Number(version));
    if (errors.length) fail(`page errors: ${errors.join('; ')}`);
    const t = result.tag;
    const want = [[`t/${t}/0`, 'm0', 0], [`t/${t}/1`, 'm1', 1], [`t/${t}/2`, 'm2', 2]];
    if (JSON.stringify(result.granted) !== '[2]') fail(`granted ${JSON.stringify(result.granted)}`);
    if (JSON.stringify(result.got) !== JSON.stringify(want)) fail(`got ${JSON.stringify(result.got)}`);
    console.log(`ok: ${result.agent}`);
  } catch (e) {
    fail(String(e && e.stack || e));
  } finally {
    await browser.close();
    server.close();
  }
})();
