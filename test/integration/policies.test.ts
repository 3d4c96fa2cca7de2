import { Scheduler } from "../../src/services/scheduler";
import { silentLogger } from "../../src/logger";
import { backup, bytes, succeed, waitJob, writeDisk } from "../helpers/data";
import { openTestDataSource } from "../helpers/db";
import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const code = (r: { errors?: { extensions?: Record<string, unknown> }[] }) => r.errors?.[0]?.extensions?.code;

async function server(name: string) {
  return (
    await svc.ok(
      `mutation ($n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${2 * MiB}, dataDisks: [{ sizeBytes: ${2 * MiB} }] }) { server { id disks { nodes { id } } } } }`,
      { n: name },
    )
  ).createServer.server;
}

async function policy(input: Record<string, unknown>, bind: string[]) {
  const p = (await svc.ok(`mutation ($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id nextRunAt } } }`, { i: input })).createPolicy.policy;
  if (bind.length) await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: p.id, r: bind });
  return p as { id: string; nextRunAt: string };
}

const POLICY = `query ($id: ID!) { node(id: $id) { ... on Policy {
  lastRunAt nextRunAt
  runs(last: 5) { totalCount nodes { trigger scheduledFor backupCount deletedCount skipped { resourceType resourceId resourceName reason } } }
  backups { totalCount nodes { id name trigger status resourceId policy { id } expiresAt createdAt } }
  retentionPreview { backup { id name trigger } keep reasons }
} } }`;
const view = async (id: string) => (await svc.ok(POLICY, { id })).node;

async function settle() {
  // Let every queued job finish.
  for (;;) {
    const { jobs } = await svc.ok(`{ jobs(filter: { statuses: [QUEUED, RUNNING] }) { nodes { id } } }`);
    if (!jobs.nodes.length) return;
    await Promise.all(jobs.nodes.map((j: any) => waitJob(svc, j.id)));
  }
}

it("fires at the occurrence: backs every bound resource up, named autobk_, linked to the policy, and moves nextRunAt", async () => {
  const s = await server("sched-a");
  const disk = (await svc.ok(`mutation { createDisk(input: { name: "loose", sizeBytes: ${MiB} }) { disk { id } } }`)).createDisk.disk.id;
  const p = await policy({ name: "hourly", schedule: ["FREQ=HOURLY;BYMINUTE=0"], timezone: "UTC", retention: { retentionDays: 7 } }, [s.id, disk]);
  const at = new Date(p.nextRunAt);
  expect(await svc.scheduler.tick(new Date(at.getTime() - 1000))).toHaveLength(0); // not yet
  const runs = await svc.scheduler.tick(new Date(at.getTime() + 1000));
  expect(runs).toHaveLength(1);
  await settle();
  const v = await view(p.id);
  expect(v.lastRunAt).toBe(at.toISOString());
  expect(new Date(v.nextRunAt).getTime()).toBe(at.getTime() + 3600_000);
  expect(v.runs.nodes).toEqual([{ trigger: "SCHEDULE", scheduledFor: at.toISOString(), backupCount: 2, deletedCount: 0, skipped: [] }]);
  expect(v.backups.totalCount).toBe(2);
  for (const b of v.backups.nodes) {
    expect(b).toMatchObject({ trigger: "POLICY", status: "AVAILABLE", policy: { id: p.id } });
    expect(b.name).toMatch(/^autobk_[0-9a-f]{8}$/);
    expect(new Date(b.expiresAt).getTime()).toBe(new Date(b.createdAt).getTime() + 7 * 86400_000);
  }
  expect(v.backups.nodes.map((b: any) => b.resourceId).sort()).toEqual([s.id, disk].sort());
  // Jobs of the run are linked to the policy.
  const { jobs } = await svc.ok(`query ($p: ID!) { jobs(filter: { resourceId: $p, types: [BACKUP] }) { totalCount } }`, { p: p.id });
  expect(jobs.totalCount).toBe(2);
});

it("skips a busy resource and records why, as CBR does", async () => {
  const s = await server("busy");
  const big = (await svc.ok(`mutation { createDisk(input: { name: "big", sizeBytes: ${64 * MiB} }) { disk { id } } }`)).createDisk.disk.id;
  await writeDisk(svc, big, bytes(64 * MiB, 1));
  const p = await policy({ name: "busy-policy", schedule: ["FREQ=DAILY;BYHOUR=3;BYMINUTE=0"] }, [s.id, big]);
  const manual = await backup(svc, big); // running while the policy fires
  await svc.scheduler.tick(new Date(new Date(p.nextRunAt).getTime() + 1000));
  await succeed(svc, manual.jobId);
  await settle();
  const v = await view(p.id);
  expect(v.runs.nodes[0].backupCount).toBe(1);
  expect(v.runs.nodes[0].skipped).toEqual([{ resourceType: "DISK", resourceId: big, resourceName: "big", reason: expect.stringMatching(/already running/) }]);
});

it("never fires a disabled policy, and runPolicy runs one now", async () => {
  const s = await server("disabled");
  const p = await policy({ name: "off", enabled: false, schedule: ["FREQ=MINUTELY"] }, [s.id]);
  expect(p.nextRunAt).toBeNull();
  const fired = await svc.scheduler.tick(new Date(Date.now() + 86400_000));
  expect(fired.filter((r) => r.policyId === uuid(p.id))).toEqual([]);
  await settle();
  const r = (await svc.ok(`mutation ($id: ID!) { runPolicy(input: { id: $id }) { run { trigger backupCount } policy { lastRunAt } } }`, { id: p.id })).runPolicy;
  expect(r.run).toEqual({ trigger: "MANUAL", backupCount: 1 });
  expect(r.policy.lastRunAt).not.toBeNull();
  await settle();
  expect((await view(p.id)).backups.totalCount).toBe(1);
});

it("catches up after downtime with one run, not a burst", async () => {
  const s = await server("downtime");
  const p = await policy({ name: "every-15", schedule: ["FREQ=MINUTELY;INTERVAL=15"] }, [s.id]);
  const first = new Date(p.nextRunAt);
  const later = new Date(first.getTime() + 5 * 3600_000 + 60_000); // 20 occurrences missed
  const runs = await svc.scheduler.tick(later);
  expect(runs.filter((r) => r.policyId === uuid(p.id))).toHaveLength(1);
  const v = await view(p.id);
  expect(v.runs.totalCount).toBe(1);
  expect(v.lastRunAt).toBe(first.toISOString());
  expect(new Date(v.nextRunAt).getTime()).toBeGreaterThan(later.getTime());
  expect(new Date(v.nextRunAt).getTime() - later.getTime()).toBeLessThanOrEqual(15 * 60_000);
  await settle();
});

it("fires each occurrence once with two schedulers on one database", async () => {
  const servers = await Promise.all(["twin-1", "twin-2", "twin-3"].map(server));
  const policies = [];
  for (let i = 0; i < 4; i++) policies.push(await policy({ name: `twin-${i}`, schedule: ["FREQ=HOURLY;BYMINUTE=30"] }, i < 3 ? [servers[i].id] : []));
  const ds2 = await openTestDataSource((svc.ds.options as { url?: string }).url!);
  try {
    const other = new Scheduler(ds2, svc.config, svc.services.policyRuns, svc.services.queue, silentLogger);
    const at = new Date(Math.max(...policies.map((p) => new Date(p.nextRunAt).getTime())) + 1000);
    const [a, b] = await Promise.all([svc.scheduler.tick(at), other.tick(at)]);
    const ours = new Set(policies.map((p) => uuid(p.id)));
    const fired = [...a, ...b].filter((r) => ours.has(r.policyId)).map((r) => r.policyId);
    expect(fired.sort()).toEqual([...ours].sort());
    expect(a.length).toBeGreaterThan(0);
    // A second round at the same instant finds nothing left to do.
    expect([...(await svc.scheduler.tick(at)), ...(await other.tick(at))].filter((r) => ours.has(r.policyId))).toEqual([]);
  } finally {
    await ds2.destroy();
  }
  await settle();
  for (const p of policies) expect((await view(p.id)).runs.totalCount).toBe(1);
});

it("applies retention after each run: keeps what a rule keeps, deletes the rest through deleteBackup, never manual ones", async () => {
  const s = await server("retained");
  const p = await policy({ name: "keep-2", schedule: ["FREQ=DAILY;BYHOUR=1;BYMINUTE=0"], retention: { maxBackups: 2 } }, [s.id]);
  const manual = await backup(svc, s.id, "hand-made");
  await succeed(svc, manual.jobId);
  for (let i = 0; i < 4; i++) {
    await svc.ok(`mutation ($id: ID!) { runPolicy(input: { id: $id }) { run { backupCount } } }`, { id: p.id });
    await settle();
  }
  const v = await view(p.id);
  const names = v.backups.nodes.map((b: any) => b.status);
  expect(names).toEqual(["AVAILABLE", "AVAILABLE"]);
  const all = (await svc.ok(`query ($r: ID!) { backups(filter: { resourceId: $r, topLevel: true }) { nodes { name trigger } } }`, { r: s.id })).backups.nodes;
  expect(all.filter((b: any) => b.trigger === "MANUAL")).toEqual([{ name: "hand-made", trigger: "MANUAL" }]);
  expect(all.filter((b: any) => b.trigger === "POLICY")).toHaveLength(2);
  const deletions = (await svc.ok(`query ($p: ID!) { jobs(filter: { resourceId: $p, types: [DELETE_BACKUP] }) { totalCount nodes { status } } }`, { p: p.id })).jobs;
  expect(deletions.totalCount).toBe(2);
  expect(deletions.nodes.every((j: any) => j.status === "SUCCEEDED")).toBe(true);
  expect(v.runs.nodes.map((r: any) => r.deletedCount)).toEqual([0, 0, 1, 1]);

  // The preview explains every decision.
  const preview = v.retentionPreview;
  expect(preview.find((d: any) => d.backup.name === "hand-made")).toMatchObject({ keep: true, reasons: ["manual"] });
  expect(preview.filter((d: any) => d.backup.trigger === "POLICY").map((d: any) => d.reasons[d.reasons.length - 1])).toEqual(["newest 2 (#1)", "newest 2 (#2)"]);
});

it("previews daily keeps in the policy's time zone, and deletes by age", async () => {
  const s = await server("aged");
  const p = await policy({ name: "aged", schedule: ["FREQ=DAILY"], timezone: "America/New_York" }, [s.id]);
  for (let i = 0; i < 4; i++) {
    await svc.ok(`mutation ($id: ID!) { runPolicy(input: { id: $id }) { run { backupCount } } }`, { id: p.id });
    await settle();
  }
  await svc.ok(`mutation ($id: ID!) { updatePolicy(input: { id: $id, retention: { keepDaily: 2 } }) { policy { id } } }`, { id: p.id });
  // Spread the backups over three New York days: two on Nov 20 (one at 03:00 UTC, still Nov 19 there).
  const ids = (await view(p.id)).backups.nodes.map((b: any) => uuid(b.id));
  const times = ["2026-11-19T15:00:00Z", "2026-11-20T03:00:00Z", "2026-11-20T18:00:00Z", "2026-11-21T01:00:00Z"];
  for (const [i, id] of ids.entries()) await svc.ds.query(`UPDATE backups SET created_at = $2 WHERE id = $1`, [id, times[i]]);
  const preview = (await view(p.id)).retentionPreview;
  const byTime = Object.fromEntries(preview.map((d: any) => [times[ids.indexOf(uuid(d.backup.id))], d.reasons]));
  expect(byTime).toEqual({
    "2026-11-21T01:00:00Z": ["newest backup of the resource", "daily 2026-11-20"],
    "2026-11-20T18:00:00Z": [],
    "2026-11-20T03:00:00Z": ["daily 2026-11-19"],
    "2026-11-19T15:00:00Z": [],
  });
});

it("a resource has one policy; deleting a policy keeps its backups", async () => {
  const s = await server("single");
  const a = await policy({ name: "a", schedule: ["FREQ=DAILY"] }, [s.id]);
  const b = await policy({ name: "b", schedule: ["FREQ=DAILY"] }, []);
  const r = await svc.gql(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: b.id, r: [s.id] });
  expect(code(r)).toBe("CONFLICT");
  await svc.ok(`mutation ($id: ID!) { runPolicy(input: { id: $id }) { run { backupCount } } }`, { id: a.id });
  await settle();
  await svc.ok(`mutation ($id: ID!) { deletePolicy(input: { id: $id }) { deletedPolicyId } }`, { id: a.id });
  const left = (await svc.ok(`query ($r: ID!) { backups(filter: { resourceId: $r }) { nodes { status trigger policy { id } } } }`, { r: s.id })).backups.nodes;
  expect(left).toEqual([{ status: "AVAILABLE", trigger: "POLICY", policy: null }]);
});

it("runs a policy once when Postgres aborts its run to break a deadlock (retention after a backup locks the same rows)", async () => {
  const disk = (await svc.ok(`mutation { createDisk(input: { name: "contended", sizeBytes: ${MiB} }) { disk { id } } }`)).createDisk.disk.id;
  const p = await policy({ name: "contended", schedule: ["FREQ=HOURLY;BYMINUTE=0"], timezone: "UTC" }, [disk]);
  const at = new Date(new Date(p.nextRunAt).getTime() + 1000);
  // Another transaction holds the disk, then waits for the policy the run has claimed: a cycle
  // Postgres breaks by aborting the run, which waited first.
  const other = svc.ds.createQueryRunner();
  await other.connect();
  try {
    await other.startTransaction();
    await other.query(`SELECT 1 FROM disks WHERE id = $1 FOR UPDATE`, [uuid(disk)]);
    const ticking = svc.scheduler.tick(at);
    ticking.catch(() => undefined); // awaited below
    await new Promise((r) => setTimeout(r, 300));
    await other.query(`SELECT 1 FROM policies WHERE id = $1 FOR UPDATE`, [uuid(p.id)]);
    await other.rollbackTransaction();
    const runs = (await ticking).filter((r) => r.policyId === uuid(p.id));
    expect(runs).toHaveLength(1);
    expect(runs[0].backupCount).toBe(1);
  } finally {
    if (other.isTransactionActive) await other.rollbackTransaction();
    await other.release();
  }
  await settle();
  expect((await view(p.id)).backups.totalCount).toBe(1);
});

it("follows daylight-saving changes both ways and months without day 31, tick by tick", async () => {
  const walk = async (input: Record<string, unknown>, start: string, ticks: number) => {
    const p = await policy(input, []);
    await svc.ds.query(`UPDATE policies SET next_run_at = $2, created_at = '2026-01-01T00:00:00Z' WHERE id = $1`, [uuid(p.id), start]);
    const fired: string[] = [];
    let at = new Date(start);
    for (let i = 0; i < ticks; i++) {
      const runs = (await svc.scheduler.tick(at)).filter((r) => r.policyId === uuid(p.id));
      expect(runs).toHaveLength(1); // each occurrence once
      fired.push(runs[0].scheduledFor.toISOString());
      at = new Date((await view(p.id)).nextRunAt);
    }
    return fired;
  };
  // Berlin skips 02:00-03:00 on March 29: 02:30 runs at 03:30 CEST that day.
  expect(await walk({ name: "spring", schedule: ["FREQ=DAILY;BYHOUR=2;BYMINUTE=30"], timezone: "Europe/Berlin" }, "2026-03-28T01:30:00Z", 3)).toEqual([
    "2026-03-28T01:30:00.000Z",
    "2026-03-29T01:30:00.000Z",
    "2026-03-30T00:30:00.000Z",
  ]);
  // Berlin repeats 02:00-03:00 on October 25: 02:30 runs once.
  expect(await walk({ name: "autumn", schedule: ["FREQ=DAILY;BYHOUR=2;BYMINUTE=30"], timezone: "Europe/Berlin" }, "2026-10-24T00:30:00Z", 3)).toEqual([
    "2026-10-24T00:30:00.000Z",
    "2026-10-25T00:30:00.000Z",
    "2026-10-26T01:30:00.000Z",
  ]);
  expect(await walk({ name: "month-end", schedule: ["FREQ=MONTHLY;BYMONTHDAY=31;BYHOUR=0;BYMINUTE=0"], timezone: "UTC" }, "2027-01-31T00:00:00Z", 3)).toEqual([
    "2027-01-31T00:00:00.000Z",
    "2027-03-31T00:00:00.000Z",
    "2027-05-31T00:00:00.000Z",
  ]);
});

it("refuses RRULE parts out of range or malformed as BAD_USER_INPUT naming the rule, the part and the value", async () => {
  const CREATE = `mutation ($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id } } }`;
  const everySecond = Array.from({ length: 60 }, (_, i) => i).join(",");
  const cases: [string[], string, string | RegExp][] = [
    [["FREQ=DAILY;BYDAY=XX"], "schedule[0]", /^schedule\[0\]: BYDAY=XX is not a weekday/],
    [["FREQ=DAILY;BYHOUR=25"], "schedule[0]", "schedule[0]: BYHOUR=25 is out of range (0-23)"],
    [["FREQ=HOURLY;BYMINUTE=75"], "schedule[0]", "schedule[0]: BYMINUTE=75 is out of range (0-59)"],
    [["FREQ=MINUTELY;BYSECOND=99"], "schedule[0]", "schedule[0]: BYSECOND=99 is out of range (0-59)"],
    [["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=-400"], "schedule[0]", "schedule[0]: BYSETPOS=-400 is out of range (1 to 366 or -366 to -1)"],
    [[`FREQ=MINUTELY;BYSECOND=${everySecond}`], "schedule[0]", /^schedule\[0\]: BYSECOND=0,1,2,.* fires more than once a minute/],
    [["FREQ=DAILY", "FREQ=HOURLY;INTERVAL=2;BYHOUR=1"], "schedule[1]", /^schedule\[1\]: never fires: /],
    [["FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30"], "schedule[0]", "schedule[0]: never fires: no date matches BYMONTH, BYMONTHDAY together"],
    [["FREQ=DAILY;BYHOUR=2\u0000"], "schedule[0]", /^schedule\[0\]: contains a NUL character \(U\+0000\) at position 20/],
    [["FREQ=DAILY;BYHOUR=\ud800"], "schedule[0]", /^schedule\[0\]: contains an unpaired UTF-16 surrogate \(U\+D800\) at position 19/],
  ];
  for (const [schedule, field, message] of cases) {
    const r = await svc.gql(CREATE, { i: { name: "bad", schedule } });
    expect({ schedule, status: r.status, code: code(r), field: r.errors?.[0]?.extensions?.field }).toEqual({ schedule, status: 200, code: "BAD_USER_INPUT", field });
    if (typeof message === "string") expect(r.errors![0].message).toBe(message);
    else expect(r.errors![0].message).toMatch(message);
  }
  // Nothing was created, and the same holds for updatePolicy.
  expect((await svc.ok(`{ policies(filter: { name: "bad" }) { totalCount } }`)).policies.totalCount).toBe(0);
  const p = await policy({ name: "to-update", schedule: ["FREQ=DAILY"] }, []);
  const r = await svc.gql(`mutation ($i: UpdatePolicyInput!) { updatePolicy(input: $i) { policy { id } } }`, { i: { id: p.id, schedule: ["FREQ=DAILY", "FREQ=DAILY;BYHOUR=25"] } });
  expect([code(r), r.errors?.[0]?.message]).toEqual(["BAD_USER_INPUT", "schedule[1]: BYHOUR=25 is out of range (0-23)"]);
});

it("stops a policy whose stored schedule is now refused, and keeps firing the others", async () => {
  const good = await policy({ name: "still-good", schedule: ["FREQ=HOURLY;BYMINUTE=0"] }, []);
  const stale = await policy({ name: "stale", schedule: ["FREQ=HOURLY;BYMINUTE=0"] }, []);
  // Stored before rules were range-checked.
  await svc.ds.query(`UPDATE policies SET schedule = '{"FREQ=HOURLY;BYMINUTE=75"}' WHERE id = $1`, [uuid(stale.id)]);
  const at = new Date(new Date(good.nextRunAt).getTime() + 1000);
  const fired = (await svc.scheduler.tick(at)).map((r) => r.policyId);
  expect(fired).toEqual(expect.arrayContaining([uuid(good.id), uuid(stale.id)]));
  expect((await view(stale.id)).nextRunAt).toBeNull();
  expect(new Date((await view(good.id)).nextRunAt).getTime()).toBeGreaterThan(at.getTime());
  // Updating it names the rule to fix; a new schedule brings it back.
  const rename = await svc.gql(`mutation ($i: UpdatePolicyInput!) { updatePolicy(input: $i) { policy { id } } }`, { i: { id: stale.id, name: "stale-2" } });
  expect([code(rename), rename.errors?.[0]?.extensions?.field]).toEqual(["BAD_USER_INPUT", "schedule[0]"]);
  const fixed = await svc.ok(`mutation ($i: UpdatePolicyInput!) { updatePolicy(input: $i) { policy { nextRunAt } } }`, { i: { id: stale.id, schedule: ["FREQ=HOURLY;BYMINUTE=15"] } });
  expect(fixed.updatePolicy.policy.nextRunAt).not.toBeNull();
  await settle();
});
