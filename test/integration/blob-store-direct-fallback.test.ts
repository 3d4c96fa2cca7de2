import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { FsBlobStore } from "../../src/storage/fs-blob-store";
import { bytes, sha } from "../helpers/data";

/*
 * Direct writes where the file system refuses them midway, and staging windows
 * when opening a writer fails.
 */

const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function isDirect(fd: number): boolean {
  const flags = parseInt(/^flags:\s*([0-7]+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))![1], 8);
  return (flags & fs.constants.O_DIRECT) !== 0;
}

/** Whether each temporary file open under `dir` was opened with O_DIRECT. */
function openTemporaries(dir: string): boolean[] {
  const out: boolean[] = [];
  for (const fd of fs.readdirSync("/proc/self/fd")) {
    try {
      const file = fs.readlinkSync(`/proc/self/fd/${fd}`);
      if (file.startsWith(dir + path.sep) && path.basename(file).startsWith(".tmp-")) out.push(isDirect(Number(fd)));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

describe("filesystem blob store, direct writes refused midway", () => {
  let dir: string;
  let store: FsBlobStore;
  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-direct-fallback-"));
    store = new FsBlobStore(dir);
    // The first bypassCache writer finds the staging windows.
    const w = await store.openWriter("warm/up", { bypassCache: true });
    await w.close();
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("keeps every byte in its place when the file system refuses direct writes (EINVAL) after the blob was opened", async () => {
    // What a file system that opens with O_DIRECT but refuses the writes does: every
    // write on an O_DIRECT descriptor fails with EINVAL (the probe already ran).
    const fh = await fs.promises.open(path.join(dir, "warm/up"), "r");
    const proto = Object.getPrototypeOf(fh) as { write: (...args: unknown[]) => Promise<unknown> };
    await fh.close();
    const write = proto.write;
    proto.write = function (this: fs.promises.FileHandle, ...args: unknown[]) {
      if (isDirect(this.fd)) return Promise.reject(Object.assign(new Error("EINVAL: invalid argument, write"), { code: "EINVAL" }));
      return write.apply(this, args);
    };
    try {
      const a = bytes(4 * MiB, 1); // fills the first window: its write is refused and falls back
      const b = bytes(MiB, 2); // goes into the second window before the fallback is known
      const c = bytes(MiB, 3); // goes through the ordinary descriptor
      const w = await store.openWriter("refused/blob", { bypassCache: true });
      expect(openTemporaries(path.join(dir, "refused"))).toEqual([true]);
      await w.write(a);
      await w.write(b);
      await sleep(100);
      await w.write(c);
      expect(await w.close()).toBe(6 * MiB);
      const back = await store.get("refused/blob");
      expect(back.subarray(0, 4 * MiB).equals(a)).toBe(true);
      expect(back.subarray(4 * MiB, 5 * MiB).equals(b)).toBe(true); // fails: zeros
      expect(back.subarray(5 * MiB).equals(c)).toBe(true); // fails: b's bytes
      expect(sha(back)).toBe(sha(Buffer.concat([a, b, c])));
    } finally {
      proto.write = write;
    }
  });

  it("gives the staging windows back when opening a writer fails", async () => {
    await store.put("file", Buffer.from("a blob where a folder would go"));
    for (let i = 0; i < 4; i++) await expect(store.openWriter("file/below", { bypassCache: true })).rejects.toThrow();
    const w = await store.openWriter("later/blob", { bypassCache: true });
    try {
      expect(openTemporaries(path.join(dir, "later"))).toEqual([true]); // fails: [false], all 8 windows were lost
    } finally {
      await w.abort();
    }
  });
});
