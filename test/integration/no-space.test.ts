import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { bytes, createDisk, succeed, waitJob, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

/**
 * A full file system: the service's data directory on a small tmpfs. Jobs that
 * run out of space fail NO_SPACE, leave nothing half made and nothing marked
 * available, and the same work succeeds once space is free, with no operator.
 */

let mount: string | null = null;
let svc: TestService | null = null;

/** A 128 MiB tmpfs, or null where this process may not mount one. */
function smallFileSystem(): string | null {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-full-"));
  try {
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=128m", "tmpfs", dir], { stdio: "pipe" });
    return dir;
  } catch (err) {
    fs.rmdirSync(dir);
    if (process.env.STOWAGE_SKIP_EXTERNAL === "1") return null;
    throw new Error(`this test mounts a small tmpfs and needs root (or CAP_SYS_ADMIN); run it as root, or set STOWAGE_SKIP_EXTERNAL=1 to skip it on purpose: ${(err as Error).message}`, {
      cause: err,
    });
  }
}

beforeAll(async () => {
  mount = smallFileSystem();
  if (mount) svc = await startTestService({ STOWAGE_DATA_DIR: mount, MIN_FREE_BYTES: "0", CODEC_THREADS: "1" });
});
afterAll(async () => {
  await svc?.stop().catch(() => undefined);
  if (mount) {
    execFileSync("umount", [mount]);
    fs.rmdirSync(mount);
  }
});

const used = () => {
  const s = fs.statfsSync(mount!);
  return (s.blocks - s.bfree) * s.bsize;
};

it("fails jobs that run out of space NO_SPACE, keeps nothing of them, and does the same work once space is free", async () => {
  if (!svc) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
  // Something else fills most of the file system; a 20 MiB disk and a 40 MiB upload take the rest.
  const ballast = path.join(mount!, "ballast");
  fs.writeFileSync(ballast, bytes(64 * MiB, 3));
  const disk = await createDisk(svc, "filler", 64 * MiB);
  await writeDisk(svc, disk, bytes(20 * MiB, 1));
  const res = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(40 * MiB, 2)) });
  expect(res.status).toBe(201);
  const upload = (await res.json()) as { id: string };
  const before = used();

  const importIt = async (name: string) =>
    (await svc!.ok(`mutation ($u: String!, $n: String!) { importImage(input: { name: $n, uploadId: $u, type: DATA_DISK }) { image { id } job { id } } }`, { u: upload.id, n: name })).importImage;
  const imageOf = async (id: string) => (await svc!.ok(`query ($id: ID!) { node(id: $id) { ... on Image { status virtualSizeBytes error { code message } } } }`, { id })).node;
  const backupIt = async () => (await svc!.ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: disk })).createBackup;
  const backupStatus = async (id: string) => (await svc!.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status } } }`, { id })).node.status;

  const imp = await importIt("too-big");
  const failed = await waitJob(svc, imp.job.id);
  expect(failed).toMatchObject({ status: "FAILED", error: { code: "NO_SPACE" } });
  // No path, no errno: a message for people.
  expect(failed.error.message).not.toMatch(/\/|ENOSPC|stowage-full/);
  expect(await imageOf(imp.image.id)).toMatchObject({ status: "KILLED", error: { code: "NO_SPACE" } });
  // What the job had written of its packs is gone again.
  expect(used()).toBeLessThanOrEqual(before + MiB);

  const b = await backupIt();
  expect(await waitJob(svc, b.job.id)).toMatchObject({ status: "FAILED", error: { code: "NO_SPACE" } });
  expect(await backupStatus(b.backup.id)).toBe("ERROR");
  expect(used()).toBeLessThanOrEqual(before + MiB);

  // Space is freed outside the service; the same work then succeeds, with no restart.
  fs.rmSync(ballast);
  const again = await importIt("fits-now");
  await succeed(svc, again.job.id);
  expect(await imageOf(again.image.id)).toEqual({ status: "ACTIVE", virtualSizeBytes: 40 * MiB, error: null });
  const b2 = await backupIt();
  await succeed(svc, b2.job.id);
  expect(await backupStatus(b2.backup.id)).toBe("AVAILABLE");
});
