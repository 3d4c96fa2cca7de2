import { execFile } from "node:child_process";
import path from "node:path";
import { promisify } from "node:util";
import { freePort } from "../../bench/lib/proc";
import { backupNow, bytes, createDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { tmpDir } from "../helpers/formats";
import { MiB, startTestService, type TestService } from "../helpers/service";
import { bootWithNbd, prepareLinux, writeFileScript, type LinuxVm } from "../helpers/tiny-linux";

/**
 * A real Linux on a Stowage disk: qemu-system-x86_64 boots the Debian cloud kernel
 * with the disk as its only drive over NBD, makes a file system, writes a file, syncs
 * and powers off. The disk is then backed up, the backup restored to a new disk, and
 * the file read back from that disk's bytes (over NBD) with debugfs.
 */

jest.setTimeout(240_000);

const run = promisify(execFile);
const CONTENT = bytes(300 * 1024, 21);

let svc: TestService;
let vm: LinuxVm | null;
let work: { dir: string; cleanup(): void };
const nbdcopy = requireProgram(["/usr/bin/nbdcopy"], "libnbd-bin");
const debugfs = requireProgram(["/usr/sbin/debugfs", "/sbin/debugfs"], "e2fsprogs");

beforeAll(async () => {
  vm = prepareLinux();
  work = tmpDir("stowage-nbd-linux-");
  svc = await startTestService({ NBD_PORT: String(await freePort()) });
});
afterAll(async () => {
  await svc?.stop();
  vm?.cleanup();
  work?.cleanup();
});

const EXPORT = `mutation ($id: ID!, $ro: Boolean) { createNbdExport(input: { resourceId: $id, readOnly: $ro }) { nbdExport { uri } } }`;

test("a Linux guest writes a file to its Stowage disk; the file comes back from a restore of the disk's backup", async () => {
  if (!vm || !nbdcopy || !debugfs) return;
  const disk = await createDisk(svc, "root", 64 * MiB);
  const { uri } = (await svc.ok(EXPORT, { id: disk, ro: false })).createNbdExport.nbdExport;
  const console = await bootWithNbd(vm, uri, writeFileScript(CONTENT), { timeoutMs: 180_000 });
  expect(console).toContain("wrote the file");

  const backupId = await backupNow(svc, disk);
  // A disk from the backup, usable at once (its blocks read from the vault).
  const restored = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "restored", backupId: $b }) { disk { id } } }`, { b: backupId })).createDisk;
  const copy = (await svc.ok(EXPORT, { id: restored.disk.id, ro: true })).createNbdExport.nbdExport.uri;
  const raw = path.join(work.dir, "restored.raw");
  await run(nbdcopy, [copy, raw]);
  const { stdout } = await run(debugfs, ["-R", "cat /file", raw], { encoding: "buffer", maxBuffer: 16 << 20 });
  expect(stdout.length).toBe(CONTENT.length);
  expect(stdout.equals(CONTENT)).toBe(true);
});
