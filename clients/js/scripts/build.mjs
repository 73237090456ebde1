// Builds dist/esm (ES modules + .d.ts) and dist/cjs (CommonJS + .d.ts) with tsc, offline.
import { execFileSync } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
rmSync(join(root, "dist"), { recursive: true, force: true });
const run = (...args) => execFileSync(process.execPath, [tsc, "-p", join(root, "tsconfig.json"), ...args], { stdio: "inherit", cwd: root });
run();
run("--module", "commonjs", "--moduleResolution", "node10", "--outDir", join(root, "dist/cjs"));
// The package is "type": "module"; mark the CommonJS folder as such for Node.
writeFileSync(join(root, "dist/cjs/package.json"), JSON.stringify({ type: "commonjs" }) + "\n");
