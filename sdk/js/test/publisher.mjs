// A publishing process for the outbox test: `node publisher.mjs URL OUTBOX COUNT` publishes
// COUNT QoS 2 messages (payloads 0..COUNT-1) with its outbox in the file OUTBOX, printing
// "acked N" as each completes, then waits until the outbox (this run's and what an earlier
// run left) is empty, and exits 0.
import { connect } from '../dist/index.js';

const [url, outbox, count] = process.argv.slice(2);
const client = await connect({ url, outbox, clientId: 'outbox-publisher', reconnect: { min: 50, max: 500 } });
client.on('settled', (key, r) => process.stdout.write(`settled ${r instanceof Error ? 'error' : 'ok'}\n`));
const all = [];
for (let i = 0; i < Number(count); i++) {
  all.push(client.publish('outbox/x', i, { qos: 2 }).then(() => process.stdout.write(`acked ${i}\n`)));
}
await Promise.all(all);
while (client.unacknowledged > 0) await new Promise((r) => setTimeout(r, 20));
await client.close();
process.exit(0);
