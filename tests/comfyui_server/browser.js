#!/usr/bin/env node
// Drives the real ComfyUI frontend in Debian's headless Chromium through playwright-core:
//   node browser.js --url http://127.0.0.1:PORT --screenshot out.png [--workflow wf.json] [--run]
//                   [--fit] [--chromium /usr/bin/chromium] [--timeout-ms 90000] [--profile-dir DIR]
// Loads the page, waits for window.app, loads the workflow (UI format through app.loadGraphData, API format
// through app.loadApiJson; without one the frontend shows its default graph), lists node types and the ones
// the frontend cannot create, optionally clicks Run and follows that prompt through /history, then takes
// the screenshot. Prints one JSON line on stdout. Exit 0: page loaded and screenshot written (a failed
// prompt is reported in "prompt", not by the exit code); 1: the run itself failed; 2: bad arguments;
// 3: the overall deadline passed. Requests to anything but the server's own loopback origin are aborted.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-proxy-server',
  '--disable-dev-shm-usage'];
// Frontend-only node types: never in /object_info, always creatable.
const VIRTUAL_TYPES = new Set(['Note', 'MarkdownNote', 'Reroute', 'PrimitiveNode']);
// What the frontend opens over the canvas to report a problem: a PrimeVue dialog (1.32.x: "This workflow has
// missing nodes") or, from 1.40 on, the error overlay card ("Missing node: <type>", non-modal, with a dismiss
// button). Both count as dialogs in the summary.
const DIALOG = '.p-dialog';
const OVERLAY = '[data-testid="error-overlay"]';
const OVERLAY_DISMISS = '[data-testid="error-overlay-dismiss"]';

function parseArgs(argv) {
  const a = { chromium: '/usr/bin/chromium', timeoutMs: 90000, run: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const next = () => { if (i + 1 >= argv.length) throw new Error(`${k} needs a value`); return argv[++i]; };
    if (k === '--url') a.url = next().replace(/\/+$/, '');
    else if (k === '--screenshot') a.screenshot = next();
    else if (k === '--workflow') a.workflow = next();
    else if (k === '--chromium') a.chromium = next();
    else if (k === '--timeout-ms') a.timeoutMs = Number(next());
    else if (k === '--profile-dir') a.profileDir = next();
    else if (k === '--run') a.run = true;
    else if (k === '--fit') a.fit = true;
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.url || !a.screenshot) throw new Error('--url and --screenshot are required');
  if (!(a.timeoutMs > 0)) throw new Error('--timeout-ms must be positive');
  return a;
}

function isLoopback(u) {
  try {
    const url = new URL(u);
    if (url.protocol === 'data:' || url.protocol === 'blob:' || url.protocol === 'about:') return true;
    return ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
  } catch (e) { return false; }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Resolves once the page has painted two more frames: the canvas has drawn what was just loaded or changed
// (a condition, where a fixed pause would be too short on a busy machine).
const painted = (page) => page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));

async function main(args, summary, state) {
  const t0 = Date.now();
  const left = () => Math.max(1000, args.timeoutMs - (Date.now() - t0));
  const mark = (name) => { summary.timings_ms[name] = Date.now() - t0; };

  const profile = args.profileDir
    ? fs.mkdtempSync(path.join(args.profileDir, 'chromium-'))
    : fs.mkdtempSync(path.join(os.tmpdir(), 'ovi-chromium-'));
  state.profile = profile;
  state.context = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium, headless: true, viewport: { width: 1400, height: 900 },
    args: CHROMIUM_ARGS, timeout: left(), handleSIGTERM: true, handleSIGINT: true,
  });
  mark('launch');
  const ctx = state.context;
  await ctx.route('**/*', (route) => {
    const u = route.request().url();
    if (isLoopback(u)) return route.continue();
    summary.blocked_requests.push(u);
    return route.abort('blockedbyclient');
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const keep = (list, text) => { if (list.length < 30) list.push(String(text).slice(0, 300)); };
  page.on('console', (m) => { if (m.type() === 'error') keep(summary.console_errors, m.text()); });
  page.on('pageerror', (e) => keep(summary.page_errors, e));
  await page.addInitScript(() => {
    try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) { /* no storage on this origin */ }
  });

  await page.goto(args.url + '/', { waitUntil: 'domcontentloaded', timeout: left() });
  await page.waitForFunction(() => !!(window.app && window.app.graph && document.querySelector('canvas')),
    null, { timeout: left(), polling: 100 });
  summary.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || null);
  mark('app_ready');

  if (args.workflow) {
    const wf = JSON.parse(fs.readFileSync(args.workflow, 'utf8'));
    summary.workflow_format = Array.isArray(wf.nodes) ? 'ui' : 'api';
    const name = path.basename(args.workflow);
    await page.evaluate(async ({ wf, name }) => {
      if (Array.isArray(wf.nodes)) await window.app.loadGraphData(wf, true, true, name);
      else await window.app.loadApiJson(wf, name);
    }, { wf, name });
  } else {
    // The default graph arrives a moment after the app object; wait for it (the summary reports what loaded).
    await page.waitForFunction(() => (window.app.graph._nodes || []).length > 0, null,
      { timeout: left(), polling: 100 }).catch(() => {});
  }
  if (args.fit) {
    summary.fit = await page.evaluate(async () => {
      try {
        await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
        return true;
      } catch (e) { return String(e); }
    });
  }
  await painted(page); // the canvas has drawn the loaded graph
  mark('graph_loaded');

  const graph = await page.evaluate(async (sel) => {
    const nodes = window.app.graph._nodes || [];
    const registry = (window.LiteGraph && window.LiteGraph.registered_node_types) || null;
    const info = await (await fetch('/object_info')).json();
    const dialogs = Array.from(document.querySelectorAll(sel.dialog)).map((d) =>
      (d.querySelector('.p-dialog-title, .p-dialog-header') || d).innerText.trim().slice(0, 120))
      .concat(Array.from(document.querySelectorAll(sel.overlay)).map((d) => d.innerText.trim().slice(0, 120)));
    return {
      nodes: nodes.map((n) => ({ id: n.id, type: n.type, title: n.title,
        unknown: !!(n.has_errors && n.last_serialization) || (registry ? !(n.type in registry) : false) })),
      object_info_types: Object.keys(info), has_registry: !!registry, dialogs,
    };
  }, { dialog: DIALOG, overlay: OVERLAY });
  const known = new Set(graph.object_info_types);
  summary.node_types = [...new Set(graph.nodes.map((n) => n.type))].sort();
  summary.node_count = graph.nodes.length;
  summary.missing_node_types = [...new Set(graph.nodes
    .filter((n) => n.unknown || (!known.has(n.type) && !VIRTUAL_TYPES.has(n.type)))
    .map((n) => n.type))].sort();
  summary.object_info_count = graph.object_info_types.length;
  summary.dialogs = graph.dialogs;

  if (args.run) {
    summary.prompt = await runFromUi(page, args, left);
    mark('prompt_done');
  }
  // Dialogs and the error overlay (missing nodes, errors) would cover the graph in the picture; the summary
  // already lists them. A dialog closes on Escape, the overlay through its dismiss button.
  const openCount = () => page.evaluate((sel) => document.querySelectorAll(sel).length, `${DIALOG}, ${OVERLAY}`);
  for (let i = 0, open; i < 4 && (open = await openCount()); i++) {
    const dismiss = page.locator(OVERLAY_DISMISS).first();
    if (await dismiss.count()) await dismiss.click({ timeout: left() }).catch(() => page.keyboard.press('Escape'));
    else await page.keyboard.press('Escape');
    await page.waitForFunction(({ sel, n }) => document.querySelectorAll(sel).length < n,
      { sel: `${DIALOG}, ${OVERLAY}`, n: open }, { timeout: left(), polling: 50 }).catch(() => {});
  }
  await painted(page);
  await page.screenshot({ path: args.screenshot, timeout: left() });
  summary.screenshot = path.resolve(args.screenshot);
  mark('screenshot');
}

async function runFromUi(page, args, left) {
  const res = { clicked: false };
  const isPromptPost = (r) => r.request().method() === 'POST' && /\/prompt$/.test(new URL(r.url()).pathname);
  const posted = page.waitForResponse(isPromptPost, { timeout: left() });
  posted.catch(() => {});
  const button = page.locator('button:has-text("Run")').first();
  await button.click({ timeout: left() });
  res.clicked = true;
  let resp;
  try { resp = await posted; } catch (e) {
    res.status = 'not_queued';
    res.error = 'clicking Run sent no /prompt request (the frontend refused the graph)';
    return res;
  }
  res.http_status = resp.status();
  const body = await resp.json().catch(() => null);
  if (resp.status() !== 200 || !body || !body.prompt_id) {
    res.status = 'rejected';
    res.error = body;
    return res;
  }
  res.prompt_id = body.prompt_id;
  // Follow the prompt from here (Node's fetch, same loopback server) rather than through UI state.
  const deadline = Date.now() + left() - 2000;
  while (Date.now() < deadline) {
    const h = await (await fetch(`${args.url}/history/${res.prompt_id}`)).json();
    const entry = h[res.prompt_id];
    if (entry) {
      res.status = (entry.status && entry.status.status_str) || 'success';
      res.outputs = entry.outputs || {};
      res.messages = (entry.status && entry.status.messages) || [];
      break;
    }
    await sleep(100);
  }
  if (!res.status) { res.status = 'timeout'; return res; }
  // Wait for the frontend to show the pictures the prompt produced (videos are not shown as node images).
  const isPicture = (e) => /\.(png|jpe?g|webp)$/i.test(e.filename || '');
  const wantsImages = Object.values(res.outputs).some((o) => (o.images || []).some(isPicture));
  if (wantsImages) {
    const shown = () => (window.app.graph._nodes || []).some((n) => n.imgs && n.imgs.length);
    res.ui_shows_images = await page.waitForFunction(shown, null, { timeout: left(), polling: 100 })
      .then(() => true, () => false);
  }
  await painted(page);
  return res;
}

(async () => {
  const summary = { ok: false, timings_ms: {}, console_errors: [], page_errors: [], blocked_requests: [] };
  const state = { context: null };
  let args;
  try { args = parseArgs(process.argv.slice(2)); } catch (e) {
    summary.error = String(e.message || e);
    console.log(JSON.stringify(summary));
    process.exit(2);
  }
  summary.url = args.url;
  let code = 0;
  let timer;
  const overrun = new Promise((resolve) => { timer = setTimeout(() => resolve('deadline'), args.timeoutMs); });
  try {
    const r = await Promise.race([main(args, summary, state).then(() => 'done'), overrun]);
    if (r === 'deadline') { code = 3; summary.error = `overall deadline of ${args.timeoutMs} ms passed`; }
    else summary.ok = true;
  } catch (e) {
    code = 1;
    summary.error = String((e && e.stack) || e).slice(0, 2000);
  } finally {
    clearTimeout(timer);
    if (state.context) await Promise.race([state.context.close().catch(() => {}), sleep(10000)]);
    if (state.profile) {
      try { fs.rmSync(state.profile, { recursive: true, force: true }); } catch (e) { /* Chromium still exiting */ }
    }
  }
  console.log(JSON.stringify(summary));
  process.exit(code);
})();
