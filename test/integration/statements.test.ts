import { RequestContext } from "../../src/services/context";
import { KEY_CACHE_MS, ProjectService } from "../../src/services/project.service";
import { waitJob } from "../helpers/data";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

/**
 * A nested query costs a fixed number of SQL statements, however many rows it
 * returns: every level of a query is one statement, its lists (a first page
 * counted in it) and the rows by id it asks for together.
 */
let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
  // Only the request's statements count: no job runner polling beside it.
  await svc.runner.stop();
});
afterAll(async () => {
  await svc?.stop();
});

const NESTED = `{
  viewer { name }
  servers(first: 50) {
    totalCount
    nodes {
      id name
      systemDisk { id }
      disks(first: 5) {
        totalCount
        nodes {
          id device
          server { id }
          backups(first: 5) { totalCount nodes { id } }
          images(first: 5) { nodes { id } }
          policies(first: 1) { nodes { id name } }
        }
      }
      backups(first: 5) { nodes { id children(first: 5) { nodes { id } } } }
      images(first: 5) { nodes { id } }
      policies(first: 1) { nodes { id nextRunAt servers(first: 1) { totalCount } } }
    }
  }
}`;

/**
 * The statements a request ran besides the API key's lookup: that lookup happens once per
 * KEY_CACHE_MS, so on a slow machine it may fall inside any counted request.
 */
function withoutKeyLookup(statements: string[]) {
  const rest = statements.filter((sql) => !/\bFROM api_keys\b/.test(sql));
  expect(statements.length - rest.length).toBeLessThanOrEqual(1);
  return rest.length;
}

async function addServers(n: number, policyId: string) {
  for (let i = 0; i < n; i++) {
    const s = (
      await svc.ok(
        `mutation { createServer(input: { name: "s${i}", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${GiB}, dataDisks: [{ sizeBytes: ${MiB} }, { sizeBytes: ${MiB} }] }) { server { id } } }`,
      )
    ).createServer.server;
    await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: policyId, r: [s.id] });
  }
}

it("runs the same number of statements for 3 servers as for 30", async () => {
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "p", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
  await addServers(3, policy);
  const small = await svc.countQueries(() => svc.ok(NESTED));
  expect(small.result.servers.totalCount).toBe(3);
  expect(small.result.servers.nodes[0].disks.nodes).toHaveLength(3);

  await addServers(27, policy);
  const large = await svc.countQueries(() => svc.ok(NESTED));
  expect(large.result.servers.totalCount).toBe(30);
  expect(large.result.servers.nodes.every((s: any) => s.disks.totalCount === 3 && s.policies.nodes.length === 1)).toBe(true);

  expect(withoutKeyLookup(large.statements)).toBe(withoutKeyLookup(small.statements));
  // One statement per level of the query (servers; their disks, backups, images and policies; what those
  // ask for), the key being known from the requests before.
  expect(withoutKeyLookup(small.statements)).toBe(3);
});

/** Servers (a system and a data disk each) and loose disks, `n` resources in all, bound to a new policy without retention rules. */
async function boundPolicy(name: string, n: number) {
  const policy = (await svc.ok(`mutation ($n: String!) { createPolicy(input: { name: $n, schedule: ["FREQ=DAILY"] }) { policy { id } } }`, { n: name })).createPolicy.policy.id;
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    ids.push(
      i % 2
        ? (await svc.ok(`mutation ($n: String!) { createDisk(input: { name: $n, sizeBytes: ${MiB} }) { disk { id } } }`, { n: `${name}-d${i}` })).createDisk.disk.id
        : (
            await svc.ok(`mutation ($n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB}, dataDisks: [{ sizeBytes: ${MiB} }] }) { server { id } } }`, {
              n: `${name}-s${i}`,
            })
          ).createServer.server.id,
    );
  }
  await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: policy, r: ids });
  return policy as string;
}

const RUN = `mutation ($id: ID!) { runPolicy(input: { id: $id }) { run { backupCount skipped { reason } } } }`;

async function drain() {
  await svc.runner.start();
  try {
    for (;;) {
      const { jobs } = await svc.ok(`{ jobs(filter: { statuses: [QUEUED, RUNNING] }) { nodes { id } } }`);
      if (!jobs.nodes.length) return;
      await Promise.all(jobs.nodes.map((j: any) => waitJob(svc, j.id)));
    }
  } finally {
    await svc.runner.stop();
  }
}

/** The statements of a policy run over `n` resources, then of a retention pass deleting one backup of each. */
async function measure(name: string, n: number) {
  const policy = await boundPolicy(name, n);
  for (let i = 0; i < 2; i++) {
    await svc.ok(RUN, { id: policy });
    await drain();
  }
  const run = await svc.countQueries(() => svc.ok(RUN, { id: policy }));
  expect(run.result.runPolicy.run).toEqual({ backupCount: n, skipped: [] });
  // Two AVAILABLE backups and one being taken per resource: keeping one deletes the older.
  await svc.ok(`mutation ($id: ID!) { updatePolicy(input: { id: $id, retention: { maxBackups: 1 } }) { policy { id } } }`, { id: policy });
  const ctx = new RequestContext(svc.projectIds.alpha, svc.ds, svc.config);
  const retain = await svc.countQueries(() => svc.services.policyRuns.retainPolicy(ctx, Buffer.from(policy, "base64url").toString().split(":")[1]));
  expect(retain.result).toBe(n);
  await drain();
  return { run: withoutKeyLookup(run.statements), retain: retain.count };
}

it("runs a policy and its retention in the same number of statements for 1 resource as for 20", async () => {
  const one = await measure("one", 1);
  const twenty = await measure("twenty", 20);
  expect(twenty).toEqual(one);
  // Authentication, the claim, the targets, the rules, the rows, the run and the announcement.
  expect(one.run).toBeLessThanOrEqual(20);
  expect(one.retain).toBeLessThanOrEqual(10);
});

/** The three shapes a console sends most (the API benchmark's), with what each costs in statements. */
const SHAPES: [string, string, number][] = [
  [
    "servers with their disks, the disks' last backups and counts, and policies",
    `{ servers(first: 50) { nodes { id name status systemDisk { id name status sizeBytes }
      disks(first: 10) { nodes { id name status device backups(first: 5) { totalCount nodes { id name status createdAt } } } }
      policies(first: 5) { nodes { id name enabled } } } } }`,
    // the servers; their system disks, disks and policies; the disks' backups with their counts
    3,
  ],
  [
    "a job list with each job's resources",
    `{ jobs(first: 50) { totalCount nodes { id type status progress createdAt finishedAt
      server { id name } disk { id name } backup { id name status } policy { id name } image { id name status } } } }`,
    // the jobs with their count; every resource of every job, whatever its table
    2,
  ],
  [
    "a backup page with children and images",
    `{ backups(first: 50, filter: { topLevel: true }) { totalCount nodes { id name status resourceType createdAt
      children(first: 10) { totalCount nodes { id name status sizeBytes } }
      images(first: 5) { nodes { id name status } } } } }`,
    // the backups with their count; their children with their counts and their images
    2,
  ],
];

it.each(SHAPES)("answers %s in a fixed number of statements, the key already known", async (_name, query, statements) => {
  await svc.ok(query);
  const { result, statements: sql } = await svc.countQueries(() => svc.ok(query));
  // The policy runs above left jobs pointing at servers, disks, backups and policies, and server backups with children.
  const rows = JSON.stringify(result).match(/"id"/g)?.length ?? 0;
  expect(rows).toBeGreaterThan(30);
  expect(withoutKeyLookup(sql)).toBe(statements);
});

it("looks a valid key up once per KEY_CACHE_MS, so a revoked key stops working within it", async () => {
  let now = 1_000_000;
  const projects = new ProjectService(svc.ds, () => now);
  const { project, apiKey } = await projects.create("keys");
  const bearer = `Bearer ${apiKey}`;
  // Twenty requests arriving together with a key not yet known share one lookup.
  const together = await svc.countQueries(() => Promise.all(Array.from({ length: 20 }, () => projects.authenticate(bearer))));
  expect([together.count, new Set(together.result.map((p) => p?.id))]).toEqual([1, new Set([project.id])]);
  const cached = await svc.countQueries(() => projects.authenticate(bearer));
  expect([cached.count, cached.result?.id]).toEqual([0, project.id]);

  await svc.ds.query(`UPDATE api_keys SET revoked_at = now() WHERE project_id = $1`, [project.id]);
  now += KEY_CACHE_MS - 1;
  expect((await projects.authenticate(bearer))?.id).toBe(project.id);
  now += 2;
  expect(await projects.authenticate(bearer)).toBeNull();
  // An unknown or revoked key is asked about every time.
  expect((await svc.countQueries(() => projects.authenticate(bearer))).count).toBe(1);
  expect((await svc.countQueries(() => projects.authenticate("Bearer stw_unknown"))).count).toBe(1);
});
