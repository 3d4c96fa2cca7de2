import { GiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
const names = ["delta", "alpha", "echo", "charlie", "bravo", "golf", "foxtrot"];

beforeAll(async () => {
  svc = await startTestService();
  for (const name of names) {
    await svc.ok(`mutation ($n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${GiB} }) { server { id } } }`, { n: name });
  }
  // One server stopped, to filter on status.
  const { servers } = await svc.ok(`{ servers(filter: { name: "echo" }) { nodes { id } } }`);
  await svc.ok(`mutation ($id: ID!) { stopServer(input: { id: $id }) { server { id } } }`, { id: servers.nodes[0].id });
});
afterAll(async () => {
  await svc?.stop();
});

const PAGE = `query ($first: Int, $after: String, $last: Int, $before: String, $orderBy: Order, $filter: ServerFilter) {
  servers(first: $first, after: $after, last: $last, before: $before, orderBy: $orderBy, filter: $filter) {
    totalCount
    edges { cursor node { name } }
    nodes { name }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  }
}`;

async function page(vars: Record<string, unknown>) {
  return (await svc.ok(PAGE, vars)).servers;
}

it("walks forward by creation time with after cursors", async () => {
  const seen: string[] = [];
  let after: string | null = null;
  let pages = 0;
  for (;;) {
    const p: any = await page({ first: 3, after });
    pages++;
    expect(p.totalCount).toBe(7);
    expect(p.nodes.map((n: any) => n.name)).toEqual(p.edges.map((e: any) => e.node.name));
    expect(p.pageInfo.startCursor).toBe(p.edges[0].cursor);
    expect(p.pageInfo.endCursor).toBe(p.edges[p.edges.length - 1].cursor);
    expect(p.pageInfo.hasPreviousPage).toBe(after !== null);
    seen.push(...p.nodes.map((n: any) => n.name));
    if (!p.pageInfo.hasNextPage) break;
    after = p.pageInfo.endCursor;
  }
  expect(pages).toBe(3);
  expect(seen).toEqual(names);
});

it("walks backward with last and before", async () => {
  const last = await page({ last: 3 });
  expect(last.nodes.map((n: any) => n.name)).toEqual(names.slice(4));
  expect(last.pageInfo).toMatchObject({ hasPreviousPage: true, hasNextPage: false });
  const before = await page({ last: 3, before: last.pageInfo.startCursor });
  expect(before.nodes.map((n: any) => n.name)).toEqual(names.slice(1, 4));
  expect(before.pageInfo).toMatchObject({ hasPreviousPage: true, hasNextPage: true });
  const first = await page({ last: 3, before: before.pageInfo.startCursor });
  expect(first.nodes.map((n: any) => n.name)).toEqual(["delta"]);
  expect(first.pageInfo.hasPreviousPage).toBe(false);
});

it("orders by name in both directions", async () => {
  const asc = await page({ first: 10, orderBy: { field: "NAME", direction: "ASC" } });
  expect(asc.nodes.map((n: any) => n.name)).toEqual([...names].sort());
  const desc1 = await page({ first: 4, orderBy: { field: "NAME", direction: "DESC" } });
  const desc2 = await page({ first: 4, after: desc1.pageInfo.endCursor, orderBy: { field: "NAME", direction: "DESC" } });
  expect([...desc1.nodes, ...desc2.nodes].map((n: any) => n.name)).toEqual([...names].sort().reverse());
  const newest = await page({ first: 2, orderBy: { field: "CREATED_AT", direction: "DESC" } });
  expect(newest.nodes.map((n: any) => n.name)).toEqual(["foxtrot", "golf"]);
});

it("filters by status and name, counting the filtered list", async () => {
  const stopped = await page({ filter: { statuses: ["SHUTOFF"] } });
  expect(stopped.totalCount).toBe(1);
  expect(stopped.nodes).toEqual([{ name: "echo" }]);
  const active = await page({ first: 2, filter: { statuses: ["ACTIVE"] } });
  expect(active.totalCount).toBe(6);
  expect(active.pageInfo.hasNextPage).toBe(true);
  const byName = await page({ filter: { name: "L" } });
  expect(byName.nodes.map((n: any) => n.name).sort()).toEqual(["alpha", "charlie", "delta", "golf"]);
  // LIKE wildcards are matched literally.
  expect((await page({ filter: { name: "%" } })).totalCount).toBe(0);
  expect((await page({ filter: { name: "_" } })).totalCount).toBe(0);
});

it("filters nested lists and disks by type and attachment", async () => {
  const r = await svc.ok(`{
    system: disks(filter: { types: [SYSTEM] }) { totalCount }
    loose: disks(filter: { attached: false }) { totalCount }
    servers(first: 2) { nodes { disks(filter: { types: [DATA] }) { totalCount } } }
  }`);
  expect(r.system.totalCount).toBe(7);
  expect(r.loose.totalCount).toBe(0);
  expect(r.servers.nodes).toEqual([{ disks: { totalCount: 0 } }, { disks: { totalCount: 0 } }]);
});

it("rejects malformed pagination arguments with BAD_USER_INPUT naming the argument", async () => {
  const cases: [Record<string, unknown>, string][] = [
    [{ first: 1, last: 1 }, "last"],
    [{ first: -1 }, "first"],
    [{ first: 101 }, "first"],
    [{ after: "not-a-cursor" }, "after"],
    [{ first: 1, before: "x" }, "before"],
    [{ last: 1, after: "x" }, "after"],
  ];
  for (const [vars, field] of cases) {
    const r = await svc.gql(PAGE, vars);
    expect({ vars, code: r.errors?.[0]?.extensions?.code, field: r.errors?.[0]?.extensions?.field }).toEqual({ vars, code: "BAD_USER_INPUT", field });
  }
});

it("answers an empty page at the end of the list", async () => {
  const all = await page({ first: 7 });
  const after = await page({ first: 3, after: all.pageInfo.endCursor });
  expect(after.edges).toEqual([]);
  expect(after.pageInfo).toEqual({ hasNextPage: false, hasPreviousPage: true, startCursor: null, endCursor: null });
  expect((await page({ first: 0 })).edges).toEqual([]);
});
