import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
let alpha: { server: string; systemDisk: string; dataDisk: string; looseDisk: string; policy: string };

beforeAll(async () => {
  svc = await startTestService();
  const s = (
    await svc.ok(`mutation { createServer(input: { name: "secret", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${GiB}, dataDisks: [{ sizeBytes: ${MiB} }] }) {
      server { id systemDisk { id } disks { nodes { id type } } } } }`)
  ).createServer.server;
  const loose = (await svc.ok(`mutation { createDisk(input: { name: "loose", sizeBytes: ${MiB} }) { disk { id } } }`)).createDisk.disk.id;
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "secret-policy", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
  alpha = { server: s.id, systemDisk: s.systemDisk.id, dataDisk: s.disks.nodes.find((d: any) => d.type === "DATA").id, looseDisk: loose, policy };
});
afterAll(async () => {
  await svc?.stop();
});

const beta = () => svc.keys.beta;

it("lists and counts nothing of another project", async () => {
  const r = await svc.ok(
    `{ viewer { name } servers { totalCount nodes { id } } disks { totalCount } policies { totalCount } backups { totalCount } images { totalCount } jobs { totalCount } }`,
    {},
    beta(),
  );
  expect(r).toEqual({
    viewer: { name: "beta" },
    servers: { totalCount: 0, nodes: [] },
    disks: { totalCount: 0 },
    policies: { totalCount: 0 },
    backups: { totalCount: 0 },
    images: { totalCount: 0 },
    jobs: { totalCount: 0 },
  });
});

it("resolves another project's IDs to null in node and nodes", async () => {
  const ids = Object.values(alpha);
  const r = await svc.ok(`query ($ids: [ID!]!, $one: ID!) { node(id: $one) { id } nodes(ids: $ids) { id } }`, { ids, one: alpha.server }, beta());
  expect(r.node).toBeNull();
  expect(r.nodes).toEqual(ids.map(() => null));
  const own = await svc.ok(`query ($ids: [ID!]!) { nodes(ids: $ids) { id } }`, { ids });
  expect(own.nodes.map((n: any) => n.id)).toEqual(ids);
});

it("answers NOT_FOUND to every mutation on another project's resources and changes nothing", async () => {
  const calls: [string, Record<string, unknown>][] = [
    [`mutation ($id: ID!) { stopServer(input: { id: $id }) { server { id } } }`, { id: alpha.server }],
    [`mutation ($id: ID!) { startServer(input: { id: $id }) { server { id } } }`, { id: alpha.server }],
    [`mutation ($id: ID!) { deleteServer(input: { id: $id, deleteDisks: true }) { deletedServerId } }`, { id: alpha.server }],
    [`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: alpha.looseDisk }],
    [`mutation ($id: ID!) { detachDisk(input: { diskId: $id }) { disk { id } } }`, { id: alpha.dataDisk }],
    [`mutation ($id: ID!) { deletePolicy(input: { id: $id }) { deletedPolicyId } }`, { id: alpha.policy }],
    [`mutation ($id: ID!) { updatePolicy(input: { id: $id, enabled: false }) { policy { id } } }`, { id: alpha.policy }],
    [`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: alpha.policy, r: [alpha.server] }],
  ];
  for (const [query, variables] of calls) {
    const r = await svc.gql(query, variables, beta());
    expect({ query, code: r.errors?.[0]?.extensions?.code }).toEqual({ query, code: "NOT_FOUND" });
    expect(r.errors![0].message).not.toMatch(/secret/);
  }

  // beta's own policy cannot take alpha's server, and beta's server cannot take alpha's disk.
  const betaPolicy = (await svc.ok(`mutation { createPolicy(input: { name: "b", schedule: ["FREQ=DAILY"] }) { policy { id } } }`, {}, beta())).createPolicy.policy.id;
  const bind = await svc.gql(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: betaPolicy, r: [alpha.server] }, beta());
  expect(bind.errors?.[0]?.extensions?.code).toBe("NOT_FOUND");
  const betaServer = (await svc.ok(`mutation { createServer(input: { name: "b", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${GiB} }) { server { id } } }`, {}, beta())).createServer.server.id;
  const attach = await svc.gql(`mutation ($d: ID!, $s: ID!) { attachDisk(input: { diskId: $d, serverId: $s }) { disk { id } } }`, { d: alpha.looseDisk, s: betaServer }, beta());
  expect(attach.errors?.[0]?.extensions?.code).toBe("NOT_FOUND");

  const still = await svc.ok(`query ($ids: [ID!]!) { nodes(ids: $ids) { id ... on Server { serverStatus: status } ... on Disk { diskStatus: status } ... on Policy { enabled } } }`, {
    ids: Object.values(alpha),
  });
  expect(still.nodes).toEqual([
    { id: alpha.server, serverStatus: "ACTIVE" },
    { id: alpha.systemDisk, diskStatus: "IN_USE" },
    { id: alpha.dataDisk, diskStatus: "IN_USE" },
    { id: alpha.looseDisk, diskStatus: "AVAILABLE" },
    { id: alpha.policy, enabled: true },
  ]);
});

it("keeps the database itself from linking rows across projects", async () => {
  // Even a bug in a service could not attach one project's disk to another's server:
  // foreign keys are composite (project_id, id).
  const [{ id: betaServer }] = await svc.ds.query(`SELECT id FROM servers WHERE project_id = $1 LIMIT 1`, [svc.projectIds.beta]);
  await expect(svc.ds.query(`UPDATE disks SET server_id = $1, device = '/dev/vdq', status = 'IN_USE' WHERE project_id = $2 AND name = 'loose'`, [betaServer, svc.projectIds.alpha])).rejects.toThrow(
    /fk_disks_server/,
  );
});
