import {
  Backup,
  BackupResourceType,
  BackupStatus,
  BackupTrigger,
  DiskFormat,
  ExportStatus,
  Image,
  ImageExport,
  ImageSource,
  ImageStatus,
  ImageType,
  Job,
  JobStatus,
  JobType,
  OsType,
} from "../../src/entities";
import { getNamedType, isLeafType, isNonNullType, isObjectType, type GraphQLOutputType } from "graphql";
import { buildStowageSchema } from "../../src/graphql/schema";
import { fromGlobalId } from "../../src/services/global-id";
import { GiB, startTestService, type TestService } from "../helpers/service";

/**
 * Nothing creates backups, images, exports or jobs through the API yet; rows are
 * written directly so every relationship of the graph can be walked both ways.
 */
let svc: TestService;
let ids: Record<string, string>;

const uuid = (gid: string) => fromGlobalId(gid)!.id;

beforeAll(async () => {
  svc = await startTestService();
  const project = svc.projectIds.alpha;
  const s = (
    await svc.ok(`mutation { createServer(input: { name: "app", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${GiB}, dataDisks: [{ name: "data", sizeBytes: ${GiB} }] }) {
      server { id systemDisk { id } disks { nodes { id type } } } } }`)
  ).createServer.server;
  const dataDisk = s.disks.nodes.find((d: any) => d.type === "DATA").id;
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "p", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy.id;
  await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: policy, r: [s.id] });

  const repo = <T extends object>(e: new () => T) => svc.ds.getRepository(e);
  const job = await repo(Job).save(
    repo(Job).create({
      projectId: project,
      type: JobType.BACKUP,
      status: JobStatus.SUCCEEDED,
      progress: 1,
      bytesDone: 10,
      bytesTotal: 10,
      serverId: uuid(s.id),
      policyId: uuid(policy),
      startedAt: new Date(),
      finishedAt: new Date(),
    }),
  );
  const parent = await repo(Backup).save(
    repo(Backup).create({
      projectId: project,
      name: "autobk_1",
      resourceType: BackupResourceType.SERVER,
      resourceId: uuid(s.id),
      resourceName: "app",
      serverId: uuid(s.id),
      status: BackupStatus.AVAILABLE,
      trigger: BackupTrigger.POLICY,
      policyId: uuid(policy),
      jobId: job.id,
      completedAt: new Date(),
    }),
  );
  const children = await repo(Backup).save(
    [uuid(s.systemDisk.id), uuid(dataDisk)].map((diskId, i) =>
      repo(Backup).create({
        projectId: project,
        name: `autobk_1-${i}`,
        resourceType: BackupResourceType.DISK,
        resourceId: diskId,
        resourceName: i ? "data" : "app-system",
        serverId: uuid(s.id),
        diskId,
        parentId: parent.id,
        status: BackupStatus.AVAILABLE,
        trigger: BackupTrigger.POLICY,
        policyId: uuid(policy),
        sizeBytes: 100,
        storedBytes: 40,
      }),
    ),
  );
  await repo(Job).update(job.id, { backupId: parent.id });
  const image = await repo(Image).save(
    repo(Image).create({
      projectId: project,
      name: "golden",
      type: ImageType.FULL_SERVER,
      status: ImageStatus.ACTIVE,
      source: ImageSource.BACKUP,
      sourceServerId: uuid(s.id),
      sourceBackupId: parent.id,
      osType: OsType.LINUX,
      virtualSizeBytes: 2 * GiB,
      sizeBytes: 50,
    }),
  );
  const diskImage = await repo(Image).save(
    repo(Image).create({
      projectId: project,
      name: "data-img",
      type: ImageType.DATA_DISK,
      status: ImageStatus.ACTIVE,
      source: ImageSource.DISK,
      sourceDiskId: uuid(dataDisk),
      osType: OsType.OTHER,
    }),
  );
  const exp = await repo(ImageExport).save(
    repo(ImageExport).create({ projectId: project, imageId: diskImage.id, format: DiskFormat.QCOW2, status: ExportStatus.READY, sizeBytes: 123, sha256: "ab".repeat(32) }),
  );
  const expJob = await repo(Job).save(
    repo(Job).create({
      projectId: project,
      type: JobType.EXPORT_IMAGE,
      status: JobStatus.RUNNING,
      imageId: diskImage.id,
      exportId: exp.id,
      bytesDone: 5,
      bytesTotal: 10,
      startedAt: new Date(Date.now() - 5000),
    }),
  );
  await repo(ImageExport).update(exp.id, { jobId: expJob.id });
  // A server and a disk made from the images.
  await svc.ds.query(`UPDATE servers SET source_image_id = $1 WHERE id = $2`, [image.id, uuid(s.id)]);
  await svc.ds.query(`UPDATE disks SET source_image_id = $1, source_backup_id = $2 WHERE id = $3`, [diskImage.id, children[1].id, uuid(dataDisk)]);

  const g = (type: string, id: string) => Buffer.from(`${type}:${id}`).toString("base64url");
  ids = {
    server: s.id,
    systemDisk: s.systemDisk.id,
    dataDisk,
    policy,
    job: g("Job", job.id),
    backup: g("Backup", parent.id),
    childSystem: g("Backup", children[0].id),
    childData: g("Backup", children[1].id),
    image: g("Image", image.id),
    diskImage: g("Image", diskImage.id),
    export: g("ImageExport", exp.id),
    exportJob: g("Job", expJob.id),
  };
});
afterAll(async () => {
  await svc?.stop();
});

it("walks Server to every related type", async () => {
  const r = await svc.ok(
    `query ($id: ID!) { node(id: $id) { ... on Server {
      sourceImage { id } systemDisk { id }
      disks { totalCount nodes { id } }
      backups { totalCount nodes { id children { totalCount } } }
      images { nodes { id } }
      policies { nodes { id } }
    } } }`,
    { id: ids.server },
  );
  expect(r.node).toEqual({
    sourceImage: { id: ids.image },
    systemDisk: { id: ids.systemDisk },
    disks: { totalCount: 2, nodes: [{ id: ids.systemDisk }, { id: ids.dataDisk }] },
    backups: { totalCount: 3, nodes: expect.arrayContaining([{ id: ids.backup, children: { totalCount: 2 } }]) },
    images: { nodes: [{ id: ids.image }] },
    policies: { nodes: [{ id: ids.policy }] },
  });
  const top = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { backups(filter: { topLevel: true }) { nodes { id } } } } }`, { id: ids.server });
  expect(top.node.backups.nodes).toEqual([{ id: ids.backup }]);
});

it("walks Disk to server, source image and backup, backups, images, policies", async () => {
  const r = await svc.ok(
    `query ($id: ID!) { node(id: $id) { ... on Disk { server { id } sourceImage { id } sourceBackup { id } backups { nodes { id } } images { nodes { id } } policies { totalCount } } } }`,
    { id: ids.dataDisk },
  );
  expect(r.node).toEqual({
    server: { id: ids.server },
    sourceImage: { id: ids.diskImage },
    sourceBackup: { id: ids.childData },
    backups: { nodes: [{ id: ids.childData }] },
    images: { nodes: [{ id: ids.diskImage }] },
    policies: { totalCount: 0 },
  });
});

it("walks Backup to its resource, policy, parent, children, job and images", async () => {
  const r = await svc.ok(
    `query ($id: ID!, $child: ID!) {
      parent: node(id: $id) { ... on Backup { resourceType resourceId resourceName server { id } disk { id } trigger policy { id } parent { id } job { id type } images { nodes { id } } children { nodes { id resourceType disk { id } parent { id } } } } }
      child: node(id: $child) { ... on Backup { sizeBytes storedBytes resourceId disk { id } } }
    }`,
    { id: ids.backup, child: ids.childData },
  );
  expect(r.parent).toEqual({
    resourceType: "SERVER",
    resourceId: ids.server,
    resourceName: "app",
    server: { id: ids.server },
    disk: null,
    trigger: "POLICY",
    policy: { id: ids.policy },
    parent: null,
    job: { id: ids.job, type: "BACKUP" },
    images: { nodes: [{ id: ids.image }] },
    children: {
      nodes: [
        { id: ids.childSystem, resourceType: "DISK", disk: { id: ids.systemDisk }, parent: { id: ids.backup } },
        { id: ids.childData, resourceType: "DISK", disk: { id: ids.dataDisk }, parent: { id: ids.backup } },
      ],
    },
  });
  expect(r.child).toEqual({ sizeBytes: 100, storedBytes: 40, resourceId: ids.dataDisk, disk: { id: ids.dataDisk } });
});

it("walks Image to its sources, exports and the servers and disks made from it", async () => {
  const r = await svc.ok(
    `query ($full: ID!, $disk: ID!) {
      full: node(id: $full) { ... on Image { type exportable sourceServer { id } sourceBackup { id } servers { nodes { id } } exports { totalCount } } }
      disk: node(id: $disk) { ... on Image { exportable sourceDisk { id } disks { nodes { id } } exports { nodes { id format status sizeBytes sha256 downloadUrl image { id } job { id } } } } }
    }`,
    { full: ids.image, disk: ids.diskImage },
  );
  expect(r.full).toEqual({
    type: "FULL_SERVER",
    exportable: false,
    sourceServer: { id: ids.server },
    sourceBackup: { id: ids.backup },
    servers: { nodes: [{ id: ids.server }] },
    exports: { totalCount: 0 },
  });
  expect(r.disk).toEqual({
    exportable: true,
    sourceDisk: { id: ids.dataDisk },
    disks: { nodes: [{ id: ids.dataDisk }] },
    exports: {
      nodes: [
        {
          id: ids.export,
          format: "QCOW2",
          status: "READY",
          sizeBytes: 123,
          sha256: "ab".repeat(32),
          downloadUrl: `/v1/exports/${ids.export}/file`,
          image: { id: ids.diskImage },
          job: { id: ids.exportJob },
        },
      ],
    },
  });
});

it("walks Policy to servers, disks and backups, and Job to everything it acts on", async () => {
  const r = await svc.ok(
    `query ($p: ID!, $j: ID!, $e: ID!) {
      p: node(id: $p) { ... on Policy { servers { nodes { id } } disks { totalCount } backups { totalCount } } }
      j: node(id: $j) { ... on Job { type status progress bytesDone bytesTotal server { id } backup { id } policy { id } error { code } etaSeconds } }
      e: node(id: $e) { ... on Job { status image { id } export { id } etaSeconds } }
    }`,
    { p: ids.policy, j: ids.job, e: ids.exportJob },
  );
  expect(r.p).toEqual({ servers: { nodes: [{ id: ids.server }] }, disks: { totalCount: 0 }, backups: { totalCount: 1 } }); // the server backup, not its parts
  expect(r.j).toEqual({
    type: "BACKUP",
    status: "SUCCEEDED",
    progress: 1,
    bytesDone: 10,
    bytesTotal: 10,
    server: { id: ids.server },
    backup: { id: ids.backup },
    policy: { id: ids.policy },
    error: null,
    etaSeconds: null,
  });
  expect(r.e.image).toEqual({ id: ids.diskImage });
  expect(r.e.export).toEqual({ id: ids.export });
  // 5 of 10 bytes in about 5 s: about 5 s to go.
  expect(r.e.etaSeconds).toBeGreaterThanOrEqual(4);
  expect(r.e.etaSeconds).toBeLessThanOrEqual(7);
});

it("filters jobs, backups and images at the top level", async () => {
  const r = await svc.ok(
    `query ($res: ID!) {
    running: jobs(filter: { statuses: [RUNNING] }) { nodes { id } }
    exports: jobs(filter: { types: [EXPORT_IMAGE] }) { totalCount }
    forServer: jobs(filter: { resourceId: $res }) { nodes { id } }
    policyBackups: backups(filter: { triggers: [POLICY], resourceTypes: [DISK] }) { totalCount }
    manual: backups(filter: { triggers: [MANUAL] }) { totalCount }
    full: images(filter: { types: [FULL_SERVER] }) { nodes { id } }
    named: images(filter: { name: "IMG" }) { nodes { id } }
    storage: viewer { storage { backupCount imageCount logicalBytes storedBytes dedupRatio exportBytes } }
  }`,
    { res: ids.server },
  );
  expect(r.running.nodes).toEqual([{ id: ids.exportJob }]);
  expect(r.exports.totalCount).toBe(1);
  expect(r.forServer.nodes).toEqual([{ id: ids.job }]);
  expect(r.policyBackups.totalCount).toBe(2);
  expect(r.manual.totalCount).toBe(0);
  expect(r.full.nodes).toEqual([{ id: ids.image }]);
  expect(r.named.nodes).toEqual([{ id: ids.diskImage }]);
  // The rows here have no data in the vault: nothing is stored. The images have no blocks,
  // so they represent no written data whatever their virtual size; the backups say 100 bytes each.
  expect(r.storage.storage).toEqual({ backupCount: 1, imageCount: 2, logicalBytes: 200, storedBytes: 0, dedupRatio: 1, exportBytes: 123 });
});

/**
 * A list reads only the columns its selected fields need; node(id:) reads whole rows.
 * Every field of every node type, asked alone through its list and through nodes(ids:),
 * must answer the same: a field resolver that reads a column it does not declare
 * (@Reads) would answer null or wrong through the list.
 */
describe("lists read only what the selection needs", () => {
  const schema = buildStowageSchema();
  /** The selection that asks for `field` and nothing under it that could differ for other reasons. */
  const ask = (name: string, type: GraphQLOutputType): string => {
    const named = getNamedType(type);
    if (isLeafType(named)) return name;
    if (isObjectType(named) && named.getFields().totalCount) {
      const node = getNamedType(named.getFields().nodes.type);
      return `${name} { totalCount nodes { ${isObjectType(node) && node.getFields().id ? "id" : "__typename"} } }`;
    }
    if (isObjectType(named) && named.getFields().id) return `${name} { id }`;
    if (isObjectType(named))
      return `${name} { ${Object.entries(named.getFields())
        .map(([n, f]) => ask(n, f.type))
        .join(" ")} }`;
    return `${name} { __typename }`;
  };
  const cases: [string, string][] = [
    ["Server", "servers"],
    ["Disk", "disks"],
    ["Backup", "backups"],
    ["Image", "images"],
    ["Policy", "policies"],
    ["Job", "jobs"],
  ];

  it.each(cases)("%s: each field through %s equals the field through nodes(ids:)", async (typeName, list) => {
    const type = schema.getType(typeName);
    if (!isObjectType(type)) throw new Error(`${typeName} is not an object type`);
    const fields = Object.entries(type.getFields()).filter(([, f]) => f.args.every((a) => !isNonNullType(a.type) || a.defaultValue !== undefined));
    expect(fields.length).toBeGreaterThan(5);
    const all = fields.map(([n, f]) => ask(n, f.type)).join(" ");
    const whole = await svc.ok(`{ ${list}(first: 100) { nodes { id } } }`);
    const ids = whole[list].nodes.map((n: { id: string }) => n.id);
    expect(ids.length).toBeGreaterThan(0);
    const reference = (await svc.ok(`query ($ids: [ID!]!) { nodes(ids: $ids) { ... on ${typeName} { ${all} } } }`, { ids })).nodes;
    for (const [name, field] of fields) {
      const selection = ask(name, field.type);
      const listed = (await svc.ok(`{ ${list}(first: 100) { nodes { id ${selection} } } }`))[list].nodes;
      if (name === "etaSeconds") {
        // A running job's ETA is computed from the clock at each read, and the two reads may be seconds apart.
        const close = (n: Record<string, unknown>, k: number) => {
          const a = n[name] as number | null;
          const b = reference[k][name] as number | null;
          return [n.id, a === null || b === null ? a === b : Math.abs(a - b) <= 3];
        };
        expect(listed.map(close)).toEqual(reference.map((n: Record<string, unknown>) => [n.id, true]));
        continue;
      }
      expect(listed.map((n: Record<string, unknown>) => [n.id, n[name]])).toEqual(reference.map((n: Record<string, unknown>) => [n.id, n[name]]));
    }
  });
});
