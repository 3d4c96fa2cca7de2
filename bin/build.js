#!/usr/bin/env node
"use strict";
// Compiles src/ and migrations/ into dist/, the build `npm start` runs, and copies
// what tsc does not emit. `npm ci` builds it (the `prepare` script); `stowage --dist`
// builds it again when it is missing or older than the sources.
const fs = require("node:fs");
const path = require("node:path");
const { execFileSync } = require("node:child_process");

const root = path.join(__dirname, "..");
const dist = path.join(root, "dist");
/** Written last, dated when the build began: a source changed since is newer. */
const stamp = path.join(dist, ".built");
const lock = path.join(dist, ".building");
/** A lock older than this is left from a build that died. */
const STALE_LOCK_MS = 10 * 60 * 1000;

/** What the build is made of: a change to any of these makes it stale. */
const INPUTS = ["src", "migrations", "tsconfig.json", "tsconfig.build.json", "package.json"];

function newestInput() {
  let newest = 0;
  const visit = (p) => {
    const st = fs.statSync(p, { throwIfNoEntry: false });
    if (!st) return;
    if (st.isDirectory()) for (const e of fs.readdirSync(p)) visit(path.join(p, e));
    else newest = Math.max(newest, st.mtimeMs);
  };
  for (const input of INPUTS) visit(path.join(root, input));
  return newest;
}

/** Whether dist/ holds a whole build no older than the sources. */
function isFresh() {
  const st = fs.statSync(stamp, { throwIfNoEntry: false });
  return !!st && st.mtimeMs >= newestInput();
}

function build() {
  const began = new Date();
  fs.rmSync(stamp, { force: true });
  for (const d of ["src", "migrations"]) fs.rmSync(path.join(dist, d), { recursive: true, force: true });
  execFileSync(process.execPath, [require.resolve("typescript/bin/tsc"), "-p", path.join(root, "tsconfig.build.json")], { cwd: root, stdio: "inherit" });
  fs.cpSync(path.join(root, "src", "http", "playground"), path.join(dist, "src", "http", "playground"), { recursive: true });
  fs.cpSync(path.join(root, "src", "storage", "codec-ops.js"), path.join(dist, "src", "storage", "codec-ops.js"));
  fs.writeFileSync(stamp, "");
  fs.utimesSync(stamp, began, began);
}

/** Builds dist/ unless it is fresh; one build at a time in a checkout, the others wait for it. */
function ensureBuilt(log) {
  for (;;) {
    if (isFresh()) return;
    fs.mkdirSync(dist, { recursive: true });
    try {
      fs.mkdirSync(lock);
    } catch (err) {
      if (err.code !== "EEXIST") throw err;
      const st = fs.statSync(lock, { throwIfNoEntry: false });
      if (st && Date.now() - st.mtimeMs > STALE_LOCK_MS) fs.rmSync(lock, { recursive: true, force: true });
      else Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 500);
      continue;
    }
    try {
      if (isFresh()) return;
      log?.();
      build();
      return;
    } finally {
      fs.rmSync(lock, { recursive: true, force: true });
    }
  }
}

module.exports = { isFresh, ensureBuilt };

if (require.main === module) {
  try {
    build();
  } catch (err) {
    process.stderr.write(`build failed: ${err.message}\n`);
    process.exit(1);
  }
}
