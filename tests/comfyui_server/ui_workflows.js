#!/usr/bin/env node
// The real frontend as the judge of UI-format workflows (run with NODE_PATH pointing at playwright-core):
//   node ui_workflows.js --url http://127.0.0.1:PORT --jobs jobs.json [--chromium /usr/bin/chromium]
//                        [--timeout-ms 120000] [--profile-dir DIR]
// jobs.json is a list of
//   {"op": "export", "api": "x_api.json", "out": "x.json", "layout": {"<node id>": [x, y]},
//    "notes": [{"text": "...", "pos": [x, y], "size": [w, h], "title": "..."}], "view": {"offset": [x, y], "scale": s}}
//     loads an API-format prompt with app.loadApiJson (the frontend builds the graph), places the nodes, sets
//     seed controls to "fixed", adds MarkdownNote nodes, and writes app.graph.serialize(): a UI workflow
//     exactly as this frontend saves it;
//   {"op": "to_api", "ui": "x.json"}
//     loads a UI workflow with app.loadGraphData and reports app.graphToPrompt().output (the API prompt the
//     Run button would queue), the node types the frontend could not create, and the widget values per node.
// Prints one JSON line: {"ok", "results": [...], "error"?}. Requests beyond the server's loopback origin are aborted.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-proxy-server', '--disable-dev-shm-usage'];

function parseArgs(argv) {
  const a = { chromium: '/usr/bin/chromium', timeoutMs: 120000 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const v = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--url') a.url = v().replace(/\/+$/, '');
    else if (k === '--jobs') a.jobs = v();
    else if (k === '--chromium') a.chromium = v();
    else if (k === '--timeout-ms') a.timeoutMs = Number(v());
    else if (k === '--profile-dir') a.profileDir = v();
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.url || !a.jobs) throw new Error('--url and --jobs are required');
  return a;
}

function loopback(u) {
  try {
    const url = new URL(u);
    return ['data:', 'blob:', 'about:'].includes(url.protocol) || ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
  } catch (e) { return false; }
}

async function exportJob(page, job) {
  const api = JSON.parse(fs.readFileSync(job.api, 'utf8'));
  const wf = await page.evaluate(async ({ api, name, notes, layout, view }) => {
    await window.app.loadApiJson(api, name);
    for (const node of window.app.graph._nodes) {
      const at = layout && layout[String(node.id)];
      if (at) node.pos = [at[0], at[1]];
      // A shared workflow should reproduce: seeds stay as saved unless the user switches this back.
      for (const w of node.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
    }
    for (const n of notes || []) {
      const note = window.LiteGraph.createNode('MarkdownNote');
      note.pos = n.pos; if (n.size) note.size = n.size;
      if (n.title) note.title = n.title;
      note.widgets[0].value = n.text;
      window.app.graph.add(note);
    }
    window.app.graph.setDirtyCanvas(true, true);
    if (view) { window.app.canvas.ds.offset = view.offset; window.app.canvas.ds.scale = view.scale; }
    return window.app.graph.serialize();
  }, { api, name: path.basename(job.out), notes: job.notes, layout: job.layout, view: job.view });
  fs.writeFileSync(job.out, JSON.stringify(wf, null, 2) + '\n');
  return { op: 'export', out: job.out, nodes: wf.nodes.length, links: wf.links.length };
}

async function toApiJob(page, job) {
  const wf = JSON.parse(fs.readFileSync(job.ui, 'utf8'));
  return page.evaluate(async ({ wf, name }) => {
    await window.app.loadGraphData(wf, true, true, name);
    const registry = window.LiteGraph.registered_node_types;
    const nodes = window.app.graph._nodes || [];
    const prompt = await window.app.graphToPrompt();
    return {
      op: 'to_api', ui: name,
      types: nodes.map((n) => n.type),
      // A type the frontend cannot create: unregistered, or a placeholder keeping its saved form. Newer frontends
      // also set has_errors for other problems (a LoadImage file not in input/), which are not unknown types.
      unknown: nodes.filter((n) => !(n.type in registry) || (n.has_errors && n.last_serialization))
        .map((n) => n.type),
      widgets: Object.fromEntries(nodes.map((n) => [n.id, (n.widgets || []).map((w) => [w.name, w.value])])),
      output: prompt.output,
    };
  }, { wf, name: path.basename(job.ui) });
}

async function main(args, state) {
  const jobs = JSON.parse(fs.readFileSync(args.jobs, 'utf8'));
  const profile = fs.mkdtempSync(path.join(args.profileDir || os.tmpdir(), 'ovi-ui-'));
  state.context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium, headless: true, viewport: { width: 1400, height: 900 }, args: ARGS,
    timeout: args.timeoutMs, handleSIGTERM: true, handleSIGINT: true,
  });
  await state.context.route('**/*', (r) => (loopback(r.request().url()) ? r.continue() : r.abort('blockedbyclient')));
  const page = state.context.pages()[0] || await state.context.newPage();
  await page.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) { /* */ } });
  await page.goto(args.url + '/', { waitUntil: 'domcontentloaded', timeout: args.timeoutMs });
  await page.waitForFunction(() => !!(window.app && window.app.graph && window.LiteGraph), null,
    { timeout: args.timeoutMs, polling: 100 });
  const results = [];
  for (const job of jobs) {
    if (job.op === 'export') results.push(await exportJob(page, job));
    else if (job.op === 'to_api') results.push(await toApiJob(page, job));
    else throw new Error(`unknown op ${job.op}`);
  }
  return results;
}

(async () => {
  const out = { ok: false };
  const state = {};
  let code = 0;
  try {
    const args = parseArgs(process.argv.slice(2));
    const timer = new Promise((_, reject) => setTimeout(() => reject(new Error('deadline passed')), args.timeoutMs));
    out.results = await Promise.race([main(args, state), timer]);
    out.ok = true;
  } catch (e) {
    code = 1;
    out.error = String((e && e.stack) || e).slice(0, 2000);
  } finally {
    if (state.context) await Promise.race([state.context.close().catch(() => {}), new Promise((r) => setTimeout(r, 10000))]);
  }
  console.log(JSON.stringify(out));
  process.exit(code);
})();
