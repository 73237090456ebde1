// Builds, offline:
//   dist/esm     ES modules + .d.ts (tsc)
//   dist/cjs     CommonJS + .d.ts (tsc)
//   dist/bundle  wsrelay-client.esm.js (one ES module) and wsrelay-client.iife.js (a classic
//                script defining the global `Wsrelay`), for pages without a bundler (esbuild)
// and packs the package (npm pack) into ../../target/sdk/wsrelay-client-<version>.tgz (the
// repository's build output, not tracked): the tarball docs/client.md installs and
// test/browser/package.test.mjs checks.
import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(import.meta.url);
const tsc = require.resolve("typescript/bin/tsc");
rmSync(join(root, "dist"), { recursive: true, force: true });
const run = (...args) => execFileSync(process.execPath, [tsc, "-p", join(root, "tsconfig.json"), ...args], { stdio: "inherit", cwd: root });
run();
run("--module", "commonjs", "--moduleResolution", "node10", "--outDir", join(root, "dist/cjs"));
// The package is "type": "module"; mark the CommonJS folder as such for Node.
writeFileSync(join(root, "dist/cjs/package.json"), JSON.stringify({ type: "commonjs" }) + "\n");

// Single-file bundles from the same sources, minified, with their maps (sources inlined, as the
// package ships no src/). ES2020 like the tsc output.
const esbuild = require("esbuild");
for (const [format, file] of [["esm", "wsrelay-client.esm.js"], ["iife", "wsrelay-client.iife.js"]])
  esbuild.buildSync({
    entryPoints: [join(root, "src/index.ts")],
    outfile: join(root, "dist/bundle", file),
    bundle: true,
    format,
    ...(format === "iife" ? { globalName: "Wsrelay" } : {}),
    platform: "browser",
    target: "es2020",
    minify: true,
    sourcemap: true,
    legalComments: "none",
    logLevel: "warning",
  });

// The tarball, alone in its directory so that its path is predictable.
const packDir = resolve(root, "../../target/sdk");
mkdirSync(packDir, { recursive: true });
for (const f of readdirSync(packDir)) if (f.endsWith(".tgz")) rmSync(join(packDir, f));
const npm = process.env.npm_execpath ? [process.execPath, [process.env.npm_execpath]] : ["npm", []];
const [{ filename, entryCount, size }] = JSON.parse(
  execFileSync(npm[0], [...npm[1], "pack", "--json", "--pack-destination", packDir], { cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }),
);
console.log(`packed ${join(packDir, filename)} (${entryCount} files, ${size} bytes)`);
