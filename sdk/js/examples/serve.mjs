// Serves the example page and the SDK bundle on http://127.0.0.1:8090/ (PORT to change).
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const port = Number(process.env.PORT ?? 8090);
createServer((req, res) => {
  const file = req.url === '/tern.browser.js' ? '../dist/tern.browser.js' : 'index.html';
  const type = file.endsWith('.js') ? 'text/javascript' : 'text/html';
  res.writeHead(200, { 'content-type': type });
  res.end(readFileSync(path.join(here, file)));
}).listen(port, '127.0.0.1', () => console.log(`http://127.0.0.1:${port}/`));
