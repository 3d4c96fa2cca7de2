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
