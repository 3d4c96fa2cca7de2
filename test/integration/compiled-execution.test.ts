/**
 * Operations over HTTP run compiled (graphql-jit); they must answer exactly as graphql-js
 * executing the same document against the same schema and rows does. Each document here
 * is run through both and the answers compared, including the places where the two
 * differ unless the service closes the gap: a list's size that comes after its page (a
 * promise), the Node interface's type, variables with input-object defaults omitted, bad
 * variables, directives, fragments and errors.
 */
import { execute, getIntrospectionQuery, parse, type ExecutionResult } from "graphql";
import { Project } from "../../src/entities";
import { buildStowageSchema } from "../../src/graphql/schema";
import { RequestContext } from "../../src/services/context";
import { backupNow, bytes, createDisk, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

jest.setTimeout(60_000);

let svc: TestService;
let project: Project;
const schema = buildStowageSchema();
beforeAll(async () => {
  svc = await startTestService();
  project = await svc.ds.getRepository(Project).findOneByOrFail({ id: svc.projectIds.alpha });
  for (let i = 0; i < 3; i++) {
    const server = (
      await svc.ok(`mutation ($n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB}, dataDisks: [{ sizeBytes: ${MiB} }] }) { server { id } } }`, {
        n: `compiled-${i}`,
      })
    ).createServer.server.id;
    await backupNow(svc, server);
  }
  const disk = await createDisk(svc, "compiled-disk", MiB);
  await writeDisk(svc, disk, bytes(MiB, 3));
  await backupNow(svc, disk);
  await backupNow(svc, disk);
});
afterAll(async () => {
  await svc?.stop();
});

/** graphql-js's answer, in this process, as the service would give it over HTTP (data, and each error's message and path). */
async function interpreted(query: string, variables: Record<string, unknown> = {}) {
  const result = (await execute({
    schema,
    document: parse(query),
    variableValues: variables,
    contextValue: { ctx: new RequestContext(project.id, svc.ds, svc.config), project, services: svc.services },
  })) as ExecutionResult;
  // As JSON, as it would leave: a DateTime is a string once serialised.
  return { data: JSON.parse(JSON.stringify(result.data ?? null)), errors: result.errors?.map((e) => ({ message: e.message, path: e.path })) };
}

async function compiled(query: string, variables: Record<string, unknown> = {}) {
  const r = await svc.gql(query, variables);
  return { data: r.data ?? null, errors: r.errors?.map((e: { message: string; path?: unknown }) => ({ message: e.message, path: e.path })) };
}

const READS: { name: string; query: string; variables?: Record<string, unknown> }[] = [
  {
    name: "the console's nested query",
    query: `{ servers(first: 50) { totalCount nodes { id name status systemDisk { id name status sizeBytes }
       disks(first: 10) { nodes { id name status device backups(first: 5) { totalCount nodes { id name status createdAt } } } }
       policies(first: 5) { nodes { id name enabled } } } } }`,
  },
  {
    name: "edges, cursors and page info",
    query: `{ backups(first: 2, orderBy: { direction: DESC }) { edges { cursor node { id name } } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }`,
  },
  {
    name: "nodes of every type through the Node interface, with fragments",
    query: `query { servers(first: 3) { nodes { id ...N disks { nodes { ...N } } } } } fragment N on Node { __typename id ... on Disk { sizeBytes } ... on Server { name } }`,
  },
  {
    name: "directives by variable",
    query: `query ($yes: Boolean!, $no: Boolean!) { servers(first: 2) { nodes { id name @include(if: $yes) status @skip(if: $yes) vcpus @include(if: $no) } } }`,
    variables: { yes: true, no: false },
  },
  { name: "a filter input with its defaults omitted", query: `query ($f: ServerFilter) { servers(first: 5, filter: $f) { totalCount nodes { name } } }`, variables: { f: { name: "compiled" } } },
];

describe("compiled execution answers as graphql-js does", () => {
  it.each(READS)("$name", async ({ query, variables }) => {
    const expected = await interpreted(query, variables);
    expect(expected.data).not.toBeNull();
    // Twice: the second run is the document compiled and kept.
    expect(await compiled(query, variables)).toEqual(expected);
    expect(await compiled(query, variables)).toEqual(expected);
  });

  it("counts a page after a cursor, whose size is read after the page", async () => {
    const first = (await svc.ok(`{ backups(first: 1) { totalCount pageInfo { endCursor } } }`)).backups;
    expect(first.totalCount).toBeGreaterThan(3);
    const query = `query ($after: String) { backups(first: 2, after: $after) { totalCount nodes { id } } disks(first: 1) { nodes { backups(first: 1, after: $after) { totalCount } } } }`;
    const expected = await interpreted(query, { after: first.pageInfo.endCursor });
    expect((expected.data as { backups: { totalCount: number } }).backups.totalCount).toBe(first.totalCount);
    expect(await compiled(query, { after: first.pageInfo.endCursor })).toEqual(expected);
  });

  it("answers errors beside data as graphql-js does", async () => {
    const server = (await svc.ok(`{ servers(first: 1) { nodes { id } } }`)).servers.nodes[0].id;
    const query = `query ($id: ID!, $server: ID!) { servers(first: 1) { nodes { id } } bad: node(id: $id) { id }
      node(id: $server) { id ... on Server { backups(after: "not a cursor") { totalCount } } } }`;
    const expected = await interpreted(query, { id: "nope", server });
    expect(expected.errors).toEqual([{ message: expect.stringContaining("cursor"), path: ["node", "backups"] }]);
    expect(expected.data).toMatchObject({ bad: null, node: null, servers: { nodes: [{ id: server }] } });
    expect(await compiled(query, { id: "nope", server })).toEqual(expected);
  });

  it("answers introspection as graphql-js does", async () => {
    const query = getIntrospectionQuery();
    expect(await compiled(query)).toEqual(await interpreted(query));
  });

  it("fills an omitted input field's default (deleteServer's deleteDisks) and refuses a bad variable with BAD_USER_INPUT", async () => {
    const server = (await svc.ok(`mutation { createServer(input: { name: "compiled-gone", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB} }) { server { id } } }`)).createServer.server.id;
    const r = await svc.gql(`mutation ($input: DeleteServerInput!) { deleteServer(input: $input) { deletedServerId } }`, { input: { id: server } });
    expect(r.errors).toBeUndefined();
    expect(r.data.deleteServer.deletedServerId).toBe(server);

    for (const [query, variables] of [
      [`query ($n: Int) { servers(first: $n) { totalCount } }`, { n: "three" }],
      [`query ($f: ServerFilter) { servers(filter: $f) { totalCount } }`, { f: { nope: 1 } }],
      [`mutation ($input: DeleteServerInput!) { deleteServer(input: $input) { deletedServerId } }`, { input: {} }],
    ] as const) {
      const bad = await svc.gql(query, variables);
      expect({ query, code: bad.errors?.[0]?.extensions?.code }).toEqual({ query, code: "BAD_USER_INPUT" });
      expect(bad.errors?.[0]?.message).toMatch(/^Variable "\$\w+" /);
    }
  });
});
