import { execFileSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
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

/** One request on `agent`: the status, the answer's Connection header and whether it went out on a socket the agent had used before. */
function send(agent: http.Agent, method: string, pathname: string, body?: Buffer): Promise<{ status: number; connection: string | undefined; reused: boolean }> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${svc.url}${pathname}`, { method, agent, headers: { authorization: `Bearer ${svc.keys.alpha}`, ...(body ? { "content-length": String(body.length) } : {}) } }, (res) => {
      res.resume();
      res.on("end", () => resolve({ status: res.statusCode!, connection: res.headers.connection, reused: req.reusedSocket }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

it("keeps a keep-alive connection usable after refusing an upload 413: the next request on the same socket is answered", async () => {
  const uploads = async () => (await svc.ds.query(`SELECT count(*)::int AS n FROM uploads`))[0].n as number;
  const before = await uploads();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    const refused = await send(agent, "POST", "/v1/uploads", bytes(2 * MiB + 1, 4));
    expect(refused).toMatchObject({ status: 413, reused: false });
    expect(refused.connection).not.toBe("close");
    const next = await send(agent, "GET", "/healthz");
    expect(next).toEqual({ status: 200, connection: "keep-alive", reused: true });
  } finally {
    agent.destroy();
  }
  expect(await uploads()).toBe(before);
});

it("answers an upload too large to read through with Connection: close, and the client reads the 413 in full before the connection ends", async () => {
  const sock = net.connect(Number(new URL(svc.url).port), "127.0.0.1");
  const received: Buffer[] = [];
  let error: string | null = null;
  const closed = new Promise<string>((resolve) => {
    sock.on("data", (d) => received.push(d));
    sock.on("error", (err: NodeJS.ErrnoException) => (error = err.code ?? err.message));
    sock.on("close", () => resolve(Buffer.concat(received).toString("latin1")));
  });
  sock.write(`POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${svc.keys.alpha}\r\nContent-Length: ${1024 * MiB}\r\n\r\n`);
  // More than the socket buffers hold: the client is still sending when the answer comes.
  for (let i = 0; i < 32; i++) sock.write(Buffer.alloc(MiB));
  // The service half-closes after its answer and takes in the rest until the client closes too: no reset.
  const text = await closed;
  expect(error).toBeNull();
  const [head, body] = text.split("\r\n\r\n");
  expect(head).toMatch(/^HTTP\/1\.1 413 /);
  expect(head).toMatch(/\r\nConnection: close\r\n/i);
  expect(JSON.parse(body)).toEqual({ error: { code: "BAD_USER_INPUT", message: `the file is larger than the ${2 * MiB}-byte upload limit` } });
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
