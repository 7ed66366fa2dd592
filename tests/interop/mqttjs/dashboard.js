// The Tern dashboard in a real browser (Debian's headless Chromium, driven by
// puppeteer-core), as an operator uses it.
// usage: node dashboard.js HOST:PORT TOKEN SCREENSHOT
//   HOST:PORT: the broker's metrics endpoint (the dashboard is at /), with the admin API on
//   and these sessions made by the test: `keeper` (offline, 3 messages queued) and
//   `watcher` (online), and a load of QoS 1 messages going on.
// Checks: a wrong token is refused on the page; with the right one the overview fills in,
// the delivery chart moves, `keeper` is listed with its queue of 3; picking `watcher` and
// pressing Disconnect (confirming the dialog) disconnects it; the live tail follows `load/#`
// over the broker's WebSocket listener and shows the load's messages. Writes a screenshot
// of the page to SCREENSHOT. Exits 0, or prints what went wrong and exits 1.
'use strict';
const puppeteer = require('puppeteer-core');

const [endpoint, token, screenshot] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

function fail(msg) {
  console.error(`FAIL dashboard: ${msg}`);
  process.exit(1);
}
setTimeout(() => fail('timed out after 60 s'), 60000).unref();

(async () => {
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    defaultViewport: { width: 1280, height: 900 },
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    const dialogs = [];
    page.on('dialog', async (d) => { dialogs.push(d.message()); await d.accept(); });
    await page.goto(`http://${endpoint}/`);
    const text = (sel) => page.$eval(sel, (e) => e.textContent);

    // A wrong token: the page says so.
    await page.type('#token', 'not-the-token');
    await page.click('#connect');
    await page.waitForFunction(() => document.getElementById('status').textContent.includes('refused'), { timeout: 10000 })
      .catch(() => fail('a wrong token was not reported as refused'));

    await page.$eval('#token', (e) => { e.value = ''; });
    await page.type('#token', token);
    await page.click('#connect');
    await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'), { timeout: 10000 })
      .catch(async () => fail('not connected: ' + await text('#status')));

    // The session table: keeper, offline, 3 queued.
    await page.waitForSelector('tr[data-client-id="keeper"]', { timeout: 10000 })
      .catch(() => fail('the keeper session is not listed'));
    const keeper = await page.$eval('tr[data-client-id="keeper"]', (tr) => [...tr.cells].map((c) => c.textContent));
    if (keeper[2] !== 'offline' || keeper[4] !== '3') fail('keeper row: ' + JSON.stringify(keeper));

    // The charts move: deliveries per second above zero while the load runs.
    await page.waitForFunction(() => {
      const pts = document.querySelector('#chart-deliveries polyline').getAttribute('points').trim().split(' ');
      return pts.length >= 6 && Number(document.getElementById('now-deliveries').textContent.replace(/\D/g, '')) > 0;
    }, { timeout: 15000 }).catch(async () => fail('the delivery chart does not move: ' + await text('#now-deliveries')));


    // Drill down and act: disconnect watcher.
    // (The rows are redrawn every second: click inside the page, in one step.)
    await page.evaluate(() => document.querySelector('tr[data-client-id="watcher"]').click());
    await page.waitForFunction(() => document.getElementById('detail-body').textContent.includes('state: online'), { timeout: 10000 })
      .catch(async () => fail('watcher detail: ' + await text('#detail-body')));
    await page.click('#kick');
    await page.waitForFunction(() => document.getElementById('last-action').textContent === 'done: Disconnect watcher', { timeout: 10000 })
      .catch(async () => fail('disconnect: ' + await text('#last-action')));
    if (!dialogs.some((d) => d === 'Disconnect watcher?')) fail('no confirmation asked: ' + JSON.stringify(dialogs));

    // The live tail over the broker's WebSocket listener (its URL filled in from the
    // overview): the load's messages scroll in.
    await page.$eval('#tail-filter', (e) => { e.value = 'load/#'; });
    const tailUrl = await page.$eval('#tail-url', (e) => e.value);
    if (!/^ws:\/\/127\.0\.0\.1:\d+\/mqtt$/.test(tailUrl)) fail('tail URL: ' + tailUrl);
    await page.click('#tail-start');
    await page.waitForFunction(() => document.querySelectorAll('#tail-list tbody tr').length >= 5, { timeout: 15000 })
      .catch(async () => fail('the live tail shows nothing: ' + await text('#tail-state')));
    const row = await page.$eval('#tail-list tbody tr', (tr) => [...tr.cells].map((c) => c.textContent));
    if (row[1] !== 'load/t' || row[4] !== 'tick') fail('tail row: ' + JSON.stringify(row));
    await page.screenshot({ path: screenshot, fullPage: true });
    await page.click('#tail-stop');
    if (errors.length) fail('page errors: ' + errors.join('; '));
    console.log(JSON.stringify({ ok: true, keeper, dialogs }));
  } finally {
    await browser.close();
  }
  process.exit(0);
})().catch((e) => fail(String(e && e.stack || e)));
