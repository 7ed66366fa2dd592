// What the SDK's tests share: a real `tern broker` (TERN_BIN, else the workspace's debug
// build) on loopback with TCP, WebSocket and WebSocket-over-TLS listeners (a self-signed
// certificate made with openssl), killed with SIGKILL and restarted on the same ports and
// data; Debian's Mosquitto; a persistent QoS 2 subscriber that is not ours (MQTT.js).

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '../../..');
export const ternBin = process.env.TERN_BIN ?? path.join(root, 'target/debug/tern');

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitPort(port, ms = 15000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const ok = await new Promise((resolve) => {
      const c = net.connect(port, '127.0.0.1', () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error(`nothing listens on ${port}`);
}

/** A self-signed certificate for localhost/127.0.0.1: [cert, key] paths. */
export function certificate(dir) {
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  if (!existsSync(cert)) {
    execFileSync('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
      '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
      '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    ], { stdio: 'ignore' });
    // rustls wants PKCS#8 (or SEC1): openssl writes PKCS#8 for -newkey.
  }
  return [cert, key];
}

/** `tern broker` with TCP, WS and WSS listeners; `extra` is appended to its config. */
export class Tern {
  constructor(extra = '') {
    this.dir = mkdtempSync(path.join(tmpdir(), 'tern-sdk-'));
    this.extra = extra;
    this.proc = null;
  }

  async start() {
    const config = path.join(this.dir, 'tern.toml');
    const [cert, key] = certificate(this.dir);
    // The first start takes ports the broker picks itself (no other process can take them
    // between a free-port check and the bind); restarts reuse them.
    const bind = (kind) => `127.0.0.1:${this.ports ? this.ports[kind] : 0}`;
    writeFileSync(
      config,
      `[[listener]]\nbind = "${bind('tcp')}"\n` +
        `[[listener]]\nbind = "${bind('ws')}"\ntransport = "ws"\n` +
        `[[listener]]\nbind = "${bind('wss')}"\ntransport = "wss"\ncert_file = "${cert}"\nkey_file = "${key}"\n` +
        `[metrics]\nenabled = false\n[storage]\ndata_dir = "${path.join(this.dir, 'data')}"\n` +
        this.extra,
    );
    const proc = spawn(ternBin, ['broker', '--config', config], {
      stdio: ['ignore', 'pipe', 'ignore'],
      env: { ...process.env, RUST_LOG: 'tern=info', NO_COLOR: '1' },
    });
    this.proc = proc;
    const line = await new Promise((resolve, reject) => {
      let text = '';
      const timer = setTimeout(() => reject(new Error('tern did not say where it listens')), 15000);
      proc.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`tern exited (${code}) before listening`));
      });
      proc.stdout.on('data', (d) => {
        if (text === null) return;
        text += d.toString();
        const m = text.match(/listening on ([^\n]*)/);
        if (m) {
          clearTimeout(timer);
          text = null;
          resolve(m[1]);
        }
      });
    });
    const ports = {};
    for (const m of line.matchAll(/127\.0\.0\.1:(\d+) \((tcp|ws|wss)\)/g)) ports[m[2]] = Number(m[1]);
    this.ports = ports;
    return this;
  }

  get tcp() {
    return `mqtt://127.0.0.1:${this.ports.tcp}`;
  }
  get ws() {
    return `ws://127.0.0.1:${this.ports.ws}/mqtt`;
  }
  get wss() {
    return `wss://localhost:${this.ports.wss}/mqtt`;
  }

  /** SIGKILL, and wait for the process to be gone. */
  async kill() {
    await killProcess(this.proc);
  }

  async restart() {
    await this.kill();
    // The same ports: clients reconnect where they were.
    for (let i = 0; i < 50; i++) {
      try {
        await this.start();
        return this;
      } catch {
        await sleep(100);
      }
    }
    throw new Error('tern did not start again');
  }
}

/** SIGKILL `p`, and wait for it to be gone (nothing if it already is). */
async function killProcess(p) {
  if (!p || p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGKILL');
  await gone;
}

/** Debian's Mosquitto on a free port (TCP), persistence off. */
export class Mosquitto {
  async start() {
    // A port found free can be taken before Mosquitto binds it (Mosquitto then exits):
    // started again on another.
    for (let attempt = 0; attempt < 5; attempt++) {
      this.port = await freePort();
      this.dir = mkdtempSync(path.join(tmpdir(), 'tern-sdk-mosq-'));
      const conf = path.join(this.dir, 'mosquitto.conf');
      writeFileSync(conf, `listener ${this.port} 127.0.0.1\nallow_anonymous true\npersistence false\n`);
      this.proc = spawn('/usr/sbin/mosquitto', ['-c', conf], { stdio: 'ignore' });
      await waitPort(this.port);
      await sleep(100);
      if (this.proc.exitCode === null && this.proc.signalCode === null) return this;
    }
    throw new Error('Mosquitto did not start in 5 attempts');
  }
  get tcp() {
    return `mqtt://127.0.0.1:${this.port}`;
  }
  async kill() {
    await killProcess(this.proc);
  }
}

/**
 * A persistent QoS 2 subscriber that is not ours: plain MQTT.js, MQTT 5, clean start
 * off; reconnects by itself across broker restarts. `payloads` in arrival order.
 */
export async function watcher(url, filter, clientId = `watch-${Math.random().toString(36).slice(2)}`) {
  const c = mqtt.connect(url, {
    protocolVersion: 5,
    clientId,
    clean: false,
    reconnectPeriod: 200,
    properties: { sessionExpiryInterval: 3600 },
  });
  const payloads = [];
  c.on('message', (_t, p) => payloads.push(p.toString()));
  await new Promise((resolve, reject) => {
    c.once('connect', resolve);
    c.once('error', reject);
  });
  await c.subscribeAsync(filter, { qos: 2 });
  return {
    payloads,
    client: c,
    /** Waits until `n` messages came, or `ms` passed. */
    async until(n, ms = 30000) {
      const end = Date.now() + ms;
      while (payloads.length < n && Date.now() < end) await sleep(50);
      return payloads;
    },
    /** Waits until every one of `values` came (at least once), or `ms` passed. */
    async untilAll(values, ms = 30000) {
      const end = Date.now() + ms;
      const want = new Set(values.map(String));
      while (Date.now() < end) {
        const have = new Set(payloads);
        if ([...want].every((v) => have.has(v))) break;
        await sleep(50);
      }
      return payloads;
    },
    close: () => c.endAsync(),
  };
}

/** How many times each value occurs. */
export function counts(values) {
  const m = new Map();
  for (const v of values) m.set(v, (m.get(v) ?? 0) + 1);
  return m;
}
