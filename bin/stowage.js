#!/usr/bin/env node
"use strict";
// Runs the TypeScript sources directly (transpile only; `npm run typecheck` checks
// types), or the compiled build when one exists under dist/ and STOWAGE_DIST=1.
const path = require("node:path");
const root = path.join(__dirname, "..");
if (process.env.STOWAGE_DIST === "1") {
  const main = path.join(root, "dist", "src", "main.js");
  if (!require("node:fs").existsSync(main)) {
    process.stderr.write(`stowage: STOWAGE_DIST=1 but ${path.relative(process.cwd(), main) || main} does not exist; run \`npm run build\` first\n`);
    process.exit(1);
  }
  require(main).run(process.argv.slice(2));
} else {
  require("ts-node").register({ project: path.join(root, "tsconfig.json"), transpileOnly: true, files: false });
  require(path.join(root, "src", "main.ts")).run(process.argv.slice(2));
}
