import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ MIN_FREE_BYTES: "0" });
});
afterAll(async () => {
  await svc?.stop();
});

type Result = Awaited<ReturnType<TestService["gql"]>>;
const first = (r: Result) => r.errors?.[0];
const nodeId = (type: string, uuid: string) => Buffer.from(`${type}:${uuid}`).toString("base64url");

async function createServer(name: string, dataDisks: unknown[] = []) {
  const r = await svc.gql(
    `mutation ($n: String!, $d: [DataDiskInput!]) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB}, dataDisks: $d }) { server { id name systemDisk { name } disks { nodes { name } } } } }`,
    { n: name, d: dataDisks },
  );
  expect(r.errors).toBeUndefined();
  return r.data.createServer.server;
}

async function createDisk(name = "d", key?: string) {
  return (await svc.ok(`mutation ($n: String!) { createDisk(input: { name: $n, sizeBytes: ${MiB} }) { disk { id } } }`, { n: name }, key)).createDisk.disk.id as string;
}

describe("text Postgres cannot store is BAD_USER_INPUT naming the argument", () => {
  test("a NUL in a name filter, top-level or nested", async () => {
    const top = await svc.gql(`query ($n: String) { servers(filter: { name: $n }) { totalCount } }`, { n: "a\u0000b" });
    expect(first(top)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "filter.name" });
    const policy = (await svc.ok(`mutation { createPolicy(input: { name: "p", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
    const nested = await svc.gql(`query ($id: ID!, $n: String) { node(id: $id) { ... on Policy { disks(filter: { name: $n }) { totalCount } } } }`, { id: policy, n: "\u0000" });
    expect(first(nested)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "filter.name" });
  });

  test("a NUL in a description; other control characters are kept", async () => {
    const disk = await createDisk();
    const nul = await svc.gql(`mutation ($r: ID!, $d: String) { createBackup(input: { resourceId: $r, description: $d }) { backup { id } } }`, { r: disk, d: "a\u0000b" });
    expect(first(nul)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "description" });
    const text = "line one\nline\ttwo \u202Egnp.exe \u{1F600}";
    const ok = await svc.ok(`mutation ($r: ID!, $d: String) { createBackup(input: { resourceId: $r, description: $d }) { backup { id } } }`, { r: disk, d: text });
    const stored = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { description } } }`, { id: ok.createBackup.backup.id });
    expect(stored.node.description).toBe(text);
  });

  test("an unpaired surrogate sent as a JSON escape is refused instead of stored as U+FFFD", async () => {
    for (const s of ["\ud800", "x\udc00", "\udbff\udbff\udc00"]) {
      const r = await svc.gql(`mutation ($n: String!) { createDisk(input: { name: $n, sizeBytes: ${MiB} }) { disk { name } } }`, { n: s });
      expect(first(r)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "name" });
      const f = await svc.gql(`query ($n: String) { disks(filter: { name: $n }) { totalCount } }`, { n: s });
      expect(first(f)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "filter.name" });
    }
    // A pair is one character, and fine.
    const r = await svc.ok(`mutation ($n: String!) { createDisk(input: { name: $n, sizeBytes: ${MiB} }) { disk { name } } }`, { n: "\ud83d\ude00" });
    expect(r.createDisk.disk.name).toBe("\u{1F600}");
  });

  test("names refuse control and bidirectional-override characters", async () => {
    for (const [i, s] of ["a\u202Eb", "a\u2066b", "a\u0085b", "a\u2028b", "a\tb"].entries()) {
      const r = await svc.gql(`mutation ($n: String!) { createDisk(input: { name: $n, sizeBytes: ${MiB} }) { disk { name } } }`, { n: s });
      expect([i, first(r)?.extensions]).toEqual([i, { code: "BAD_USER_INPUT", field: "name" }]);
    }
    const r = await svc.gql(
      `mutation ($n: String!) { createServer(input: { name: "s", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB}, dataDisks: [{ name: $n, sizeBytes: ${MiB} }] }) { server { id } } }`,
      { n: "x\u202E" },
    );
    expect(first(r)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "dataDisks[0].name" });
  });

  test("a list argument names the item at fault", async () => {
    const r = await svc.gql(`query ($ids: [ID!]!) { nodes(ids: $ids) { id } }`, { ids: ["x", "y\u0000"] });
    expect(first(r)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "ids[1]" });
  });
});

test("a subscription sent over HTTP is a bad request pointing at graphql-ws", async () => {
  for (const query of [`subscription { jobUpdated { id } }`, `subscription ($id: ID!) { jobProgress(jobId: $id) { progress } }`]) {
    const post = await svc.gql(query, { id: "x" });
    expect(post.status).toBe(400);
    expect(first(post)?.extensions?.code).toBe("BAD_REQUEST");
    expect(first(post)?.message).toMatch(/graphql-ws/);
  }
  const get = await svc.http(`/graphql?query=${encodeURIComponent("subscription { jobUpdated { id } }")}`, { headers: { "apollo-require-preflight": "1" } });
  // Over GET Apollo refuses every operation but a query first (405).
  expect(get.status).toBe(405);
  expect(((await get.json()) as any).errors[0].extensions.code).toBe("BAD_REQUEST");
});

test("unbindPolicy: a resource that does not exist, or is another project's, is NOT_FOUND naming its ID", async () => {
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "u", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
  const mine = await createDisk("mine");
  const foreign = await createDisk("theirs", svc.keys.beta);
  await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: policy, r: [mine] });
  const unbind = (ids: string[]) => svc.gql(`mutation ($p: ID!, $r: [ID!]!) { unbindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { disks { totalCount } } } }`, { p: policy, r: ids });

  for (const missing of [nodeId("Disk", "00000000-0000-4000-8000-000000000000"), nodeId("Server", "00000000-0000-4000-8000-000000000001"), foreign]) {
    const r = await unbind([mine, missing]);
    expect(first(r)?.extensions?.code).toBe("NOT_FOUND");
    expect(first(r)?.message).toContain(missing);
  }
  // Nothing was unbound by the refused calls; an existing resource unbinds, twice without complaint.
  expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Policy { disks { totalCount } } } }`, { id: policy })).node.disks.totalCount).toBe(1);
  expect((await unbind([mine])).data.unbindPolicy.policy.disks.totalCount).toBe(0);
  expect((await unbind([mine])).errors).toBeUndefined();
});

describe("names derived from a 64-character name stay within 64 characters", () => {
  const long = "s".repeat(64);

  test("system and data disks of a server, without two long names colliding", async () => {
    const a = await createServer(long, [{ sizeBytes: MiB }]);
    const b = await createServer("s".repeat(63) + "t", [{ sizeBytes: MiB }]);
    for (const s of [a, b]) {
      expect(s.systemDisk.name.length).toBeLessThanOrEqual(64);
      expect(s.systemDisk.name).toMatch(/^s{40,}.*-system$/);
      for (const d of s.disks.nodes) expect(d.name.length).toBeLessThanOrEqual(64);
    }
    expect(a.systemDisk.name).not.toBe(b.systemDisk.name);
    // Short names are unchanged.
    expect((await createServer("web")).systemDisk.name).toBe("web-system");
  });

  test("a cut never splits a character made of a surrogate pair", async () => {
    for (let n = 40; n <= 64; n++) {
      const name = "a".repeat(64 - n) + "\u{1F600}".repeat(n / 2) + (n % 2 ? "b" : "");
      const s = await createServer(name.slice(0, 64).replace(/[\ud800-\udbff]$/, ""));
      expect(s.systemDisk.name.length).toBeLessThanOrEqual(64);
      expect(s.systemDisk.name).not.toMatch(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]|\ufffd/);
    }
  });

  test("the disk backups of a server backup, and the backup a FULL_SERVER image takes", async () => {
    const s = await createServer("x".repeat(40), [{ sizeBytes: MiB }]);
    const b = await svc.ok(`mutation ($r: ID!, $n: String) { createBackup(input: { resourceId: $r, name: $n }) { backup { name children { nodes { name } } } } }`, { r: s.id, n: long });
    expect(b.createBackup.backup.name).toBe(long);
    expect(b.createBackup.backup.children.nodes).toHaveLength(2);
    for (const c of b.createBackup.backup.children.nodes) expect(c.name.length).toBeLessThanOrEqual(64);

    const other = await createServer("full", []);
    const r = await svc.gql(`mutation ($s: ID!, $n: String!) { createImage(input: { serverId: $s, type: FULL_SERVER, name: $n }) { image { name sourceBackup { name } } } }`, { s: other.id, n: long });
    expect(r.errors).toBeUndefined();
    expect(r.data.createImage.image.name).toBe(long);
    expect(r.data.createImage.image.sourceBackup.name.length).toBeLessThanOrEqual(64);
  });
});

test("a forged cursor, or one from the list in another order, is BAD_USER_INPUT", async () => {
  await createDisk("c1");
  await createDisk("c2");
  const byName = await svc.ok(`{ disks(first: 1, orderBy: { field: NAME, direction: ASC }) { edges { cursor } } }`);
  const cursor = byName.disks.edges[0].cursor;
  const forged = (sort: string) => Buffer.from(JSON.stringify([sort, "00000000-0000-4000-8000-000000000000"])).toString("base64url");
  for (const after of [cursor, forged("2026-13-01 00:00:00+00"), forged("yesterday"), forged("2026-01-01 24:00:00+00")]) {
    const r = await svc.gql(`query ($a: String) { disks(first: 1, after: $a) { totalCount edges { cursor } } }`, { a: after });
    expect(first(r)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "after" });
  }
  const nul = await svc.gql(`query ($b: String) { disks(last: 1, before: $b, orderBy: { field: NAME, direction: ASC }) { edges { cursor } } }`, { b: forged("a\u0000") });
  expect(first(nul)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "before" });
  // Cursors of the list in its own order still page.
  const byTime = await svc.ok(`{ disks(first: 1) { edges { cursor } } }`);
  expect((await svc.gql(`query ($a: String) { disks(first: 1, after: $a) { edges { cursor } } }`, { a: byTime.disks.edges[0].cursor })).errors).toBeUndefined();
  expect((await svc.gql(`query ($a: String) { disks(first: 1, after: $a, orderBy: { field: NAME, direction: ASC }) { edges { cursor } } }`, { a: cursor })).errors).toBeUndefined();
});

test("BYSETPOS out of range stays BAD_USER_INPUT", async () => {
  const r = await svc.gql(`mutation { createPolicy(input: { name: "p", schedule: ["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=-400"] }) { policy { id } } }`);
  expect(first(r)?.extensions).toEqual({ code: "BAD_USER_INPUT", field: "schedule[0]" });
});
