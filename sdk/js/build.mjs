// Bundles the SDK with esbuild: dist/index.js for Node (MQTT.js left as a dependency) and
// dist/tern.browser.js for browsers (MQTT.js's browser build included, minified), and
// prints the browser bundle's size, minified and gzipped.
import { build } from 'esbuild';
import { gzipSync } from 'node:zlib';
import { readFileSync } from 'node:fs';

await build({
  entryPoints: ['src/index.ts'],
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  packages: 'external',
  outfile: 'dist/index.js',
});
await build({
  entryPoints: ['src/browser.ts'],
  bundle: true,
  platform: 'browser',
  format: 'esm',
  target: 'es2022',
  minify: true,
  outfile: 'dist/tern.browser.js',
});
const bytes = readFileSync('dist/tern.browser.js');
console.log(
  `dist/tern.browser.js: ${(bytes.length / 1024).toFixed(1)} KiB minified, ${(gzipSync(bytes).length / 1024).toFixed(1)} KiB gzipped`,
);
