import { execFile, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { bytes } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { tmpDir } from "../helpers/formats";
import { freePort } from "../../bench/lib/proc";
import { bootWithNbd, prepareLinux, writeFileScript, type LinuxVm } from "../helpers/tiny-linux";

/**
 * The tiny-Linux helper on its own, against nbdkit's memory plugin instead of Stowage:
 * a real kernel makes an ext2 file system on its NBD disk and writes a file, and the
 * file is read back from the disk's bytes outside the VM with debugfs.
 */

jest.setTimeout(180_000);

const run = promisify(execFile);
/** 100 KiB of pseudo-random bytes: every byte value, so the path through base64, ext2 and NBD must be byte-exact. */
const CONTENT = bytes(100 * 1024, 7);

let vm: LinuxVm | null;
let work: { dir: string; cleanup(): void };
let tools: { nbdkit: string; nbdcopy: string; debugfs: string } | null;
let nbd: { uri: string; stop(): Promise<void> } | undefined;

beforeAll(async () => {
  work = tmpDir("stowage-tiny-linux-");
  const nbdkit = requireProgram(["/usr/bin/nbdkit", "/usr/sbin/nbdkit"], "nbdkit");
  const nbdcopy = requireProgram(["/usr/bin/nbdcopy"], "libnbd-bin");
  const debugfs = requireProgram(["/usr/sbin/debugfs", "/sbin/debugfs"], "e2fsprogs");
  vm = prepareLinux();
  tools = nbdkit && nbdcopy && debugfs ? { nbdkit, nbdcopy, debugfs } : null;
  if (vm && tools) nbd = await startNbdkit(tools.nbdkit, work.dir);
});
afterAll(async () => {
  await nbd?.stop();
  vm?.cleanup();
  work?.cleanup();
});

/** `nbdkit memory 64M` on 127.0.0.1; ready once it wrote its pid file, which it does when it accepts connections. */
async function startNbdkit(nbdkit: string, dir: string): Promise<{ uri: string; stop(): Promise<void> }> {
  const port = await freePort();
  const pidFile = path.join(dir, "nbdkit.pid");
  const child: ChildProcess = spawn(nbdkit, ["--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", String(port), "-P", pidFile, "memory", "64M"], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exit = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exit;
  };
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(pidFile)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`nbdkit did not start: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { uri: `nbd://127.0.0.1:${port}/`, stop };
}

test("a real Linux makes a file system on an NBD disk, and debugfs reads its file back from the disk's bytes", async () => {
  if (!vm || !tools || !nbd) return;
  const text = await bootWithNbd(vm, nbd.uri, writeFileScript(CONTENT), { timeoutMs: 120_000 });
  expect(text).toContain("wrote the file");

  const raw = path.join(work.dir, "disk.raw");
  await run(tools.nbdcopy, [nbd.uri, raw]);
  const { stdout } = await run(tools.debugfs, ["-R", "cat /file", raw], { encoding: "buffer", maxBuffer: 16 << 20 });
  expect(stdout.length).toBe(CONTENT.length);
  expect(stdout.equals(CONTENT)).toBe(true);
});

test("a failing script rejects with its exit status and the console's tail", async () => {
  if (!vm || !tools || !nbd) return;
  await expect(bootWithNbd(vm, nbd.uri, "echo about to fail\nexit 3\n")).rejects.toThrow(/exited with 3[^]*about to fail/);
});

test("a VM that does not power off in time is killed, and the boot rejects", async () => {
  if (!vm || !tools || !nbd) return;
  await expect(bootWithNbd(vm, nbd.uri, "sleep 600\n", { timeoutMs: 1_000 })).rejects.toThrow(/did not power off within 1000 ms/);
});
