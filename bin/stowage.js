#!/usr/bin/env node
"use strict";
// With --dist first (as `npm start` does) or STOWAGE_DIST=1, runs the compiled build
// under dist/, compiling it first when it is missing or older than the sources;
// otherwise runs the TypeScript sources directly (transpile only; `npm run typecheck`
// checks types), as the tests and development do. ts-node costs about 100 MiB of memory.
const path = require("node:path");
const root = path.join(__dirname, "..");
const args = process.argv.slice(2);
const dist = args[0] === "--dist" ? Boolean(args.shift()) : process.env.STOWAGE_DIST === "1";
if (dist) {
  // The compiled build is how the service runs for real: libraries skip their
  // development checks (graphql's type checks cost a few percent of every query).
  if (!process.env.NODE_ENV) process.env.NODE_ENV = "production";
  try {
    require("./build").ensureBuilt(() => process.stderr.write("stowage: compiling the sources into dist/ (missing or older than the sources)\n"));
  } catch (err) {
    process.stderr.write(`stowage: building dist/ failed: ${err.message}\n`);
    process.exit(1);
  }
  require(path.join(root, "dist", "src", "main.js")).run(args);
} else {
  require("ts-node").register({ project: path.join(root, "tsconfig.json"), transpileOnly: true, files: false });
  require(path.join(root, "src", "main.ts")).run(args);
}
