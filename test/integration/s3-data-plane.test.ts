import fs from "node:fs";
import { backupNow, bytes, createDisk, readDisk, restoreNow, succeed, writeDisk } from "../helpers/data";
import { s3Env, startS3 } from "../helpers/s3";
import { MiB, startTestService, type TestService } from "../helpers/service";

/** The same data plane with disks and the vault in an S3-compatible store, and split across backends. */
describe.each([
  ["everything on S3", { VOLUME_BACKEND: "s3", VAULT_BACKEND: "s3" }],
  ["disks local, vault on S3", { VOLUME_BACKEND: "fs", VAULT_BACKEND: "s3" }],
])("%s", (_name, backends) => {
  let s3: Awaited<ReturnType<typeof startS3>>;
  let svc: TestService;
  beforeAll(async () => {
    s3 = await startS3();
    svc = await startTestService({
      ...s3Env(s3.config),
      ...backends,
    });
  });
  afterAll(async () => {
    await svc?.stop();
    await s3?.stop();
  });

  it("writes, backs up incrementally, verifies and restores byte for byte", async () => {
    const disk = await createDisk(svc, "s3disk", 8 * MiB);
    await writeDisk(svc, disk, bytes(5 * MiB, 1), 100_000);
    const first = await backupNow(svc, disk);
    const v1 = await readDisk(svc, disk);
    await writeDisk(svc, disk, bytes(200_000, 2), 3 * MiB);
    const second = await backupNow(svc, disk);
    const v2 = await readDisk(svc, disk);
    const verify = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: second })).verifyBackup.job.id;
    await succeed(svc, verify);
    await restoreNow(svc, { backupId: first });
    expect((await readDisk(svc, disk)).equals(v1)).toBe(true);
    await restoreNow(svc, { backupId: second });
    expect((await readDisk(svc, disk)).equals(v2)).toBe(true);
    // Nothing was written to the local blob folder for the parts on S3.
    const local = (p: string) => fs.existsSync(`${svc.dataDir}/blobs/${p}`);
    expect(local("vault")).toBe(false);
    expect(local("volumes")).toBe(backends.VOLUME_BACKEND === "fs");
  });
});
