import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const CREATE_SERVER = `
  mutation ($input: CreateServerInput!) {
    createServer(input: $input) {
      server {
        id name status vcpus memoryMiB osType
        systemDisk { id name type device status sizeBytes }
        disks { totalCount nodes { id name type device status sizeBytes server { id } } }
      }
    }
  }`;

async function createServer(name: string, dataDisks: { name?: string; sizeBytes: number }[] = []) {
  const data = await svc.ok(CREATE_SERVER, { input: { name, vcpus: 2, memoryMiB: 2048, systemDiskSizeBytes: 10 * GiB, dataDisks } });
  return data.createServer.server;
}

function codeOf(r: { errors?: { extensions?: Record<string, unknown> }[] }) {
  return r.errors?.[0]?.extensions?.code;
}

describe("servers", () => {
  it("creates a server with its system disk on /dev/vda and data disks in order", async () => {
    const s = await createServer("web", [{ sizeBytes: GiB }, { name: "logs", sizeBytes: 2 * GiB }]);
    expect(s).toMatchObject({ name: "web", status: "ACTIVE", vcpus: 2, memoryMiB: 2048, osType: "LINUX" });
    expect(s.systemDisk).toMatchObject({ name: "web-system", type: "SYSTEM", device: "/dev/vda", status: "IN_USE", sizeBytes: 10 * GiB });
    expect(s.disks.totalCount).toBe(3);
    expect(s.disks.nodes.map((d: any) => [d.name, d.device, d.type])).toEqual([
      ["web-system", "/dev/vda", "SYSTEM"],
      ["web-data-1", "/dev/vdb", "DATA"],
      ["logs", "/dev/vdc", "DATA"],
    ]);
    for (const d of s.disks.nodes) expect(d.server.id).toBe(s.id);
  });

  it("stops and starts, refusing transitions from the wrong state", async () => {
    const s = await createServer("toggle");
    const stop = `mutation ($id: ID!) { stopServer(input: { id: $id }) { server { status } } }`;
    const start = `mutation ($id: ID!) { startServer(input: { id: $id }) { server { status } } }`;
    expect((await svc.ok(stop, { id: s.id })).stopServer.server.status).toBe("SHUTOFF");
    const again = await svc.gql(stop, { id: s.id });
    expect(codeOf(again)).toBe("FAILED_PRECONDITION");
    expect(again.errors![0].message).toMatch(/SHUTOFF/);
    expect((await svc.ok(start, { id: s.id })).startServer.server.status).toBe("ACTIVE");
    expect(codeOf(await svc.gql(start, { id: s.id }))).toBe("FAILED_PRECONDITION");
  });

  it("deleteServer always deletes the system disk and keeps data disks unless deleteDisks", async () => {
    const keep = await createServer("keep", [{ sizeBytes: GiB }]);
    const del = `mutation ($id: ID!, $dd: Boolean!) { deleteServer(input: { id: $id, deleteDisks: $dd }) { deletedServerId deletedDiskIds detachedDiskIds } }`;
    const r1 = (await svc.ok(del, { id: keep.id, dd: false })).deleteServer;
    expect(r1.deletedServerId).toBe(keep.id);
    expect(r1.deletedDiskIds).toEqual([keep.systemDisk.id]);
    const dataDiskId = keep.disks.nodes.find((d: any) => d.type === "DATA").id;
    expect(r1.detachedDiskIds).toEqual([dataDiskId]);
    const after = await svc.ok(`query ($ids: [ID!]!) { nodes(ids: $ids) { id ... on Disk { status device server { id } } } }`, {
      ids: [keep.id, keep.systemDisk.id, dataDiskId],
    });
    expect(after.nodes[0]).toBeNull();
    expect(after.nodes[1]).toBeNull();
    expect(after.nodes[2]).toEqual({ id: dataDiskId, status: "AVAILABLE", device: null, server: null });

    const gone = await createServer("gone", [{ sizeBytes: GiB }]);
    const r2 = (await svc.ok(del, { id: gone.id, dd: true })).deleteServer;
    expect(r2.deletedDiskIds.sort()).toEqual(gone.disks.nodes.map((d: any) => d.id).sort());
    expect(r2.detachedDiskIds).toEqual([]);
    const missing = await svc.gql(del, { id: gone.id, dd: true });
    expect(codeOf(missing)).toBe("NOT_FOUND");
  });

  it("rejects bad input naming the field", async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ name: "", vcpus: 1, memoryMiB: 1024, systemDiskSizeBytes: GiB }, "name"],
      [{ name: "x", vcpus: 0, memoryMiB: 1024, systemDiskSizeBytes: GiB }, "vcpus"],
      [{ name: "x", vcpus: 1, memoryMiB: 1, systemDiskSizeBytes: GiB }, "memoryMiB"],
      [{ name: "x", vcpus: 1, memoryMiB: 1024 }, "systemDiskSizeBytes"],
      [{ name: "x", vcpus: 1, memoryMiB: 1024, systemDiskSizeBytes: GiB + 1 }, "systemDiskSizeBytes"],
      [{ name: "x", vcpus: 1, memoryMiB: 1024, systemDiskSizeBytes: GiB, dataDisks: [{ sizeBytes: 0 }] }, "dataDisks[0].sizeBytes"],
      [{ name: "x", vcpus: 1, memoryMiB: 1024, systemDiskSizeBytes: GiB, imageId: "bm9wZQ" }, "imageId"],
    ];
    for (const [input, field] of cases) {
      const r = await svc.gql(CREATE_SERVER, { input });
      expect(codeOf(r)).toBe("BAD_USER_INPUT");
      expect(r.errors![0].extensions!.field).toBe(field);
      expect(r.errors![0].message).toContain(field);
    }
    const servers = await svc.ok(`{ servers(filter: { name: "x" }) { totalCount } }`);
    expect(servers.servers.totalCount).toBe(0);
  });
});

describe("disks", () => {
  const CREATE = `mutation ($name: String!, $size: SafeInt) { createDisk(input: { name: $name, sizeBytes: $size }) { disk { id name type status sizeBytes usedBytes device server { id } } } }`;
  const ATTACH = `mutation ($disk: ID!, $server: ID!, $device: String) { attachDisk(input: { diskId: $disk, serverId: $server, device: $device }) { disk { id status device server { id } } server { id } } }`;
  const DETACH = `mutation ($disk: ID!) { detachDisk(input: { diskId: $disk }) { disk { status device server { id } } } }`;
  const DELETE = `mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`;

  it("creates, attaches at the next free device, detaches and deletes a disk", async () => {
    const server = await createServer("host", [{ sizeBytes: GiB }]);
    const disk = (await svc.ok(CREATE, { name: "extra", size: 5 * GiB })).createDisk.disk;
    expect(disk).toMatchObject({ name: "extra", type: "DATA", status: "AVAILABLE", sizeBytes: 5 * GiB, usedBytes: 0, device: null, server: null });

    const attached = (await svc.ok(ATTACH, { disk: disk.id, server: server.id })).attachDisk;
    expect(attached.disk).toMatchObject({ status: "IN_USE", device: "/dev/vdc", server: { id: server.id } });

    const busy = await svc.gql(DELETE, { id: disk.id });
    expect(codeOf(busy)).toBe("FAILED_PRECONDITION");

    const twice = await svc.gql(ATTACH, { disk: disk.id, server: server.id });
    expect(codeOf(twice)).toBe("FAILED_PRECONDITION");

    const detached = (await svc.ok(DETACH, { disk: disk.id })).detachDisk.disk;
    expect(detached).toEqual({ status: "AVAILABLE", device: null, server: null });

    // The freed device is reused; an explicit device that is taken is a conflict.
    const other = (await svc.ok(CREATE, { name: "other", size: GiB })).createDisk.disk;
    expect((await svc.ok(ATTACH, { disk: other.id, server: server.id })).attachDisk.disk.device).toBe("/dev/vdc");
    const taken = await svc.gql(ATTACH, { disk: disk.id, server: server.id, device: "/dev/vdc" });
    expect(codeOf(taken)).toBe("CONFLICT");
    expect((await svc.ok(ATTACH, { disk: disk.id, server: server.id, device: "/dev/vdz" })).attachDisk.disk.device).toBe("/dev/vdz");
    const sys = await svc.gql(ATTACH, { disk: disk.id, server: server.id, device: "/dev/vda" });
    expect(codeOf(sys)).toBe("BAD_USER_INPUT");

    await svc.ok(DETACH, { disk: disk.id });
    expect((await svc.ok(DELETE, { id: disk.id })).deleteDisk.deletedDiskId).toBe(disk.id);
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { id } }`, { id: disk.id })).node).toBeNull();
  });

  it("never detaches the system disk", async () => {
    const server = await createServer("sys");
    const r = await svc.gql(DETACH, { disk: server.systemDisk.id });
    expect(codeOf(r)).toBe("FAILED_PRECONDITION");
    expect(r.errors![0].message).toMatch(/system disk/);
  });

  it("rejects sizes that are not whole MiB or beyond the maximum", async () => {
    for (const size of [0, MiB - 1, MiB + 512, 2 ** 53 - 1]) {
      const r = await svc.gql(CREATE, { name: "bad", size });
      expect(codeOf(r)).toBe("BAD_USER_INPUT");
      expect(r.errors![0].extensions!.field).toBe("sizeBytes");
    }
  });

  it("refuses a 26th data disk: device names run out at /dev/vdz", async () => {
    const server = await createServer(
      "full",
      Array.from({ length: 25 }, () => ({ sizeBytes: MiB })),
    );
    expect(server.disks.totalCount).toBe(26);
    const disk = (await svc.ok(CREATE, { name: "one-too-many", size: MiB })).createDisk.disk;
    const r = await svc.gql(ATTACH, { disk: disk.id, server: server.id });
    expect(codeOf(r)).toBe("FAILED_PRECONDITION");
  });

  it("serialises concurrent attaches of different disks to one server", async () => {
    const server = await createServer("race");
    const disks = await Promise.all(Array.from({ length: 6 }, (_, i) => svc.ok(CREATE, { name: `r${i}`, size: MiB })));
    const results = await Promise.all(disks.map((d) => svc.gql(ATTACH, { disk: d.createDisk.disk.id, server: server.id })));
    for (const r of results) expect(r.errors).toBeUndefined();
    const devices = results.map((r) => r.data.attachDisk.disk.device).sort();
    expect(devices).toEqual(["/dev/vdb", "/dev/vdc", "/dev/vdd", "/dev/vde", "/dev/vdf", "/dev/vdg"]);
  });
});

describe("policies", () => {
  const CREATE = `mutation ($input: CreatePolicyInput!) { createPolicy(input: $input) { policy { id name enabled schedule timezone nextRunAt lastRunAt retention { maxBackups retentionDays keepDaily keepWeekly keepMonthly keepYearly } } } }`;
  const UPDATE = `mutation ($input: UpdatePolicyInput!) { updatePolicy(input: $input) { policy { id enabled schedule timezone nextRunAt retention { maxBackups retentionDays keepDaily } } } }`;
  const BIND = `mutation ($p: ID!, $ids: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $ids }) { policy { servers { totalCount nodes { id } } disks { totalCount nodes { id } } } } }`;
  const UNBIND = `mutation ($p: ID!, $ids: [ID!]!) { unbindPolicy(input: { policyId: $p, resourceIds: $ids }) { policy { servers { totalCount } disks { totalCount } } } }`;

  it("creates a policy with nextRunAt computed in its time zone", async () => {
    const before = Date.now();
    const p = (
      await svc.ok(CREATE, {
        input: { name: "nightly", schedule: ["FREQ=DAILY;BYHOUR=2;BYMINUTE=0"], timezone: "Asia/Tokyo", retention: { maxBackups: 7, keepWeekly: 4 } },
      })
    ).createPolicy.policy;
    expect(p).toMatchObject({ name: "nightly", enabled: true, timezone: "Asia/Tokyo", lastRunAt: null });
    expect(p.retention).toEqual({ maxBackups: 7, retentionDays: null, keepDaily: 0, keepWeekly: 4, keepMonthly: 0, keepYearly: 0 });
    const next = new Date(p.nextRunAt);
    // 02:00 in Tokyo (UTC+9, no DST) is 17:00 UTC, within the next day.
    expect(next.getUTCHours()).toBe(17);
    expect(next.getUTCMinutes()).toBe(0);
    expect(next.getTime()).toBeGreaterThan(before);
    expect(next.getTime() - before).toBeLessThanOrEqual(24 * 3600 * 1000);
  });

  it("validates schedule, time zone and retention, naming the field", async () => {
    const base = { name: "p", schedule: ["FREQ=HOURLY"], timezone: "UTC" };
    const cases: [Record<string, unknown>, string][] = [
      [{ ...base, schedule: [] }, "schedule"],
      [{ ...base, schedule: ["FREQ=HOURLY", "EVERY DAY"] }, "schedule[1]"],
      [{ ...base, schedule: ["FREQ=SECONDLY"] }, "schedule[0]"],
      [{ ...base, schedule: ["BYHOUR=2"] }, "schedule[0]"],
      [{ ...base, schedule: ["FREQ=DAILY;COUNT=3"] }, "schedule[0]"],
      [{ ...base, schedule: ["FREQ=DAILY;UNTIL=20200101T000000Z"] }, "schedule"],
      [{ ...base, timezone: "Mars/Olympus" }, "timezone"],
      [{ ...base, retention: { maxBackups: 0 } }, "retention.maxBackups"],
      [{ ...base, retention: { retentionDays: 100000 } }, "retention.retentionDays"],
      [{ ...base, retention: { keepDaily: 101 } }, "retention.keepDaily"],
      [{ ...base, retention: { keepYearly: -1 } }, "retention.keepYearly"],
    ];
    for (const [input, field] of cases) {
      const r = await svc.gql(CREATE, { input });
      expect({ field, code: codeOf(r) }).toEqual({ field, code: "BAD_USER_INPUT" });
      expect(r.errors![0].extensions!.field).toBe(field);
    }
  });

  it("updates schedule and retention, recomputing nextRunAt; disabled policies have none", async () => {
    const p = (await svc.ok(CREATE, { input: { name: "u", schedule: ["FREQ=DAILY;BYHOUR=3"], retention: { maxBackups: 5, keepDaily: 3 } } })).createPolicy.policy;
    const disabled = (await svc.ok(UPDATE, { input: { id: p.id, enabled: false } })).updatePolicy.policy;
    expect(disabled.nextRunAt).toBeNull();
    const changed = (await svc.ok(UPDATE, { input: { id: p.id, enabled: true, schedule: ["FREQ=MINUTELY;INTERVAL=15"], retention: { maxBackups: null } } })).updatePolicy.policy;
    expect(changed.retention).toEqual({ maxBackups: null, retentionDays: null, keepDaily: 3 });
    const next = new Date(changed.nextRunAt);
    expect(next.getUTCMinutes() % 15).toBe(0);
    expect(next.getTime() - Date.now()).toBeLessThanOrEqual(15 * 60 * 1000);
    const bad = await svc.gql(UPDATE, { input: { id: p.id, timezone: "nowhere" } });
    expect(codeOf(bad)).toBe("BAD_USER_INPUT");
  });

  it("binds servers and disks, one policy per resource, and unbinds them", async () => {
    const a = (await svc.ok(CREATE, { input: { name: "a", schedule: ["FREQ=DAILY"] } })).createPolicy.policy;
    const b = (await svc.ok(CREATE, { input: { name: "b", schedule: ["FREQ=DAILY"] } })).createPolicy.policy;
    const server = await createServer("bound", [{ sizeBytes: MiB }]);
    const disk = server.disks.nodes[1];
    const bound = (await svc.ok(BIND, { p: a.id, ids: [server.id, disk.id] })).bindPolicy.policy;
    expect(bound.servers.nodes).toEqual([{ id: server.id }]);
    expect(bound.disks.nodes).toEqual([{ id: disk.id }]);
    // Binding again to the same policy is a no-op; to another policy a conflict.
    expect((await svc.ok(BIND, { p: a.id, ids: [server.id] })).bindPolicy.policy.servers.totalCount).toBe(1);
    const conflict = await svc.gql(BIND, { p: b.id, ids: [server.id] });
    expect(codeOf(conflict)).toBe("CONFLICT");
    const wrongType = await svc.gql(BIND, { p: b.id, ids: [a.id] });
    expect(codeOf(wrongType)).toBe("BAD_USER_INPUT");

    const fromServer = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { policies { nodes { id name } } } } }`, { id: server.id });
    expect(fromServer.node.policies.nodes).toEqual([{ id: a.id, name: "a" }]);

    const unbound = (await svc.ok(UNBIND, { p: a.id, ids: [server.id] })).unbindPolicy.policy;
    expect(unbound).toEqual({ servers: { totalCount: 0 }, disks: { totalCount: 1 } });
    expect((await svc.ok(BIND, { p: b.id, ids: [server.id] })).bindPolicy.policy.servers.totalCount).toBe(1);
  });

  it("deleting a policy unbinds its resources; deleting a resource removes its binding", async () => {
    const p = (await svc.ok(CREATE, { input: { name: "temp", schedule: ["FREQ=WEEKLY;BYDAY=MO"] } })).createPolicy.policy;
    const server = await createServer("temp-host");
    await svc.ok(BIND, { p: p.id, ids: [server.id] });
    const del = await svc.ok(`mutation ($id: ID!) { deletePolicy(input: { id: $id }) { deletedPolicyId } }`, { id: p.id });
    expect(del.deletePolicy.deletedPolicyId).toBe(p.id);
    const s = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { policies { totalCount } } } }`, { id: server.id });
    expect(s.node.policies.totalCount).toBe(0);
  });
});

describe("node and nodes", () => {
  it("resolves every type by global ID and answers null for unknown or malformed IDs", async () => {
    const server = await createServer("n");
    const policy = (await svc.ok(`mutation { createPolicy(input: { name: "n", schedule: ["FREQ=DAILY"] }) { policy { id } } }`)).createPolicy.policy;
    const viewer = (await svc.ok(`{ viewer { id name } }`)).viewer;
    const r = await svc.ok(`query ($ids: [ID!]!) { nodes(ids: $ids) { __typename id } }`, {
      ids: [server.id, server.systemDisk.id, policy.id, viewer.id, "garbage", Buffer.from("Server:00000000-0000-0000-0000-000000000000").toString("base64url")],
    });
    expect(r.nodes).toEqual([
      { __typename: "Server", id: server.id },
      { __typename: "Disk", id: server.systemDisk.id },
      { __typename: "Policy", id: policy.id },
      { __typename: "Project", id: viewer.id },
      null,
      null,
    ]);
    expect(viewer.name).toBe("alpha");
  });

  it("refuses more than 100 IDs at once", async () => {
    const r = await svc.gql(`query ($ids: [ID!]!) { nodes(ids: $ids) { id } }`, { ids: Array.from({ length: 101 }, () => "x") });
    expect(codeOf(r)).toBe("BAD_USER_INPUT");
  });
});
