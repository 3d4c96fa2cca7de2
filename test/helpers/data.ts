import crypto from "node:crypto";
import type { TestService } from "./service";

export const KiB = 1024;
export const BLOCK = 64 * KiB;

/** Deterministic pseudo-random bytes (an AES-CTR keystream of the seed), so failures reproduce. */
export function bytes(n: number, seed = 1): Buffer {
  const key = crypto.createHash("sha256").update(`seed:${seed}`).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
}

export async function putDisk(svc: TestService, diskId: string, data: Buffer, offset = 0, key?: string): Promise<Response> {
  const headers: Record<string, string> = { "content-type": "application/octet-stream" };
  if (offset !== 0 || data.length === 0) headers["content-range"] = `bytes ${offset}-${offset + data.length - 1}/*`;
  return svc.http(`/v1/disks/${diskId}/data`, { method: "PUT", body: new Uint8Array(data), headers, key });
}

export async function writeDisk(svc: TestService, diskId: string, data: Buffer, offset = 0): Promise<void> {
  const res = await putDisk(svc, diskId, data, offset);
  if (res.status !== 200) throw new Error(`PUT failed: ${res.status} ${await res.text()}`);
}

export async function readDisk(svc: TestService, diskId: string, range?: [number, number]): Promise<Buffer> {
  const res = await svc.http(`/v1/disks/${diskId}/data`, range ? { headers: { range: `bytes=${range[0]}-${range[1]}` } } : {});
  if (res.status !== 200 && res.status !== 206) throw new Error(`GET failed: ${res.status} ${await res.text()}`);
  return Buffer.from(await res.arrayBuffer());
}

export const sha = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");

const JOB = `query ($id: ID!) { node(id: $id) { ... on Job { id type status progress bytesDone bytesTotal error { code message } } } }`;

/** Waits for a job to end and returns it. */
export async function waitJob(svc: TestService, jobId: string, timeoutMs = 60_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = (await svc.ok(JOB, { id: jobId })).node;
    if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(job.status)) return job;
    if (Date.now() > deadline) throw new Error(`job ${jobId} still ${job.status} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function succeed(svc: TestService, jobId: string): Promise<any> {
  const job = await waitJob(svc, jobId);
  if (job.status !== "SUCCEEDED") throw new Error(`job ${job.type} ended ${job.status}: ${JSON.stringify(job.error)}`);
  return job;
}

export async function createDisk(svc: TestService, name: string, sizeBytes: number): Promise<string> {
  return (await svc.ok(`mutation ($n: String!, $s: SafeInt!) { createDisk(input: { name: $n, sizeBytes: $s }) { disk { id } } }`, { n: name, s: sizeBytes })).createDisk.disk.id;
}

export async function backup(svc: TestService, resourceId: string, name?: string): Promise<{ backupId: string; jobId: string }> {
  const r = (await svc.ok(`mutation ($r: ID!, $n: String) { createBackup(input: { resourceId: $r, name: $n }) { backup { id status } job { id } } }`, { r: resourceId, n: name })).createBackup;
  return { backupId: r.backup.id, jobId: r.job.id };
}

export async function backupNow(svc: TestService, resourceId: string, name?: string): Promise<string> {
  const { backupId, jobId } = await backup(svc, resourceId, name);
  await succeed(svc, jobId);
  return backupId;
}

export async function restoreNow(svc: TestService, input: Record<string, unknown>): Promise<any> {
  const r = (await svc.ok(`mutation ($i: RestoreBackupInput!) { restoreBackup(input: $i) { job { id } } }`, { i: input })).restoreBackup;
  return succeed(svc, r.job.id);
}
