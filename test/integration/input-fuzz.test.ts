import crypto from "node:crypto";
import { getNamedType, isInputObjectType, isListType, isNonNullType, isObjectType, isScalarType, type GraphQLArgument, type GraphQLField, type GraphQLInputType } from "graphql";
import { buildStowageSchema } from "../../src/graphql/schema";
import { backup, succeed } from "../helpers/data";
import { prng } from "../helpers/formats";
import { MiB, startTestService, type TestService } from "../helpers/service";

/**
 * Random text into every string and ID argument of every query and mutation (and of every
 * list field a node has), one argument at a time, the others valid: no answer may be an
 * internal error, and text accepted where it is stored reads back as sent (trimmed, for
 * names and descriptions). STOWAGE_FUZZ_SEED replays a run; the seed is in every failure.
 */
const SEED = Number(process.env.STOWAGE_FUZZ_SEED ?? crypto.randomInt(2 ** 31));
const RANDOM_PER_ARGUMENT = Number(process.env.STOWAGE_FUZZ_ROUNDS ?? 3);
const ALLOWED = new Set(["BAD_USER_INPUT", "NOT_FOUND", "FORBIDDEN", "CONFLICT", "FAILED_PRECONDITION", "QUERY_TOO_COMPLEX"]);

const PIECES = [
  "\u0000",
  "\ud800",
  "\udbff",
  "\udc00",
  "\udfff",
  "\u{1F600}",
  "\u{1F468}\u200d\u{1F469}\u200d\u{1F467}",
  "\u202E",
  "\u202A",
  "\u2066",
  "\u2069",
  "\u200f",
  "\u0001",
  "\u0007",
  "\t",
  "\n",
  "\r",
  "\u001b",
  "\u007f",
  "\u0085",
  "\u2028",
  "\ufeff",
  "\uffff",
  "\u0301",
  "%",
  "_",
  "\\",
  "'",
  '"',
  ";",
  "--",
  "/*",
  "*/",
  "$1",
  "::text",
  " ",
  "  ",
  "a",
  "Z",
  "0",
  "é",
  "ß",
  "中",
  "ж",
  "ש",
  ":",
  "=",
  "/dev/vd",
];
// Sent to every argument besides the random ones: what Postgres cannot store, LIKE and SQL metacharacters with an
// emoji (a valid name) and with a bidirectional override (a valid description, not a name), and a long text.
const CORPUS = ["a\u0000b", "x\udc00y", " %_\\'\u{1F600}; -- ", "%_\\'\u202E\u{1F600}", "x".repeat(100_000)];

const TYPES = ["Server", "Disk", "Backup", "Image", "ImageExport", "Policy", "Job", "Project", "Nope"];

function generator(random: () => number, foreignUuids: string[]) {
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)];
  const text = (): string => {
    const n = random() < 0.1 ? 1 + Math.floor(random() * 5000) : Math.floor(random() * 40);
    let s = "";
    for (let i = 0; i < n; i++) s += pick(PIECES);
    return s;
  };
  const uuid = () => (random() < 0.5 ? pick(foreignUuids) : crypto.randomUUID());
  return (): string => {
    switch (Math.floor(random() * 4)) {
      case 0: // an ID's shape, of another project or none
        return Buffer.from(`${pick(TYPES)}:${random() < 0.8 ? uuid() : text()}`).toString("base64url");
      case 1: // a cursor's shape with a forged sort value
        return Buffer.from(JSON.stringify([random() < 0.3 ? new Date(random() * 4e12).toISOString().replace("T", " ").replace("Z", "+00") : text(), uuid()])).toString("base64url");
      default:
        return text();
    }
  };
}

type Path = (string | number)[];

/** Every String or ID leaf an argument's type holds, lists entered at item 0. */
function leaves(type: GraphQLInputType, path: Path): Path[] {
  if (isNonNullType(type)) return leaves(type.ofType, path);
  if (isListType(type)) return leaves(type.ofType, [...path, 0]);
  if (isInputObjectType(type)) return Object.values(type.getFields()).flatMap((f) => leaves(f.type, [...path, f.name]));
  return isScalarType(type) && (type.name === "String" || type.name === "ID") ? [path] : [];
}

function setPath(root: Record<string, unknown>, path: Path, value: string): Record<string, unknown> {
  const copy = structuredClone(root);
  let at: any = copy;
  path.forEach((key, i) => {
    if (i === path.length - 1) at[key] = value;
    else at = at[key] ??= typeof path[i + 1] === "number" ? [{}] : {};
  });
  return copy;
}

function selection(field: GraphQLField<unknown, unknown>): string {
  const type = getNamedType(field.type);
  if (isObjectType(type) && type.getFields().totalCount) return "{ totalCount edges { cursor } }";
  return isScalarType(type) ? "" : "{ __typename }";
}

function document(field: GraphQLField<unknown, unknown>, args: Record<string, unknown>, root: "query" | "mutation", via?: string): string {
  const used = field.args.filter((a: GraphQLArgument) => a.name in args);
  const vars = used.map((a) => `$${a.name}: ${String(a.type)}`);
  const call = `${field.name}${used.length ? `(${used.map((a) => `${a.name}: $${a.name}`).join(", ")})` : ""} ${selection(field)}`;
  if (!via) return `${root}${vars.length ? ` (${vars.join(", ")})` : ""} { ${call} }`;
  return `query ($nodeId: ID!${vars.length ? ", " + vars.join(", ") : ""}) { node(id: $nodeId) { ... on ${via} { ${call} } } }`;
}

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ MIN_FREE_BYTES: "0", MUTATIONS_PER_MINUTE: "0" });
});
afterAll(async () => {
  await svc?.stop();
});

test(`random text in every argument is never an internal error (seed ${SEED})`, async () => {
  // Fixtures the arguments not under test point at, and another project's resources for IDs of the right shape.
  const s = (
    await svc.ok(`mutation { createServer(input: { name: "fz", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB}, dataDisks: [{ sizeBytes: ${MiB} }] }) { server { id disks { nodes { id } } } } }`)
  ).createServer.server;
  const disk = (await svc.ok(`mutation { createDisk(input: { name: "fz", sizeBytes: ${MiB} }) { disk { id } } }`)).createDisk.disk.id;
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "fz", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
  const b = await backup(svc, disk);
  await succeed(svc, b.jobId);
  const img = (await svc.ok(`mutation ($b: ID!) { createImage(input: { name: "fz", backupId: $b }) { image { id } job { id } } }`, { b: b.backupId })).createImage;
  await succeed(svc, img.job.id);
  const beta = (await svc.ok(`mutation { createServer(input: { name: "theirs", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB} }) { server { id systemDisk { id } } } }`, {}, svc.keys.beta))
    .createServer.server;
  const foreignUuids = [beta.id, beta.systemDisk.id].map((id: string) => Buffer.from(id, "base64url").toString().split(":")[1]);
  const fixtures: Record<string, string> = { Server: s.id, Disk: disk, Backup: b.backupId, Image: img.image.id, Policy: policy };

  // Valid arguments for each field that requires some; the argument under test replaces one leaf.
  const any = { input: { id: "x" } };
  const BASE: Record<string, Record<string, unknown>> = {
    "Query.node": { id: "x" },
    "Query.nodes": { ids: ["x"] },
    "Mutation.createServer": { input: { name: "fz", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: MiB, dataDisks: [{ sizeBytes: MiB }] } },
    "Mutation.createDisk": { input: { name: "fz", sizeBytes: MiB } },
    "Mutation.attachDisk": { input: { diskId: disk, serverId: s.id } },
    "Mutation.detachDisk": { input: { diskId: s.disks.nodes[1].id } },
    "Mutation.createBackup": { input: { resourceId: disk } },
    "Mutation.restoreBackup": { input: { backupId: b.backupId, mappings: [{ backupId: b.backupId, diskId: disk }] } },
    "Mutation.createImage": { input: { name: "fz", backupId: b.backupId } },
    "Mutation.importImage": { input: { name: "fz", uploadId: crypto.randomUUID() } },
    "Mutation.exportImage": { input: { imageId: img.image.id, format: "RAW" } },
    "Mutation.createPolicy": { input: { name: "fz", schedule: ["FREQ=DAILY"] } },
    "Mutation.updatePolicy": { input: { id: policy } },
    "Mutation.bindPolicy": { input: { policyId: policy, resourceIds: [disk] } },
    "Mutation.unbindPolicy": { input: { policyId: policy, resourceIds: [disk] } },
    "Mutation.createNbdExport": { input: { resourceId: disk, readOnly: true } },
    ...Object.fromEntries(
      [
        "startServer",
        "stopServer",
        "deleteServer",
        "deleteDisk",
        "hydrateDisk",
        "deleteBackup",
        "verifyBackup",
        "deleteImage",
        "deleteImageExport",
        "deleteNbdExport",
        "cancelJob",
        "deletePolicy",
        "runPolicy",
      ].map((m) => [`Mutation.${m}`, any]),
    ),
  };

  // Where an accepted text is stored, and how to read it back.
  const name = (type: string) => ({ read: `... on ${type} { name }`, value: (n: any) => n.name, expect: (v: string) => v.trim() });
  const STORED: Record<string, { id: (data: any) => string; read: string; value: (node: any) => string; expect: (sent: string) => string }> = {
    "createServer input.name": { id: (d) => d.createServer.server.id, ...name("Server") },
    "createServer input.dataDisks.0.name": {
      id: (d) => d.createServer.server.id,
      read: "... on Server { disks(filter: { types: [DATA] }) { nodes { name } } }",
      value: (n) => n.disks.nodes[0].name,
      expect: (v) => v.trim(),
    },
    "createDisk input.name": { id: (d) => d.createDisk.disk.id, ...name("Disk") },
    "createBackup input.name": { id: (d) => d.createBackup.backup.id, ...name("Backup") },
    "createBackup input.description": { id: (d) => d.createBackup.backup.id, read: "... on Backup { description }", value: (n) => n.description, expect: (v) => v.trim() },
    "createImage input.name": { id: (d) => d.createImage.image.id, ...name("Image") },
    "createImage input.description": { id: (d) => d.createImage.image.id, read: "... on Image { description }", value: (n) => n.description, expect: (v) => v.trim() },
    "createPolicy input.name": { id: (d) => d.createPolicy.policy.id, ...name("Policy") },
    "createPolicy input.timezone": { id: (d) => d.createPolicy.policy.id, read: "... on Policy { timezone }", value: (n) => n.timezone, expect: (v) => v },
    "updatePolicy input.name": { id: (d) => d.updatePolicy.policy.id, ...name("Policy") },
    "updatePolicy input.timezone": { id: (d) => d.updatePolicy.policy.id, read: "... on Policy { timezone }", value: (n) => n.timezone, expect: (v) => v },
  };
  const PAYLOAD: Record<string, string> = {
    createServer: "{ server { id systemDisk { name } disks { nodes { name } } } }",
    createDisk: "{ disk { id } }",
    createBackup: "{ backup { id name children { nodes { name } } } }",
    createImage: "{ image { id } }",
    createPolicy: "{ policy { id } }",
    updatePolicy: "{ policy { id } }",
  };

  const schema = buildStowageSchema();
  type Target = { key: string; field: GraphQLField<unknown, unknown>; root: "query" | "mutation"; via?: string };
  const targets: Target[] = [];
  for (const [root, type] of [
    ["query", schema.getQueryType()!],
    ["mutation", schema.getMutationType()!],
  ] as const) {
    for (const field of Object.values(type.getFields())) targets.push({ key: `${type.name}.${field.name}`, field, root });
  }
  for (const via of Object.keys(fixtures)) {
    const type = schema.getType(via);
    if (!isObjectType(type)) throw new Error(`no type ${via}`);
    for (const field of Object.values(type.getFields())) if (field.args.length) targets.push({ key: `${via}.${field.name}`, field, root: "query", via });
  }
  // Every type with a field taking arguments has a fixture to reach it by.
  for (const type of Object.values(schema.getTypeMap())) {
    if (!isObjectType(type) || type.name.startsWith("__") || ["Query", "Mutation", "Subscription"].includes(type.name)) continue;
    if (Object.values(type.getFields()).some((f) => f.args.length)) expect([type.name, fixtures[type.name] !== undefined]).toEqual([type.name, true]);
  }

  const next = generator(prng(SEED), foreignUuids);
  type Case = { t: Target; path: Path; text: string };
  const cases: Case[] = [];
  for (const t of targets) {
    const required = t.field.args.some((a) => isNonNullType(a.type) && a.defaultValue === undefined);
    if (required && !BASE[t.key]) throw new Error(`${t.key} needs valid base arguments in this test`);
    for (const path of t.field.args.flatMap((a) => leaves(a.type, [a.name]))) {
      for (const text of [...CORPUS, ...Array.from({ length: RANDOM_PER_ARGUMENT }, next)]) cases.push({ t, path, text });
    }
  }

  const failures: string[] = [];
  let readBack = 0;
  const run = async ({ t, path, text }: Case) => {
    const args = setPath(BASE[t.key] ?? {}, path, text);
    let query = document(t.field, args, t.root, t.via);
    if (t.root === "mutation" && PAYLOAD[t.field.name]) query = query.replace(/\{ __typename \} \}$/, `${PAYLOAD[t.field.name]} }`);
    const r = await svc.gql(query, { ...args, ...(t.via ? { nodeId: fixtures[t.via] } : {}) });
    const where = `${t.key}(${path.join(".")}) = ${JSON.stringify(text.length > 200 ? text.slice(0, 200) + "…" : text)} [seed ${SEED}]`;
    if (r.status >= 500) failures.push(`${where}: HTTP ${r.status}`);
    for (const e of r.errors ?? []) {
      if (!ALLOWED.has(String(e.extensions?.code))) failures.push(`${where}: ${e.extensions?.code} ${e.message}`);
    }
    if (r.errors?.length || !r.data) return;
    for (const d of [r.data.createServer?.server.systemDisk, ...(r.data.createServer?.server.disks.nodes ?? []), ...(r.data.createBackup?.backup.children.nodes ?? [])]) {
      if (d && d.name.length > 64) failures.push(`${where}: derived name ${JSON.stringify(d.name)} is longer than 64`);
    }
    const stored = STORED[`${t.field.name} ${path.join(".")}`];
    if (stored) {
      const read = await svc.ok(`query ($id: ID!) { node(id: $id) { ${stored.read} } }`, { id: stored.id(r.data) });
      const got = stored.value(read.node);
      if (got !== stored.expect(text)) failures.push(`${where}: stored ${JSON.stringify(got)}`);
      readBack++;
    }
  };
  // A few requests in flight at once, as clients send them; the cases of one field in order, so no
  // updatePolicy overwrites the name another one is reading back.
  const groups = new Map<string, Case[]>();
  for (const c of cases) groups.set(c.t.key, [...(groups.get(c.t.key) ?? []), c]);
  const byField = [...groups.values()];
  await Promise.all(
    Array.from({ length: 6 }, async () => {
      for (let group = byField.shift(); group; group = byField.shift()) {
        for (const c of group) {
          await run(c).catch((err) => failures.push(`${c.t.key}(${c.path.join(".")}) [seed ${SEED}]: ${err instanceof Error ? err.message : String(err)}`));
        }
      }
    }),
  );

  expect(failures.slice(0, 20)).toEqual([]);
  // Some texts were accepted and read back (the corpus's metacharacters with an emoji make a valid name and description).
  expect(readBack).toBeGreaterThan(5);
  // The walk reached the arguments it should: the text ones of lists, nested lists and mutations.
  const reached = new Set(cases.map((c) => `${c.t.key}(${c.path.join(".")})`));
  for (const key of [
    "Query.servers(filter.name)",
    "Server.disks(filter.name)",
    "Policy.backups(after)",
    "Mutation.createServer(input.dataDisks.0.name)",
    "Mutation.createBackup(input.description)",
    "Mutation.importImage(input.uploadId)",
    "Mutation.createPolicy(input.schedule.0)",
    "Mutation.updatePolicy(input.timezone)",
    "Mutation.attachDisk(input.device)",
    "Mutation.unbindPolicy(input.resourceIds.0)",
    "Query.jobs(filter.resourceId)",
  ]) {
    expect([key, reached.has(key)]).toEqual([key, true]);
  }
}, 120_000);
