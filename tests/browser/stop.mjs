// Drives JupyterLab in headless Debian Chromium (playwright-core): a cell runs a 300-step training loop with a
// LiveCurve on a real Twinkle server; while the kernel is busy the curve widget's Stop button is clicked. The
// loop must end within 2 steps of the click (the step count is read from the Twinkle server at the click), with
// one line and no traceback; the panel's loss must equal the notebook's.
// Env: LAB_URL, LAB_TOKEN, NOTEBOOK, TWINKLE_URL, TWINKLE_KEY, ARTIFACTS, EXTENSION_DIR. Prints RESULT {json}.
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
  console.log(`[stop] ${msg}`);
};

async function poll(fn, what, timeoutMs = 60000, everyMs = 100) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function serverRun(name) {
  const resp = await fetch(`${env.TWINKLE_URL}/api/v1/twinkle/runs?limit=100`, { headers: { 'X-API-Key': env.TWINKLE_KEY } });
  const body = await resp.json();
  return (body.runs ?? []).find((r) => r.name === name && r.state === 'active') ?? null;
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
const nb = `[...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path?.endsWith('.ipynb'))`;

try {
  await page.goto(`${env.LAB_URL}/lab/tree/${env.NOTEBOOK}?token=${env.LAB_TOKEN}`);
  await page.waitForFunction(() => window.jupyterapp && document.querySelector('#twinkle-panel'), null, { timeout: 120000 });
  await poll(() => page.evaluate(`(() => { const w = ${nb}; return !!w && w.context.isReady && w.content.widgets.length >= 3 && w.sessionContext?.session?.kernel?.status === 'idle'; })()`),
    'notebook loaded with an idle kernel', 180000, 500);
  log('notebook ready');
  await page.evaluate(() => window.jupyterapp.commands.execute('twinkle:open-panel'));
  const runCell = (i) => page.evaluate(`(() => { const w = ${nb}; window.jupyterapp.shell.activateById(w.id); w.content.activeCellIndex = ${i}; void window.jupyterapp.commands.execute('notebook:run-cell'); })()`);
  const cellOutput = (i) => page.evaluate(`(() => { const w = ${nb}; return w.content.widgets[${i}]?.node.querySelector('.jp-OutputArea')?.innerText ?? ''; })()`);
  const kernelIdle = () => page.evaluate(`(() => ${nb}.sessionContext?.session?.kernel?.status === 'idle')()`);

  await runCell(0);
  await poll(async () => /connected to|rror/.test(await cellOutput(0)), '%twinkle connect output', 120000);
  result.connectOutput = await cellOutput(0);
  log(`cell 0: ${result.connectOutput.trim().split('\n')[0]}`);

  await runCell(1);
  const stopSel = '.jp-OutputArea .twk-stop-button';
  await page.waitForSelector(stopSel, { timeout: 120000 });
  log('curve widget with its Stop button is shown');
  await poll(async () => ((await serverRun('stopme'))?.step ?? 0) >= 10, 'ten training steps', 120000);
  // the cell is still running (prompt "[*]"), so the kernel cannot read a widget comm message now
  result.busyAtClick = await page.evaluate(`(() => ${nb}.content.widgets[1].node.querySelector('.jp-InputPrompt')?.textContent ?? '')()`);
  const before = (await serverRun('stopme')).step;
  await page.click(stopSel);
  const after = (await serverRun('stopme')).step;
  result.clickSteps = [before, after];
  log(`clicked Stop at server step ${before}..${after} (cell prompt: ${result.busyAtClick})`);
  await shot('stop-01-clicked');
  await poll(async () => /FINAL STEP/.test(await cellOutput(1)) || /Error|Traceback/.test(await cellOutput(1)), 'the loop to end', 240000);
  await poll(kernelIdle, 'idle kernel', 60000);
  result.output = await cellOutput(1);
  result.finalServerStep = (await serverRun('stopme')).step;
  log(`loop ended: ${result.output.trim().split('\n').slice(-2).join(' | ')}`);

  // the panel's loss is the notebook's loss (same per-token mean)
  await page.evaluate(() => window.jupyterapp.commands.execute('twinkle:refresh'));
  const panelLoss = async () => page.evaluate(() => {
    const runs = [...document.querySelectorAll('#twinkle-panel .twk-run')];
    const card = runs.find((r) => r.querySelector('.twk-run-name')?.textContent === 'stopme');
    const span = card?.querySelector('.twk-metric[data-metric="loss"]');
    return span ? { text: span.textContent, value: Number(span.dataset.value), step: card.querySelector('.twk-dim')?.textContent } : null;
  });
  result.panelLoss = await poll(async () => {
    const p = await panelLoss();
    return p && p.step && p.step.includes(String(result.finalServerStep)) ? p : null;
  }, 'panel to show the final step', 30000, 500);
  await page.evaluate(() => document.querySelector(`#twinkle-panel .twk-run`)?.scrollIntoView());
  await shot('stop-02-stopped-panel');
  // kernel restart within the lease: `%twinkle connect` (cell 0 again) re-attaches; the named adapter continues
  const restart = async () => {
    await page.evaluate(`(async () => { await ${nb}.sessionContext.session.kernel.restart(); })()`);
    await poll(kernelIdle, 'idle kernel after restart', 120000, 250);
  };
  const runAndWait = async (i, re, what) => {
    await runCell(i);
    await poll(async () => re.test(await cellOutput(i)) || /Error|Traceback/.test(await cellOutput(i)), what, 120000);
    await poll(kernelIdle, 'idle kernel', 60000);
    return cellOutput(i);
  };
  await restart();
  result.reattachOutput = await runAndWait(0, /connected to/, '%twinkle connect after restart');
  log(`after restart: ${result.reattachOutput.trim()}`);
  result.adapterAfterReattach = await runAndWait(3, /ADAPTER STEP/, 'adapter after re-attach');
  await shot('stop-03-reattached');
  // kernel restart, then the lease (15 s) lapses: one `%twinkle resume` restores from the automatic checkpoint
  await restart();
  await new Promise((r) => setTimeout(r, 19000));
  result.resumeOutput = await runAndWait(4, /connected to/, '%twinkle resume after expiry');
  log(`after expiry: ${result.resumeOutput.trim()}`);
  result.adapterAfterResume = await runAndWait(3, /ADAPTER STEP/, 'adapter after resume');
  await shot('stop-04-restored');

  // the whole run's curve after the resume (history from the server), live with hover, then a PNG
  await runCell(5);
  const cellNode = (i) => `(() => ${nb}.content.widgets[${i}].node)()`;
  result.historyLive = await poll(() => page.evaluate(`(() => { const n = ${cellNode(5)}; const svg = n.querySelector('svg.twk-chart');
    return svg && svg.querySelectorAll('.twk-hover').length >= ${result.finalServerStep} ? { hover: svg.querySelectorAll('.twk-hover').length,
      panels: svg.querySelectorAll('.twk-panel-title').length } : null; })()`), 'live curve with history', 60000, 200);
  await page.evaluate(`(() => ${cellNode(5)}.scrollIntoView())()`);
  await shot('docs-curve-history-live');
  await poll(async () => /CURVE POINTS/.test(await cellOutput(5)), 'history curve cell', 120000);
  await poll(kernelIdle, 'idle kernel', 60000);
  result.historyOutput = await cellOutput(5);
  result.historyImages = await page.evaluate(`(() => ${cellNode(5)}.querySelectorAll('.jp-RenderedImage img').length)()`);
  await page.evaluate(`(() => ${cellNode(5)}.scrollIntoView())()`);
  await shot('docs-curve-history');
  // two runs side by side
  await runCell(6);
  await poll(() => page.evaluate(`(() => ${cellNode(6)}.querySelectorAll('.jp-RenderedImage img').length)()`), 'compare image', 120000);
  await poll(kernelIdle, 'idle kernel', 60000);
  result.compareImages = await page.evaluate(`(() => ${cellNode(6)}.querySelectorAll('.jp-RenderedImage img').length)()`);
  await page.evaluate(`(() => ${cellNode(6)}.querySelector('.jp-OutputArea').scrollIntoView())()`);
  await shot('docs-compare');
  // panel filters
  await page.evaluate(() => window.jupyterapp.commands.execute('twinkle:refresh'));
  const runNames = () => page.evaluate(() => [...document.querySelectorAll('#twinkle-panel .twk-run .twk-run-name')].map((n) => n.textContent));
  const runsBefore = (await poll(async () => { const n = await runNames(); return n.includes('second') ? n : null; }, 'second run in the panel', 30000)).length;
  await page.fill('#twinkle-panel .twk-filter-text', 'sec');
  const names = await poll(async () => { const n = await runNames(); return n.length === 1 ? n : null; }, 'filtered list', 10000);
  result.filtered = { before: runsBefore, names };
  await shot('docs-panel-filters');
  await page.fill('#twinkle-panel .twk-filter-text', '');

  // close the session (its run is checkpointed and unloaded) so the next browser test sees only its own runs
  await runCell(2);
  await poll(async () => /closed session/.test(await cellOutput(2)), '%twinkle disconnect', 60000);
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.error = String(err && err.stack ? err.stack : err);
  try { await shot('stop-99-failure'); } catch {}
} finally {
  console.log(`RESULT ${JSON.stringify(result)}`);
  await browser.close();
}
process.exit(result.ok ? 0 : 1);
