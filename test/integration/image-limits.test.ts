import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { bytes } from "../helpers/data";
import { qemuImg, tmpDir } from "../helpers/formats";
import { MiB, startTestService, type TestService } from "../helpers/service";
import { collectAllGarbage } from "../../src/jobs";
import { silentLogger } from "../../src/logger";
import { succeed, waitJob } from "../helpers/data";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ UPLOAD_MAX_BYTES: String(2 * MiB), EXPORT_TTL_SECONDS: "1", MAX_IMAGE_VIRTUAL_BYTES: String(64 * MiB) });
});
afterAll(async () => {
  await svc?.stop();
});

it("expires exports after EXPORT_TTL_SECONDS: garbage collection deletes the file", async () => {
  const up = (await (await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(MiB, 3)) })).json()) as { id: string };
  const imp = (await svc.ok(`mutation ($u: String!) { importImage(input: { name: "e", uploadId: $u }) { image { id } job { id } } }`, { u: up.id })).importImage;
  await succeed(svc, imp.job.id);
  const exp = (await svc.ok(`mutation ($i: ID!) { exportImage(input: { imageId: $i, format: RAW }) { export { id } job { id } } }`, { i: imp.image.id })).exportImage;
  await succeed(svc, exp.job.id);
  const url = `/v1/exports/${exp.export.id}/file`;
  expect((await svc.http(url)).status).toBe(200);
  await new Promise((r) => setTimeout(r, 1500));
  await collectAllGarbage(svc.ds, svc.storage, 3600_000, silentLogger);
  const after = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on ImageExport { status expiresAt } } }`, { id: exp.export.id })).node;
  expect(after.status).toBe("EXPIRED");
  expect((await svc.http(url)).status).toBe(409);
  expect(await svc.storage.uploads.blobs.stat(`exports/${svc.projectIds.alpha}/${Buffer.from(exp.export.id, "base64url").toString().split(":")[1]}`)).toBeNull();
});

// Last: refused uploads close their connection, which the client may not reuse.
it("answers 413 past the upload limit and keeps nothing of it", async () => {
  const declared = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(2 * MiB + 1, 1)) });
  expect(declared.status).toBe(413);
  // A body without a declared length is cut off as it passes the limit.
  const stream = new ReadableStream({
    start(c) {
      for (let i = 0; i < 3; i++) c.enqueue(new Uint8Array(bytes(MiB, i)));
      c.close();
    },
  });
  const chunked = await svc.http("/v1/uploads", { method: "POST", body: stream as unknown as RequestInit["body"] });
  expect(chunked.status).toBe(413);
  const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM uploads`);
  expect(n).toBe(0);
  const ok = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(2 * MiB, 2)) });
  expect(ok.status).toBe(201);
});

it("fails the import of a file describing a disk past MAX_IMAGE_VIRTUAL_BYTES TOO_LARGE, with the limit in the message", async () => {
  const q = qemuImg();
  if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
  // A small file describing a 128 MiB disk, past the 64 MiB limit.
  const t = tmpDir();
  let file: Buffer;
  try {
    execFileSync(q, ["create", "-q", "-f", "qcow2", path.join(t.dir, "big.qcow2"), "128M"]);
    file = fs.readFileSync(path.join(t.dir, "big.qcow2"));
  } finally {
    t.cleanup();
  }
  const res = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(file) });
  expect(res.status).toBe(201);
  const upload = (await res.json()) as { id: string };
  const r = await svc.ok(`mutation ($u: String!) { importImage(input: { name: "huge", uploadId: $u, type: DATA_DISK }) { image { id } job { id } } }`, { u: upload.id });
  const job = await waitJob(svc, r.importImage.job.id);
  expect(job).toMatchObject({ status: "FAILED", error: { code: "TOO_LARGE", message: expect.stringMatching(/MAX_IMAGE_VIRTUAL_BYTES, 67108864 bytes/) } });
  const image = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Image { status error { code } } } }`, { id: r.importImage.image.id })).node;
  expect(image).toEqual({ status: "KILLED", error: { code: "TOO_LARGE" } });
});
