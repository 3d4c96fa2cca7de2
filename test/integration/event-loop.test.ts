/**
 * No schedule holds the event loop: while tenants send the costliest schedules the
 * checks allow (and the worst ones they refuse), and the scheduler recomputes many
 * such policies at once, the service keeps answering /healthz within 100 ms. The
 * service runs as its own process, so only its loop is measured.
 *
 * The machine is shared: a busy one can hold any process off its CPU for longer than
 * that. So a bare HTTP server in another process is asked at the same time, and a
 * slow answer of the service counts against it unless the bare server was slow too
 * at that moment (then the machine, not the service, was stalled).
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { createTestDatabase, type TestDatabase } from "../helpers/db";
import { gqlAt, serveChild, type ChildService } from "../helpers/child-service";

jest.setTimeout(180_000);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const DAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"];
/**
 * 23 rules whose days come once in years, each searched on its own (they differ in
 * their days, so no search is shared), then one that fires every minute: the rules
 * are searched in order, so each rare one is searched to its next occurrence.
 */
const COSTLY = [
  ...[29, 28, 27, 26].flatMap((monthday) => DAYS.map((day) => `FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=${monthday};BYDAY=${day};BYSETPOS=-1`)).slice(0, 23),
  "FREQ=MINUTELY",
];
/** What the reporter sent, and its kin: refused at once. */
const REFUSED = [
  [`FREQ=MINUTELY;BYSECOND=${Array.from({ length: 60 }, (_, i) => i).join(",")}`],
  ["FREQ=MINUTELY;BYSECOND=0,10,20,30,40,50"],
  ["FREQ=MINUTELY;BYSETPOS=-400"],
  ["FREQ=YEARLY;BYWEEKNO=53;BYDAY=SU;BYMONTH=12;BYMONTHDAY=31"],
];

const CREATE = `mutation($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id nextRunAt } } }`;

let db: TestDatabase;
let pg: Client;
let dataDir: string;
let svc: ChildService | null = null;
let bare: { url: string; stop(): void } | null = null;

beforeAll(async () => {
  db = await createTestDatabase();
  pg = new Client({ connectionString: db.url });
  await pg.connect();
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-loop-"));
});

afterAll(async () => {
  bare?.stop();
  await svc?.kill();
  await pg?.end().catch(() => undefined);
  await db?.drop();
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
});

interface Answer {
  start: number;
  end: number;
}
const ms = (a: Answer) => a.end - a.start;

/** Asks `url` one request at a time until stopped; when each answer was asked for and came. */
function poll(url: string) {
  const answers: Answer[] = [];
  let running = true;
  const done = (async () => {
    while (running) {
      const start = performance.now();
      const res = await fetch(url, { signal: AbortSignal.timeout(30_000) });
      await res.text();
      if (res.status !== 200) throw new Error(`${url} answered ${res.status}`);
      answers.push({ start, end: performance.now() });
      await sleep(5);
    }
  })();
  return {
    async stop() {
      running = false;
      await done;
      return answers;
    },
  };
}

/** A bare HTTP server in its own process: how fast this machine answers at all. */
async function bareServer(): Promise<{ url: string; stop(): void }> {
  const child = spawn(process.execPath, ["-e", `require("node:http").createServer((q, s) => s.end("ok")).listen(0, "127.0.0.1", function () { console.log(this.address().port); });`], { stdio: ["ignore", "pipe", "inherit"] });
  const port = await new Promise<string>((resolve) => child.stdout!.once("data", (d: Buffer) => resolve(d.toString().trim())));
  return { url: `http://127.0.0.1:${port}/`, stop: () => child.kill("SIGKILL") };
}

it("/healthz answers within 100 ms while the costliest schedules are checked, refused and recomputed", async () => {
  svc = await serveChild({ DATABASE_URL: db.url, STOWAGE_DATA_DIR: dataDir, SCHEDULER_INTERVAL_SECONDS: "1", MUTATIONS_PER_MINUTE: "100000", MUTATION_BURST: "100000" });
  const key = svc.defaultKey();
  // Warm up: the first request loads what the API needs, the first schedule starts the schedule thread.
  const warm = await gqlAt(svc.url, key, CREATE, { i: { name: "warm", schedule: ["FREQ=DAILY;BYHOUR=2"], timezone: "UTC" } });
  expect(warm.errors).toBeUndefined();

  bare = await bareServer();
  const polls = [poll(`${svc.url}/healthz`), poll(bare.url)];
  await sleep(200);
  const created: string[] = [];
  const refused: unknown[] = [];
  for (let round = 0; round < 3; round++) {
    const answers = await Promise.all([
      ...Array.from({ length: 8 }, (_, k) => gqlAt(svc!.url, key, CREATE, { i: { name: `costly-${round}-${k}`, schedule: COSTLY, timezone: "Europe/Berlin" } })),
      ...REFUSED.map((schedule, k) => gqlAt(svc!.url, key, CREATE, { i: { name: `refused-${round}-${k}`, schedule, timezone: "UTC" } })),
    ]);
    for (const a of answers.slice(0, 8)) {
      expect(a.errors).toBeUndefined();
      expect(a.data.createPolicy.policy.nextRunAt).not.toBeNull();
      created.push(a.data.createPolicy.policy.id);
    }
    for (const a of answers.slice(8)) {
      expect(a.errors?.[0]?.extensions?.code).toBe("BAD_USER_INPUT");
      refused.push(a.errors![0].message);
    }
  }
  // Every costly policy falls due at once: the scheduler runs them and computes each one's next occurrence.
  const { rowCount } = await pg.query(`UPDATE policies SET next_run_at = now() - interval '1 minute' WHERE name LIKE 'costly-%'`);
  expect(rowCount).toBe(24);
  const deadline = Date.now() + 60_000;
  for (;;) {
    const { rows } = await pg.query<{ n: number }>(`SELECT count(*)::int AS n FROM policy_runs r JOIN policies p ON p.id = r.policy_id WHERE p.name LIKE 'costly-%'`);
    if (rows[0].n === 24) break;
    if (Date.now() > deadline) throw new Error(`the scheduler ran ${rows[0].n} of 24 due policies within 60 s`);
    await sleep(100);
  }
  const { rows: next } = await pg.query<{ n: number }>(`SELECT count(*)::int AS n FROM policies WHERE name LIKE 'costly-%' AND next_run_at > now()`);
  expect(next[0].n).toBe(24);
  await sleep(200);
  const [health, machine] = await Promise.all(polls.map((p) => p.stop()));

  expect(created).toHaveLength(24);
  expect(refused).toHaveLength(3 * REFUSED.length);
  expect(health.length).toBeGreaterThan(20);
  // A slow answer is the machine's when the bare server, asked meanwhile, took half as long or more.
  const machineSlow = (a: Answer) => machine.some((m) => m.start < a.end && m.end > a.start && ms(m) >= Math.min(50, ms(a) / 2));
  const slow = health.filter((a) => ms(a) >= 100 && !machineSlow(a));
  if (slow.length) {
    const worst = [...health].sort((a, b) => ms(b) - ms(a)).slice(0, 10).map((a) => ms(a).toFixed(0));
    const bareWorst = Math.max(...machine.map(ms)).toFixed(0);
    throw new Error(`/healthz took 100 ms or more ${slow.length} times while the machine answered fast (slowest: ${worst.join(", ")} ms of ${health.length}; the bare server's slowest ${bareWorst} ms)`);
  }
});
