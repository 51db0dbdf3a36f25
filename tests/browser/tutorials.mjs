// Opens each committed tutorial in JupyterLab (untrusted: never run or signed here) in headless Chromium and
// counts what renders from the saved outputs: curve PNGs and sample tables. Screenshots per notebook.
// Env: LAB_URL, LAB_TOKEN, NOTEBOOKS (comma-separated), ARTIFACTS, EXTENSION_DIR, CHROMIUM. Prints RESULT {json}.
import { createRequire } from 'node:module';
import path from 'node:path';
import fs from 'node:fs';

const env = process.env;
const require = createRequire(path.join(env.EXTENSION_DIR, 'package.json'));
const { chromium } = require('playwright-core');
fs.mkdirSync(env.ARTIFACTS, { recursive: true });
const result = { notebooks: {} };
const browser = await chromium.launch({
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless', '--disable-gpu', '--no-first-run'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
try {
  for (const name of env.NOTEBOOKS.split(',')) {
    await page.goto(`${env.LAB_URL}/lab/tree/${name}?token=${env.LAB_TOKEN}`);
    await page.waitForFunction((name) => {
      const w = window.jupyterapp && [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path === name);
      return !!w && w.context.isReady && w.content.widgets.length > 0;
    }, name, { timeout: 120000 });
    const info = await page.waitForFunction((name) => {
      const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path === name);
      const imgs = [...w.node.querySelectorAll('.jp-OutputArea .jp-RenderedImage img')];
      const loaded = imgs.filter((i) => i.complete && i.naturalWidth > 100);
      if (w.node.querySelectorAll('.jp-OutputArea-output').length === 0 || loaded.length < imgs.length) return null;
      return {
        trusted: w.content.model.cells.get(0)?.trusted ?? null,
        images: loaded.length,
        widths: loaded.map((i) => i.naturalWidth),
        sampleTables: w.node.querySelectorAll('.jp-OutputArea table.twk-samples').length,
        reprText: /_CurveBox\(|LiveCurve object|LiveCurve at 0x/.test(w.node.innerText),
        widgetErrors: /Error displaying widget/.test(w.node.innerText),
      };
    }, name, { timeout: 60000 }).then((h) => h.jsonValue());
    await page.evaluate((name) => {
      const w = [...window.jupyterapp.shell.widgets('main')].find((w) => w.context?.path === name);
      w.node.querySelector('.jp-OutputArea .jp-RenderedImage img')?.scrollIntoView();
    }, name);
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(env.ARTIFACTS, `untrusted-${name.replace('.ipynb', '')}.png`) });
    result.notebooks[name] = info;
    console.log(`[tutorials] ${name}: ${JSON.stringify(info)}`);
  }
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.error = String(err && err.stack ? err.stack : err);
} finally {
  console.log(`RESULT ${JSON.stringify(result)}`);
  await browser.close();
}
process.exit(result.ok ? 0 : 1);
