import { RequestContext } from "../../src/services/context";
import { waitJob } from "../helpers/data";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

/**
 * A nested query costs a fixed number of SQL statements, however many rows it
 * returns: every level of every list is one batched statement (plus one count).
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

  expect(large.count).toBe(small.count);
  // Authentication, then each list level and its count: well under one statement per row.
  expect(small.count).toBeLessThanOrEqual(20);
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
  return { run: run.count, retain: retain.count };
}

it("runs a policy and its retention in the same number of statements for 1 resource as for 20", async () => {
  const one = await measure("one", 1);
  const twenty = await measure("twenty", 20);
  expect(twenty).toEqual(one);
  // Authentication, the claim, the targets, the rules, the rows, the run and the announcement.
  expect(one.run).toBeLessThanOrEqual(20);
  expect(one.retain).toBeLessThanOrEqual(10);
});
