/**
 * No schedule holds the event loop: the worst RRULEs go through createPolicy and
 * updatePolicy over the API, several at once, and the scheduler ticks over them, while
 * a worker thread (whose own loop nothing here blocks) asks GET /healthz every 20 ms.
 * Every answer must come within 100 ms of its request being sent.
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { Worker } from "node:worker_threads";
import { startTestService, type TestService } from "../helpers/service";

const LIMIT_MS = 100;
const hours = (rule: (h: number) => string) => Array.from({ length: 24 }, (_, h) => rule(h));
const SIXTY = Array.from({ length: 60 }, (_, i) => i).join(",");

/** Schedules that were slow to check or to compute, or are refused; each is a policy or BAD_USER_INPUT. */
const SCHEDULES: string[][] = [
  [`FREQ=MINUTELY;BYSECOND=${SIXTY}`],
  ["FREQ=MINUTELY;BYSECOND=0,10,20,30,40,50"],
  ["FREQ=HOURLY;INTERVAL=2;BYHOUR=1"],
  ["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=-400"],
  ["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30"],
  ["FREQ=MONTHLY;BYDAY=1MO;BYSETPOS=5"],
  ["FREQ=MONTHLY;BYHOUR=15;BYSETPOS=366"],
  // Days that come once in decades, and steps that meet them once in a century or two.
  ["FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"],
  ["FREQ=DAILY;INTERVAL=3;BYMONTH=2;BYMONTHDAY=-29;BYDAY=SU;BYMINUTE=59"],
  ["FREQ=HOURLY;INTERVAL=5;BYHOUR=3;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"],
  ["FREQ=MINUTELY;INTERVAL=997;BYMINUTE=5;BYMONTH=2;BYMONTHDAY=29"],
  ["FREQ=MINUTELY;INTERVAL=997;BYMINUTE=5;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"],
  ["FREQ=MINUTELY;BYMONTH=12;BYDAY=SA;BYYEARDAY=366;BYHOUR=23"],
  ["FREQ=MINUTELY;BYMONTHDAY=-31;BYDAY=SU;BYYEARDAY=60"],
  ["FREQ=HOURLY;BYDAY=MO;BYYEARDAY=-366;BYHOUR=0"],
  ["FREQ=YEARLY;INTERVAL=97;BYMONTH=2;BYMONTHDAY=29;BYDAY=FR"],
  ["FREQ=YEARLY;INTERVAL=100;BYMONTH=2;BYMONTHDAY=29;BYDAY=MO"],
  // The most rules a schedule may have, each of them slow.
  hours((h) => `FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA;BYHOUR=${h}`),
  hours((h) => `FREQ=DAILY;INTERVAL=3;BYMONTH=2;BYMONTHDAY=-29;BYDAY=SU;BYHOUR=${h};BYMINUTE=59`),
  hours((h) => `FREQ=HOURLY;INTERVAL=5;BYHOUR=${h};BYMONTH=2;BYMONTHDAY=29;BYDAY=SA`),
  hours((h) => `FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=-1SA;BYHOUR=${h}`),
  hours((h) => `FREQ=MONTHLY;BYMONTH=2;BYDAY=SA;BYMONTHDAY=29;BYSETPOS=1;BYHOUR=${h}`),
  hours((h) => `FREQ=YEARLY;BYWEEKNO=53;BYDAY=TH;BYMONTH=12;BYMONTHDAY=31;BYHOUR=${h}`),
  hours((h) => (h ? `FREQ=MONTHLY;BYHOUR=${h};BYSETPOS=366` : "FREQ=DAILY;BYHOUR=0")),
];

/** Polls /healthz from its own thread; reports each request's send time and how long its answer took. */
const POLLER = `
const { parentPort, workerData } = require("node:worker_threads");
const samples = [];
let stop = false;
parentPort.on("message", () => (stop = true));
(async () => {
  // This thread's first requests load its HTTP client; they are not measured.
  for (let i = 0; i < 3; i++) await fetch(workerData.url + "/healthz");
  parentPort.postMessage("ready");
  while (!stop) {
    const sent = Date.now();
    const t = performance.now();
    let status = 0;
    try {
      status = (await fetch(workerData.url + "/healthz")).status;
    } catch {}
    samples.push({ sent, ms: performance.now() - t, status });
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  parentPort.postMessage(samples);
})();
`;

interface Sample {
  sent: number;
  ms: number;
  status: number;
}

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ SCHEDULER_INTERVAL_SECONDS: "1" });
});
afterAll(async () => svc?.stop());

it("answers /healthz within 100 ms while the worst schedules are created, updated and ticked over", async () => {
  const CREATE = `mutation ($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id nextRunAt } } }`;
  const UPDATE = `mutation ($i: UpdatePolicyInput!) { updatePolicy(input: $i) { policy { id nextRunAt } } }`;
  // A policy to update, and one due every minute so that the scheduler's ticks run it.
  const base = await svc.ok(CREATE, { i: { name: "base", schedule: ["FREQ=DAILY;BYHOUR=2"], timezone: "Europe/Berlin" } });
  await svc.ok(CREATE, { i: { name: "minutely", schedule: ["FREQ=MINUTELY"], timezone: "UTC" } });
  const baseId = base.createPolicy.policy.id;
  // The first request down each path compiles its code; that is not what is measured here.
  expect((await svc.gql(CREATE, { i: { name: "warm", schedule: ["FREQ=DAILY;BYHOUR=25"] } })).errors?.[0].extensions?.code).toBe("BAD_USER_INPUT");
  await svc.ok(UPDATE, { i: { id: baseId, schedule: ["FREQ=DAILY;BYHOUR=3"] } });
  await svc.scheduler.tick();

  const poller = new Worker(POLLER, { eval: true, workerData: { url: svc.url } });
  const done = new Promise<Sample[]>((resolve, reject) => {
    poller.on("message", (m) => m !== "ready" && resolve(m));
    poller.once("error", reject);
  });
  await new Promise((resolve) => poller.on("message", (m) => m === "ready" && resolve(m)));
  // How long this thread's loop (the service's) was held, to tell a held loop from a starved machine.
  const loop = monitorEventLoopDelay({ resolution: 5 });
  loop.enable();
  const phases: { label: string; from: number; to: number }[] = [];
  const phase = async <T>(label: string, fn: () => Promise<T>) => {
    const from = Date.now();
    try {
      return await fn();
    } finally {
      phases.push({ label, from, to: Date.now() });
    }
  };
  const outcomes: string[] = [];
  const answer = (schedule: string[], r: Awaited<ReturnType<TestService["gql"]>>) => {
    if (r.errors) {
      expect([schedule, r.errors.map((e) => e.extensions?.code)]).toEqual([schedule, ["BAD_USER_INPUT"]]);
      outcomes.push("refused");
    } else outcomes.push("created");
  };
  try {
    await new Promise((resolve) => setTimeout(resolve, 200));
    for (const [n, schedule] of SCHEDULES.entries()) {
      await phase(`createPolicy ${JSON.stringify(schedule)}`, async () => answer(schedule, await svc.gql(CREATE, { i: { name: `worst ${n}`, schedule, timezone: "Europe/Berlin" } })));
      await phase(`updatePolicy ${JSON.stringify(schedule)}`, async () => answer(schedule, await svc.gql(UPDATE, { i: { id: baseId, schedule, timezone: "America/New_York" } })));
    }
    // Several at once.
    for (let n = 0; n < SCHEDULES.length; n += 3) {
      const batch = SCHEDULES.slice(n, n + 3);
      await phase(`createPolicy of ${batch.map((x) => JSON.stringify(x)).join(", ")} at once`, () =>
        Promise.all(batch.map(async (schedule, k) => answer(schedule, await svc.gql(CREATE, { i: { name: `at once ${n + k}`, schedule, timezone: "Australia/Lord_Howe" } })))),
      );
    }
    // The scheduler ticks every second by itself; one tick also runs every policy now due.
    await phase("scheduler tick over every policy", () => svc.scheduler.tick(new Date(Date.now() + 200 * 365 * 86_400_000)));
    await new Promise((resolve) => setTimeout(resolve, 2500));
  } finally {
    poller.postMessage("stop");
  }
  const samples = await done;
  loop.disable();
  await poller.terminate();

  expect(outcomes).toContain("created");
  expect(outcomes).toContain("refused");
  expect(samples.length).toBeGreaterThan(50);
  expect(samples.filter((s) => s.status !== 200)).toEqual([]);
  const slowest = samples.reduce((a, b) => (b.ms > a.ms ? b : a));
  const during = phases.filter((p) => p.from <= slowest.sent + slowest.ms && p.to >= slowest.sent).map((p) => p.label);
  if (slowest.ms > LIMIT_MS) {
    throw new Error(`/healthz took ${Math.round(slowest.ms)} ms (limit ${LIMIT_MS}), sent ${new Date(slowest.sent).toISOString()} during: ${during.join("; ") || "no request"}; ${samples.filter((s) => s.ms > LIMIT_MS).length} of ${samples.length} answers were late; the event loop was held up to ${Math.round(loop.max / 1e6)} ms`);
  }
});
