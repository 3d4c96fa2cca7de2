import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { gqlAt, ROOT } from "../helpers/child-service";
import { createTestDatabase, type TestDatabase } from "../helpers/db";

// The build `npm start` runs: dist/, compiled by `npm ci` (prepare) or on start when stale.
const build = require(path.join(ROOT, "bin", "build.js")) as { isFresh(): boolean };

let db: TestDatabase;
let dataDir: string;
let child: ChildProcess | undefined;
beforeAll(async () => {
  db = await createTestDatabase();
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-start-"));
});
afterAll(async () => {
  if (child && child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((r) => child!.once("exit", r));
    process.kill(-child.pid!, "SIGKILL");
    await exited;
  }
  await db?.drop();
  fs.rmSync(dataDir, { recursive: true, force: true });
});

it("npm start runs the compiled build, which serves GraphQL, checks schedules on its worker thread and backs up through its codec workers", async () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8")) as { scripts: Record<string, string> };
  // npm ci runs `prepare`, which builds dist/ on a fresh clone.
  expect(pkg.scripts.prepare).toBe("node bin/build.js");
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: db.url, STOWAGE_DATA_DIR: dataDir, HOST: "127.0.0.1", PORT: "0", CODEC_THREADS: "2" };
  for (const name of ["NODE_ENV", "LOG_LEVEL", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET", "VOLUME_BACKEND", "VAULT_BACKEND"]) delete env[name];
  // As npm runs a script: through the shell, here in a process group of its own to stop it whole.
  child = spawn("sh", ["-c", pkg.scripts.start], { cwd: ROOT, env, detached: true, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exit = new Promise<unknown>((r) => child!.once("exit", (code, signal) => r({ code, signal })));
  // A stale dist/ is compiled first, which takes a minute on a busy machine.
  const deadline = Date.now() + 240_000;
  let url: string | undefined;
  while (!(url = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(out)?.[1])) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`npm start did not serve:\n${out}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const serving = out
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((l) => l.msg === "Stowage is serving");
  expect(serving?.build).toBe("compiled");
  expect(build.isFresh()).toBe(true);

  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  const ok = async (query: string, variables?: Record<string, unknown>) => {
    const r = await gqlAt(url!, key, query, variables);
    if (r.errors?.length) throw new Error(JSON.stringify(r.errors));
    return r.data;
  };
  expect(await ok(`{ servers { totalCount } }`)).toEqual({ servers: { totalCount: 0 } });
  // Schedules are checked on the schedule worker thread, loaded from dist/ too.
  const policy = (await ok(`mutation ($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id nextRunAt } } }`, { i: { name: "nightly", schedule: ["FREQ=DAILY;BYHOUR=3;BYMINUTE=0"] } }))
    .createPolicy.policy;
  expect(policy.nextRunAt).toBeTruthy();
  // A backup compresses on the codec workers.
  const disk = (await ok(`mutation { createDisk(input: { name: "d", sizeBytes: 1048576 }) { disk { id } } }`)).createDisk.disk.id;
  const put = await fetch(`${url}/v1/disks/${disk}/data`, {
    method: "PUT",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/octet-stream" },
    body: new Uint8Array(Buffer.alloc(1048576, "stowage ")),
  });
  expect(put.status).toBe(200);
  const job = (await ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { job { id } } }`, { r: disk })).createBackup.job.id;
  let status = "QUEUED";
  while (!["SUCCEEDED", "FAILED", "CANCELLED"].includes(status)) {
    await new Promise((r) => setTimeout(r, 100));
    status = (await ok(`query ($id: ID!) { node(id: $id) { ... on Job { status } } }`, { id: job })).node.status;
  }
  expect(status).toBe("SUCCEEDED");
  expect(out).not.toMatch(/"level":"error"/);

  process.kill(-child.pid!, "SIGTERM");
  await exit;
}, 300_000);
