import { backup, bytes, createDisk, succeed, waitJob, writeDisk } from "../helpers/data";
import { createLogger } from "../../src/logger";
import { decodeId, fromGlobalId, type NodeType } from "../../src/services/global-id";
import { MiB, startTestService, type TestService } from "../helpers/service";

type Line = Record<string, any> & { level: string; msg: string };

const lines: Line[] = [];
let svc: TestService;
let projectId: string;
beforeAll(async () => {
  svc = await startTestService(
    {},
    {},
    createLogger("debug", (l) => lines.push(JSON.parse(l))),
  );
  projectId = (await svc.ok(`{ viewer { id } }`)).viewer.id;
});
afterAll(async () => {
  await svc?.stop();
});

const RESOURCES: Record<string, NodeType> = { job: "Job", backup: "Backup", disk: "Disk", server: "Server", image: "Image", export: "ImageExport", policy: "Policy", project: "Project" };
const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/i;

// Whatever a test made the service log names resources only by the IDs the API takes.
let checked = 0;
afterEach(() => {
  const fresh = lines.slice(checked);
  checked = lines.length;
  for (const line of fresh) {
    for (const [key, type] of Object.entries(RESOURCES)) {
      if (key in line) expect([line.msg, key, fromGlobalId(line[key])?.type]).toEqual([line.msg, key, type]);
    }
    expect([line.msg, JSON.stringify(line).match(UUID)?.[0]]).toEqual([line.msg, undefined]);
  }
});

const JOB = `query ($id: ID!) { node(id: $id) { ... on Job {
  id type status bytesDone bytesTotal startedAt finishedAt error { code message }
  server { id } disk { id } backup { id } image { id } policy { id } export { id }
} } }`;
const getJob = async (id: string) => (await svc.ok(JOB, { id })).node;

/** The line `msg` about the job, waiting a little for a line written as the job ends. */
async function lineOf(msg: string, jobId: string): Promise<Line> {
  for (let i = 0; i < 100; i++) {
    const found = lines.filter((l) => l.msg === msg && l.job === jobId);
    if (found.length) {
      expect(found).toHaveLength(1);
      return found[0];
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`no "${msg}" line for job ${jobId}`);
}

/** What a job's lines must say about it, as the API shows the job. */
function described(job: any) {
  const resources = Object.fromEntries(["server", "disk", "backup", "image", "policy", "export"].filter((k) => job[k]).map((k) => [k, job[k].id]));
  return { job: job.id, type: job.type, project: projectId, worker: svc.runner.workerId, attempt: 1, ...resources };
}

/** Queues jobs with the runner stopped, then lets it take them; `meanwhile` runs before it starts again. */
async function queued<T>(make: () => Promise<T>, meanwhile: (made: T) => Promise<unknown> = async () => {}): Promise<T> {
  await svc.runner.stop();
  try {
    const made = await make();
    await meanwhile(made);
    return made;
  } finally {
    await svc.runner.start();
  }
}

async function uploadAndImport(name: string): Promise<{ uploadId: string; jobId: string; imageId: string }> {
  const res = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(MiB, 3)), headers: { "content-type": "application/octet-stream" } });
  expect(res.status).toBe(201);
  const { id: uploadId } = (await res.json()) as { id: string };
  const r = (await svc.ok(`mutation ($i: ImportImageInput!) { importImage(input: $i) { image { id } job { id } } }`, { i: { name, uploadId, type: "DATA_DISK" } })).importImage;
  return { uploadId, jobId: r.job.id, imageId: r.image.id };
}

describe("job lines", () => {
  it("a backup logs its start and its end with the job's global ID, type, resources, bytes and duration", async () => {
    const disk = await createDisk(svc, "logged", 4 * MiB);
    await writeDisk(svc, disk, bytes(2 * MiB, 1));
    const { jobId, backupId } = await backup(svc, disk);
    await succeed(svc, jobId);
    const job = await getJob(jobId);
    expect(job).toMatchObject({ type: "BACKUP", disk: { id: disk }, backup: { id: backupId } });
    expect(job.bytesDone).toBeGreaterThan(0);

    const start = await lineOf("job started", jobId);
    const end = await lineOf("job ended", jobId);
    // The ID in the line is the one cancelJob and node(id:) take, naming the job row itself.
    const [row] = await svc.ds.query(`SELECT id FROM jobs WHERE backup_id = $1`, [decodeId(backupId, "Backup", "backup")]);
    expect(decodeId(end.job, "Job", "job")).toBe(row.id);
    expect(lines.indexOf(start)).toBeLessThan(lines.indexOf(end));

    expect(start).toMatchObject({ level: "info", status: "RUNNING", ...described(job) });
    expect(start.durationMs).toBeUndefined();
    expect(end).toEqual({
      time: expect.any(String),
      level: "info",
      msg: "job ended",
      status: "SUCCEEDED",
      ...described(job),
      bytesDone: job.bytesDone,
      bytesTotal: job.bytesTotal,
      // The 2 MiB written, in 64 KiB blocks: the job's work.
      blocksVisited: 32,
      durationMs: Date.parse(job.finishedAt) - Date.parse(job.startedAt),
    });
  });

  it("a job cancelled before it ran ends with the code CANCELLED, at info", async () => {
    const disk = await createDisk(svc, "cancelled", 4 * MiB);
    const { jobId } = await queued(async () => {
      const made = await backup(svc, disk);
      await svc.ok(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: made.jobId });
      return made;
    });
    expect((await waitJob(svc, jobId)).status).toBe("CANCELLED");
    const job = await getJob(jobId);
    expect(await lineOf("job ended", jobId)).toMatchObject({
      level: "info",
      status: "CANCELLED",
      ...described(job),
      durationMs: Date.parse(job.finishedAt) - Date.parse(job.startedAt),
      error: { code: "CANCELLED", message: "the job was cancelled" },
    });
  });

  it("a job failing with a code logs the code and message as a warning", async () => {
    const { jobId, imageId } = await queued(
      () => uploadAndImport("gone"),
      (made) => svc.ds.query(`DELETE FROM uploads WHERE id = $1`, [made.uploadId]),
    );
    const job = await waitJob(svc, jobId);
    expect(job.error.code).toBe("UPLOAD_GONE");
    expect(await lineOf("job ended", jobId)).toMatchObject({
      ...described(await getJob(jobId)),
      level: "warn",
      status: "FAILED",
      type: "IMPORT_IMAGE",
      image: imageId,
      error: { code: "UPLOAD_GONE", message: job.error.message },
    });
  });

  it("a job failing unexpectedly logs the underlying error with its stack, and its end as an error", async () => {
    const { jobId } = await queued(
      () => uploadAndImport("broken"),
      () => svc.ds.query(`ALTER TABLE uploads RENAME TO uploads_hidden`),
    );
    try {
      expect((await waitJob(svc, jobId)).error.code).toBe("INTERNAL");
    } finally {
      await svc.ds.query(`ALTER TABLE uploads_hidden RENAME TO uploads`);
    }
    const job = await getJob(jobId);
    // The client reads no detail; the operator's line has it.
    expect(job.error.message).not.toMatch(/uploads/);
    const failed = await lineOf("job failed", jobId);
    expect(failed).toMatchObject({ level: "error", type: "IMPORT_IMAGE" });
    expect(failed.error.message).toMatch(/relation "uploads" does not exist/);
    expect(failed.error.stack).toMatch(/\n\s+at /);
    expect(await lineOf("job ended", jobId)).toMatchObject({ level: "error", status: "FAILED", ...described(job), error: { code: "INTERNAL", message: job.error.message } });
  });

  it("a job of a process that stopped is logged as it is failed INTERRUPTED, naming that process and the one that noticed", async () => {
    const disk = await createDisk(svc, "orphaned", 4 * MiB);
    const { jobId } = await queued(
      () => backup(svc, disk),
      (made) =>
        svc.ds.query(
          `UPDATE jobs SET status = 'RUNNING', attempts = 1, worker_id = 'elsewhere:4321:0a0b0c', started_at = now() - interval '5 minutes', heartbeat_at = now() - interval '1 hour' WHERE id = $1`,
          [decodeId(made.jobId, "Job", "job")],
        ),
    );
    const job = await waitJob(svc, jobId);
    expect(job.error.code).toBe("INTERRUPTED");
    const end = await lineOf("job ended", jobId);
    expect(end).toMatchObject({
      ...described(await getJob(jobId)),
      level: "warn",
      status: "FAILED",
      worker: "elsewhere:4321:0a0b0c",
      recoveredBy: svc.runner.workerId,
      error: { code: "INTERRUPTED", message: job.error.message },
    });
    expect(end.durationMs).toBeGreaterThanOrEqual(5 * 60_000);
    expect(lines.some((l) => l.msg === "job started" && l.job === jobId)).toBe(false);
  });
});

describe("request errors", () => {
  it("an unexpected GraphQL error is logged with the caller's project, the operation and the stack", async () => {
    await svc.ds.query(`ALTER TABLE servers RENAME TO servers_hidden`);
    let r;
    try {
      r = await svc.gql(`query ListServers { servers(first: 5) { nodes { id } } }`);
    } finally {
      await svc.ds.query(`ALTER TABLE servers_hidden RENAME TO servers`);
    }
    expect(r.errors?.[0]).toMatchObject({ message: "Internal server error", extensions: { code: "INTERNAL_SERVER_ERROR" } });
    const logged = lines.filter((l) => l.msg === "unexpected error in request");
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ level: "error", project: projectId, operation: "ListServers", path: ["servers"] });
    expect(logged[0].error.stack).toMatch(/relation "servers" does not exist/);
  });

  it("an unexpected error on the data plane is logged with the caller's project and the path it asked for", async () => {
    const disk = await createDisk(svc, "unreadable", MiB);
    await svc.ds.query(`ALTER TABLE disks RENAME TO disks_hidden`);
    let status;
    try {
      status = (await svc.http(`/v1/disks/${disk}/data`)).status;
    } finally {
      await svc.ds.query(`ALTER TABLE disks_hidden RENAME TO disks`);
    }
    expect(status).toBe(500);
    const logged = lines.filter((l) => l.msg === "unexpected error in HTTP request");
    expect(logged).toHaveLength(1);
    expect(logged[0]).toMatchObject({ level: "error", project: projectId, method: "GET", path: `/v1/disks/${disk}/data` });
    expect(logged[0].error.stack).toMatch(/relation "disks" does not exist/);
  });
});
