import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { S3Config } from "../../src/config";

/** A local S3-protocol server (s3rver) with one bucket, for the S3 backend's tests. */
export async function startS3(bucket = "stowage-test"): Promise<{ config: S3Config; stop(): Promise<void> }> {
  const S3rver = require("s3rver");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-s3-"));
  const server = new S3rver({ port: 0, address: "127.0.0.1", silent: true, directory: dir, configureBuckets: [{ name: bucket }] });
  const { port } = await server.run();
  return {
    config: { bucket, endpoint: `http://127.0.0.1:${port}`, region: "us-east-1", accessKeyId: "S3RVER", secretAccessKey: "S3RVER", forcePathStyle: true },
    async stop() {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The service's environment for the store `startS3` gave. */
export function s3Env(c: S3Config): Record<string, string> {
  return { S3_BUCKET: c.bucket, S3_ENDPOINT: c.endpoint!, S3_REGION: c.region, S3_ACCESS_KEY_ID: c.accessKeyId!, S3_SECRET_ACCESS_KEY: c.secretAccessKey!, S3_FORCE_PATH_STYLE: "true" };
}
