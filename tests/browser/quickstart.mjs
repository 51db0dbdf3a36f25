// Drives JupyterLab in headless Debian Chromium (playwright-core): opens notebooks/01_quickstart.ipynb (outputs
// cleared), runs all cells against a real Twinkle server, waits for the live loss curve (the LiveCurve widget's
// SVG) to grow while training runs, and screenshots it mid-training and when the notebook has finished.
// Env: LAB_URL, LAB_TOKEN, NOTEBOOK, ARTIFACTS, EXTENSION_DIR, CHROMIUM. Prints RESULT {json}.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const env = process.env;
const require = createRequire(path.join(env.EXTENSION_DIR, 'package.json'));
const { chromium } = require('playwright-core');

const ART = env.ARTIFACTS;
fs.mkdirSync(ART, { recursive: true });
const result = { steps: [], ok: false };
const log = (msg) => { result.steps.push(msg); console.log(`[quickstart] ${msg}`); };

async function poll(fn, what, timeoutMs, everyMs = 500) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
page.on('pageerror', (e) => console.log(`[browser error] ${e.message}`));

// the LiveCurve widget: an inline SVG with one polyline per series, and a status line "run step N, loss x"
const curve = () => page.evaluate(() => {
  const svgs = [...document.querySelectorAll('.jp-OutputArea-output svg')].filter(
    (s) => s.textContent.includes('self-cognition SFT') && s.closest('.widget-html, .jupyter-widgets'));
  const svg = svgs[0];
  if (!svg) return null;
  const line = svg.querySelector('polyline');
  const box = svg.closest('.widget-vbox') || svg;
  return {
    points: line ? line.getAttribute('points').trim().split(/\s+/).length : 0,
    status: (box.parentElement || box).innerText.replace(/\s+/g, ' ').slice(0, 200),
    stopDisabled: !!box.querySelector('button') && box.querySelector('button').disabled,
  };
});
const showCurve = () => page.evaluate(() => {
  const svg = [...document.querySelectorAll('.jp-OutputArea-output svg')].find((s) => s.textContent.includes('self-cognition SFT'));
  svg?.closest('.jp-Cell')?.scrollIntoView({ block: 'center' });
});
const outputs = () => page.evaluate(() => [...document.querySelectorAll('.jp-OutputArea-output')].map((o) => o.innerText).join('\n'));

try {
  await page.goto(`${env.LAB_URL}/lab/tree/${env.NOTEBOOK}?token=${env.LAB_TOKEN}`);
  await page.waitForFunction(() => window.jupyterapp, null, { timeout: 120000 });
  await page.waitForSelector('.jp-Notebook .jp-Cell', { timeout: 120000 });
  await poll(() => page.evaluate(() => {
    const w = window.jupyterapp.shell.currentWidget;
    return w?.sessionContext?.session?.kernel?.status === 'idle';
  }), 'kernel idle', 120000);
  log('lab loaded, kernel idle');
  // collapse the side bar so the notebook has the width
  await page.evaluate(() => window.jupyterapp.commands.execute('application:toggle-left-area').catch(() => {}));
  await page.evaluate(() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); });  // do not wait for it
  log('run all cells');

  const first = await poll(async () => { const c = await curve(); return c && c.points >= 2 ? c : null; }, 'the live curve', 300000, 100);
  log(`live curve drawn: ${first.points} points`);
  await showCurve();
  await poll(async () => { const c = await curve(); return c && c.points >= 40 ? c : null; }, 'the curve to grow', 300000, 100);
  const liveNow = await curve();
  await page.screenshot({ path: path.join(ART, 'quickstart-live.png') });
  log(`screenshot quickstart-live.png at ${liveNow.points} points: ${liveNow.status}`);
  result.live = { first: first.points, later: liveNow.points, status: liveNow.status, stopDisabled: liveNow.stopDisabled };

  await poll(async () => /who are you\? -> /.test(await outputs()), 'the answer after training', 300000);
  // When the loop ends the live widget gives way to its static PNG (so the saved notebook renders anywhere).
  const pngs = await page.evaluate(() => [...document.querySelectorAll('.jp-OutputArea-output img')]
    .filter((i) => (i.getAttribute('src') || '').startsWith('data:image/png')).length);
  const text = await outputs();
  result.final = { live: await curve(), pngs, steps: (text.match(/(\d+) steps, loss [\d.]+ -> [\d.]+/) || [null, null])[1] };
  result.answer = (text.match(/who are you\? -> .*/) || [''])[0];
  await page.evaluate(() => {
    const img = [...document.querySelectorAll('.jp-OutputArea-output img')].find(
      (i) => (i.getAttribute('src') || '').startsWith('data:image/png'));
    if (img) img.scrollIntoView({ block: 'center' });
  });
  await page.waitForTimeout(500);
  await page.screenshot({ path: path.join(ART, 'quickstart.png') });
  log(`screenshot quickstart.png: ${pngs} static curve(s), ${result.final.steps} steps, ${result.answer}`);
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack || e);
  try { await page.screenshot({ path: path.join(ART, 'quickstart-error.png') }); } catch {}
} finally {
  await browser.close();
  console.log('RESULT ' + JSON.stringify(result));
}
