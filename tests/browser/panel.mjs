// Drives JupyterLab in headless Debian Chromium (playwright-core): a notebook trains on a real Twinkle
// server while the Twinkle panel must list the run, grow its loss sparkline, show the saved checkpoint,
// insert a load cell, delete the checkpoint, and show the "bad key" and "server down" states.
// Env: LAB_URL, LAB_TOKEN, NOTEBOOK, TWINKLE_KEY, DEAD_URL, ARTIFACTS, EXTENSION_DIR. Prints RESULT {json}.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const env = process.env;
const require = createRequire(path.join(env.EXTENSION_DIR, 'package.json'));
const { chromium } = require('playwright-core');

const ART = env.ARTIFACTS;
fs.mkdirSync(ART, { recursive: true });
const result = { steps: [] };
const log = (msg) => {
  result.steps.push(msg);
  console.log(`[panel] ${msg}`);
};

async function poll(fn, what, timeoutMs = 60000, everyMs = 250) {
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
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
page.on('pageerror', (e) => console.log(`[browser error] ${e.message}`));
const shot = async (name) => {
  await page.screenshot({ path: path.join(ART, `${name}.png`) });
  log(`screenshot ${name}.png`);
};
const cmd = (id, args = {}) => page.evaluate(([id, args]) => window.jupyterapp.commands.execute(id, args), [id, args]);
const panelText = () => page.evaluate(() => document.querySelector('#twinkle-panel')?.innerText ?? '');
const panelState = () => page.evaluate(() => document.querySelector('#twinkle-panel .twk-badge')?.dataset.state ?? null);
const statusText = () => page.evaluate(() => document.querySelector('.twk-status')?.textContent ?? '');

try {
  await page.goto(`${env.LAB_URL}/lab/tree/${env.NOTEBOOK}?token=${env.LAB_TOKEN}`);
  await page.waitForFunction(() => window.jupyterapp && document.querySelector('#twinkle-panel'), null, { timeout: 120000 });
  log('lab loaded, panel registered');
  const nbReady = () => page.evaluate(() => {
    const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
    return !!w && w.context.isReady && w.content.widgets.length >= 3 &&
      w.sessionContext?.session?.kernel?.status === 'idle';
  });
  await poll(nbReady, 'notebook loaded with an idle kernel', 180000, 500);
  log('notebook ready, kernel idle');
  await cmd('twinkle:open-panel');
  result.palette = await page.evaluate(() => window.jupyterapp.commands.label('twinkle:connect'));
  await poll(async () => (await panelState()) === 'not_configured', 'not connected state', 30000);
  result.notConnectedStatus = await statusText();
  await shot('01-not-connected');

  // run a cell without waiting for it to finish (the panel must update while it runs)
  const runCell = async (i) => {
    await page.evaluate((i) => {
      const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
      window.jupyterapp.shell.activateById(w.id);
      w.content.activeCellIndex = i;
      void window.jupyterapp.commands.execute('notebook:run-cell');
    }, i);
  };
  const cellOutput = (i) => page.evaluate((i) => {
    const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
    return w.content.widgets[i]?.node.querySelector('.jp-OutputArea')?.innerText ?? '';
  }, i);
  const focusNotebook = async () => {
    await page.evaluate(() => {
      const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
      window.jupyterapp.shell.activateById(w.id);
    });
  };
  await focusNotebook();
  await runCell(0);
  await poll(async () => /connected to/.test(await cellOutput(0)) || /rror/.test(await cellOutput(0)), '%twinkle connect output', 120000);
  result.connectOutput = await cellOutput(0);
  await poll(async () => (await panelState()) === 'connected', 'connected state after %twinkle connect', 60000);
  log('connected from the kernel');
  await shot('02-connected');

  // cell 2: trains with pauses between steps
  await focusNotebook();
  await runCell(1);
  const runSel = '#twinkle-panel .twk-run.twk-run-active';
  await page.waitForSelector(runSel, { timeout: 120000 });
  const spark = () => page.evaluate(() => Number(document.querySelector('#twinkle-panel .twk-run.twk-run-active .twk-sparkline')?.dataset.points ?? 0));
  const first = await poll(async () => { const n = await spark(); return n >= 1 ? n : 0; }, 'first loss points', 90000);
  log(`run listed, sparkline has ${first} points`);
  await shot('03-training');
  const later = await poll(async () => { const n = await spark(); return n > first ? n : 0; }, 'sparkline to grow', 90000);
  log(`sparkline grew ${first} -> ${later}`);
  result.sparkline = [first, later];
  result.runText = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-run.twk-run-active')?.innerText ?? '');
  result.activeStatus = await statusText();
  // the live load (GET load through the Jupyter server): queue, tokens/s, your usage; the usage grows while training
  const usageText = () => page.evaluate(() => document.querySelector('#twinkle-panel .twk-load-usage')?.textContent ?? '');
  result.loadText = await poll(async () => {
    const t = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-load')?.innerText ?? '');
    return /your usage: [0-9.]+k? trained/.test(t) ? t : '';
  }, 'the live load to show your usage', 60000);
  result.usageFirst = await usageText();
  result.usageLater = await poll(async () => { const t = await usageText(); return t !== result.usageFirst ? t : ''; },
    'your usage to grow', 60000);
  await shot('04-sparkline-grew');

  // cell 3: save a checkpoint (queued behind cell 2)
  await focusNotebook();
  await runCell(2);
  const ckptSel = '#twinkle-panel .twk-run-active .twk-ckpt';
  await page.waitForSelector(ckptSel, { timeout: 180000 });
  result.checkpoint = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-run-active .twk-ckpt')?.dataset.checkpoint);
  result.finalSpark = await spark();
  log(`checkpoint listed: ${result.checkpoint}`);
  await shot('05-checkpoint');

  // insert a load cell below the active cell
  const cellsBefore = await page.evaluate(() => window.jupyterapp.shell.currentWidget?.content?.widgets?.length ?? -1);
  await focusNotebook();
  await page.click(`${ckptSel} .twk-insert`);
  await poll(async () => {
    const n = await page.evaluate(() => {
      const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
      return w.content.widgets.length;
    });
    return n > cellsBefore ? n : 0;
  }, 'inserted cell', 10000);
  result.insertedCode = await page.evaluate(() => {
    const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'));
    return w.content.widgets.map((c) => c.model.sharedModel.getSource()).find((s) => s.includes('model.load(')) ?? '';
  });
  log('load cell inserted');
  await shot('06-load-cell-inserted');

  // delete the checkpoint: cancel first (nothing happens), then confirm
  await page.click(`${ckptSel} .twk-delete`);
  await page.waitForSelector('.jp-Dialog', { timeout: 10000 });
  await shot('07-delete-confirm');
  await page.click('.jp-Dialog .jp-mod-reject');
  await page.waitForSelector('.jp-Dialog', { state: 'detached' });
  result.afterCancel = await page.evaluate(() => document.querySelectorAll('#twinkle-panel .twk-run-active .twk-ckpt').length);
  await page.click(`${ckptSel} .twk-delete`);
  await page.waitForSelector('.jp-Dialog .jp-mod-warn', { timeout: 10000 });
  await page.click('.jp-Dialog .jp-mod-warn');
  await poll(async () => (await page.evaluate(() => document.querySelectorAll('#twinkle-panel .twk-run-active .twk-ckpt').length)) === 0, 'checkpoint deleted', 30000);
  log('checkpoint deleted after confirmation');

  // wrong key typed into the panel (via the palette command's dialog)
  const connectVia = async (url, key) => {
    void cmd('twinkle:connect');
    await page.waitForSelector('.jp-Dialog .twk-input-url', { timeout: 10000 });
    await page.fill('.jp-Dialog .twk-input-url', url);
    await page.fill('.jp-Dialog .twk-input-key', key);
    await page.click('.jp-Dialog .jp-mod-accept');
    await page.waitForSelector('.jp-Dialog', { state: 'detached' });
  };
  const goodUrl = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-url')?.textContent);
  await connectVia(goodUrl, 'definitely-not-the-key');
  await poll(async () => (await panelState()) === 'bad_key', 'bad key state', 30000);
  result.badKeyMessage = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-message')?.textContent);
  result.badKeyStatus = await statusText();
  await shot('08-bad-key');

  await connectVia(env.DEAD_URL, env.TWINKLE_KEY);
  await poll(async () => (await panelState()) === 'server_down', 'server down state', 30000);
  result.downMessage = await page.evaluate(() => document.querySelector('#twinkle-panel .twk-message')?.textContent);
  result.downStatus = await statusText();
  await shot('09-server-down');

  await connectVia(goodUrl, env.TWINKLE_KEY);
  await poll(async () => (await panelState()) === 'connected', 'connected again', 30000);
  await shot('10-reconnected');
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.error = String(err && err.stack ? err.stack : err);
  try { await shot('99-failure'); } catch {}
} finally {
  console.log(`RESULT ${JSON.stringify(result)}`);
  await browser.close();
}
process.exit(result.ok ? 0 : 1);
