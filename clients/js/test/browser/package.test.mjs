// The package as a developer installs it: the tarball `npm run build` (`make sdk`) packs into
// target/sdk, installed into an empty project with the install command of docs/client.md, then
// imported under Node (ESM `import`, CJS `require`), type-checked with tsc (nodenext: the
// `import` and `require` conditions' declarations), and its single-file bundles loaded in
// headless Chromium by docs/client.md's `<script>` examples against a real relay and nats-server.
// The blocks run are read from docs/client.md (marked `<!-- sdk-install-test: NAME -->`), so
// the docs show what this test runs.
//
// The install is offline (npm_config_offline): the tarball has no dependencies to fetch.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import * as built from "../../dist/esm/index.js";
import {
  chromiumBin,
  killAll,
  launchBrowser,
  natsBin,
  natsClient,
  pkgRoot,
  relayBin,
  sleep,
  startNats,
  startPageServer,
  startRelay,
} from "./harness.mjs";

const repoRoot = resolve(pkgRoot, "../..");
const pkg = JSON.parse(readFileSync(join(pkgRoot, "package.json"), "utf8"));
const tarballName = `${pkg.name.replace(/^@/, "").replace("/", "-")}-${pkg.version}.tgz`;
const tarball = join(repoRoot, "target/sdk", tarballName);

/** The fenced block that follows `<!-- sdk-install-test: name -->` in docs/client.md. */
const docs = readFileSync(join(repoRoot, "docs/client.md"), "utf8");
function docBlock(name) {
  const m = docs.match(new RegExp(`<!-- sdk-install-test: ${name} -->\\n\`\`\`\\w*\\n([\\s\\S]*?)\`\`\`\\n`));
  assert.ok(m, `docs/client.md has no block marked sdk-install-test: ${name}`);
  return m[1];
}

// npm run sets npm_* variables (the package's own prefix among them): the nested npm must see
// only the empty project.
const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k)));
const npmEnv = { ...cleanEnv, npm_config_offline: "true", npm_config_audit: "false", npm_config_fund: "false", npm_config_update_notifier: "false" };
const sh = (script, cwd, env = npmEnv) => execFileSync("bash", ["-euo", "pipefail", "-c", script], { cwd, env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
const node = (file, cwd) => JSON.parse(execFileSync(process.execPath, [file], { cwd, env: cleanEnv, encoding: "utf8" }));

let app; // the empty project the tarball is installed into
const installed = () => join(app, "node_modules", pkg.name);

before(() => {
  assert.ok(existsSync(tarball), `${tarball} is missing: npm run build (make sdk) packs it`);
  app = realpathSync(mkdtempSync(join(tmpdir(), "wsrelay-sdk-app-"))); // node reports real paths
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", version: "1.0.0", private: true }) + "\n");
  // docs/client.md's install command, as written, with WSRELAY the repository.
  const install = docBlock("install");
  assert.ok(install.includes(tarballName), `the install command names ${tarballName} (package.json's version)`);
  sh(install, app, { ...npmEnv, WSRELAY: repoRoot });
});
after(() => app && rmSync(app, { recursive: true, force: true }));

describe("@wsrelay/client's tarball installed into an empty project", () => {
  test("holds package.json, README.md and dist/ only, and every file package.json points at", () => {
    const files = execFileSync("tar", ["-tzf", tarball], { encoding: "utf8" }).trim().split("\n").map((f) => f.replace(/^package\//, ""));
    const stray = files.filter((f) => !["package.json", "README.md"].includes(f) && !/^dist\/(esm|cjs|bundle)\//.test(f));
    assert.deepEqual(stray, [], "files outside package.json's `files`");
    for (const f of ["dist/esm/index.js", "dist/cjs/index.js", "dist/cjs/package.json", "dist/bundle/wsrelay-client.iife.js", "dist/bundle/wsrelay-client.esm.js"])
      assert.ok(files.includes(f), `${f} in the tarball`);
    const manifest = JSON.parse(readFileSync(join(installed(), "package.json"), "utf8"));
    const targets = [manifest.main, manifest.module, manifest.types];
    const walk = (v) => (typeof v === "string" ? targets.push(v) : Object.values(v).forEach(walk));
    walk(manifest.exports);
    assert.equal(targets.length, 7);
    for (const t of targets) assert.ok(existsSync(join(installed(), t)), `${t} (package.json) is installed`);
    assert.equal(JSON.parse(readFileSync(join(app, "package.json"), "utf8")).dependencies?.[pkg.name]?.startsWith("file:"), true);
  });

  test("docs/client.md's import and require lines load it under Node, from the project's node_modules", () => {
    const lines = docBlock("import").split("\n");
    const esmLine = lines.find((l) => l.startsWith("import "));
    const cjsLine = lines.find((l) => l.includes("require("));
    assert.ok(esmLine && cjsLine);
    writeFileSync(
      join(app, "esm.mjs"),
      `${esmLine}\nimport * as all from "${pkg.name}";\n` +
        `console.log(JSON.stringify({ client: typeof Client, keys: Object.keys(all).sort(), from: import.meta.resolve("${pkg.name}") }));\n`,
    );
    writeFileSync(
      join(app, "cjs.cjs"),
      `${cjsLine}\n` +
        `console.log(JSON.stringify({ client: typeof Client, keys: Object.keys(require("${pkg.name}")).sort(), from: require.resolve("${pkg.name}") }));\n`,
    );
    const keys = Object.keys(built).sort();
    const esm = node("esm.mjs", app);
    assert.deepEqual(esm, { client: "function", keys, from: `file://${installed()}/dist/esm/index.js` });
    const cjs = node("cjs.cjs", app);
    assert.deepEqual(cjs, { client: "function", keys, from: `${installed()}/dist/cjs/index.js` });
  });

  test("its types resolve with tsc (nodenext) for import (dist/esm) and require (dist/cjs)", () => {
    const use = `import { Client, WsrelayError, type Message, type Subscription } from "${pkg.name}";
const client: Client = new Client({ url: "wss://relay.example.com/ws", getToken: async () => "jwt" });
const sub: Subscription = client.subscribe("me.notify", { onMessage: (m: Message) => void m.data });
void sub;
void WsrelayError;
// @ts-expect-error: url is required (the declarations are real, not any)
new Client({ getToken: async () => "jwt" });
`;
    writeFileSync(join(app, "use.mts"), use);
    writeFileSync(join(app, "use.cts"), use);
    writeFileSync(
      join(app, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: { module: "nodenext", moduleResolution: "nodenext", target: "ES2020", lib: ["ES2020", "DOM"], strict: true, noEmit: true, skipLibCheck: false, types: [] },
        files: ["use.mts", "use.cts"],
      }),
    );
    const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
    let out;
    try {
      out = execFileSync(process.execPath, [tsc, "-p", "tsconfig.json", "--explainFiles"], { cwd: app, encoding: "utf8" });
    } catch (e) {
      assert.fail(`tsc against the installed package failed:\n${e.stdout}`);
    }
    assert.match(out, /node_modules\/@wsrelay\/client\/dist\/esm\/index\.d\.ts/);
    assert.match(out, /node_modules\/@wsrelay\/client\/dist\/cjs\/index\.d\.ts/);
  });
});

const missing = [
  !relayBin() && "the relay binary (cargo build -p wsrelay --bin wsrelay, or WSRELAY_BIN)",
  !natsBin() && "nats-server (make tools, or NATS_SERVER_BIN)",
  !chromiumBin() && "chromium (make deps, or CHROMIUM)",
].filter(Boolean);
if (missing.length && process.env.WSRELAY_REQUIRE_BROWSER === "1")
  throw new Error(`browser tests need ${missing.join(", ")}`);
const skip = missing.length ? `missing ${missing.join(", ")}` : false;

describe("docs/client.md's <script> examples in headless Chromium, with the installed bundles", { skip }, () => {
  let nats, nc, pages, relay, browser;

  before(async () => {
    sh(docBlock("copy"), app);
    nats = await startNats();
    nc = await natsClient(nats.port);
    pages = await startPageServer({ staticDir: join(app, "public") });
    relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "package" });
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close();
    nc?.close();
    pages?.close();
    nats?.stop();
    killAll();
  });

  for (const [name, bundle] of [["iife", "wsrelay-client.iife.js"], ["esm", "wsrelay-client.esm.js"]])
    test(`the ${name} example (${bundle}, one file) receives a NATS message`, async () => {
      const block = docBlock(name);
      const docUrl = "wss://relay.example.com/ws";
      assert.equal(block.split(docUrl).length, 2, `the ${name} example names ${docUrl} once`);
      const html = `<!doctype html>\n<html><head><meta charset="utf-8"></head><body>\n${block.replace(docUrl, `ws://127.0.0.1:${relay.port}/ws`)}</body></html>\n`;
      writeFileSync(join(app, "public", `${name}.html`), html);

      const page = await browser.context.newPage();
      const errors = [];
      const notifications = [];
      const scripts = [];
      page.on("pageerror", (e) => errors.push(String(e)));
      page.on("request", (r) => r.resourceType() === "script" && scripts.push(new URL(r.url()).pathname));
      page.on("console", async (msg) => {
        const args = msg.args();
        if ((await args[0]?.jsonValue().catch(() => undefined)) === "notification")
          notifications.push(await args[1]?.jsonValue());
      });
      await page.goto(`${pages.origin}/${name}.html`);
      // The subscription is in place once a publish arrives: publish until one does (bounded).
      const deadline = Date.now() + 20_000;
      for (let n = 1; notifications.length === 0; n++) {
        assert.deepEqual(errors, []);
        assert.ok(Date.now() < deadline, `no notification within 20 s (relay log: ${relay.log().slice(-2000)})`);
        nc.publish("users.alice.notify", { example: name, n });
        await nc.flush();
        await sleep(200);
      }
      assert.equal(notifications[0].example, name);
      assert.deepEqual(errors, []);
      // One file: the ES module bundle imports nothing more, and the classic script is the global.
      assert.deepEqual(scripts, [`/${bundle}`]);
      if (name === "iife") assert.equal(await page.evaluate(() => typeof window.Wsrelay?.Client), "function");
      await page.close();
    });
});
