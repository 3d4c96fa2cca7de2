import { once } from "node:events";
import { PassThrough, Transform, type Readable } from "node:stream";
import { DeleteObjectCommand, GetObjectCommand, HeadObjectCommand, ListObjectsV2Command, NoSuchKey, NotFound, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { Upload } from "@aws-sdk/lib-storage";
import type { S3Config } from "../config";
import { BlobNotFoundError, checkKey, checkPrefix, type BlobInfo, type BlobStore, type BlobWriter } from "./blob-store";

/**
 * Blobs as objects in one S3 bucket (any S3-compatible store), under an optional
 * key prefix. An object appears whole when its PUT or multipart upload completes.
 */
const ZEROS = Buffer.alloc(1024 * 1024);

export class S3BlobStore implements BlobStore {
  readonly name = "s3";
  private readonly client: S3Client;

  constructor(
    private readonly config: S3Config,
    private readonly prefix = "",
  ) {
    this.client = new S3Client({
      region: config.region,
      endpoint: config.endpoint,
      forcePathStyle: config.forcePathStyle,
      credentials: config.accessKeyId && config.secretAccessKey ? { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey } : undefined,
    });
  }

  private key(key: string): string {
    return this.prefix + checkKey(key);
  }

  async put(key: string, data: Buffer | Buffer[]): Promise<void> {
    const body = Array.isArray(data) ? Buffer.concat(data) : data;
    await this.client.send(new PutObjectCommand({ Bucket: this.config.bucket, Key: this.key(key), Body: body, ContentLength: body.length }));
  }

  async putStream(key: string, body: Readable): Promise<number> {
    let size = 0;
    const counted = body.pipe(
      new Transform({
        transform(chunk: Buffer, _enc, cb) {
          size += chunk.length;
          cb(null, chunk);
        },
      }),
    );
    body.on("error", (err) => counted.destroy(err));
    const upload = new Upload({
      client: this.client,
      params: { Bucket: this.config.bucket, Key: this.key(key), Body: counted },
      partSize: 8 * 1024 * 1024,
      queueSize: 2,
    });
    await upload.done();
    return size;
  }

  /** A multipart upload fed through a stream; each write is copied, so its buffer is free at once. */
  async openWriter(key: string): Promise<BlobWriter> {
    const body = new PassThrough({ highWaterMark: 8 * 1024 * 1024 });
    const done = this.putStream(key, body);
    done.catch(() => undefined); // awaited by close or abort
    const write = async (data: Buffer | Buffer[]) => {
      if (!body.write(Buffer.concat(Array.isArray(data) ? data : [data]))) await Promise.race([once(body, "drain"), done]);
    };
    return {
      write,
      async skip(bytes) {
        // An object has no holes: the zeros are sent, a MiB at a time.
        for (let left = bytes; left > 0; left -= ZEROS.length) await write(left >= ZEROS.length ? ZEROS : ZEROS.subarray(0, left));
      },
      async close() {
        body.end();
        return done;
      },
      async abort() {
        body.destroy(new Error("aborted"));
        await done.catch(() => undefined);
      },
    };
  }

  async get(key: string): Promise<Buffer> {
    const out = await this.send(key, new GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(key) }));
    return Buffer.from(await out.Body!.transformToByteArray());
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const out = await this.send(key, new GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(key), Range: `bytes=${offset}-${offset + length - 1}` }));
    const buf = Buffer.from(await out.Body!.transformToByteArray());
    if (buf.length !== length) throw new Error(`blob ${key} is shorter than ${offset + length} bytes`);
    return buf;
  }

  async readInto(key: string, offset: number, into: Buffer): Promise<void> {
    (await this.getRange(key, offset, into.length)).copy(into);
  }

  async getStream(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const out = await this.send(key, new GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(key), Range: range ? `bytes=${range.start}-${range.end}` : undefined }));
    return out.Body as Readable;
  }

  async stat(key: string): Promise<BlobInfo | null> {
    try {
      const out = await this.client.send(new HeadObjectCommand({ Bucket: this.config.bucket, Key: this.key(key) }));
      return { key, size: Number(out.ContentLength ?? 0), modifiedAt: out.LastModified ?? new Date(0) };
    } catch (err) {
      if (isNotFound(err)) return null;
      throw err;
    }
  }

  async delete(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.config.bucket, Key: this.key(key) }));
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    let token: string | undefined;
    do {
      const out = await this.client.send(new ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: this.prefix + checkPrefix(prefix), ContinuationToken: token }));
      for (const o of out.Contents ?? []) {
        yield { key: o.Key!.slice(this.prefix.length), size: Number(o.Size ?? 0), modifiedAt: o.LastModified ?? new Date(0) };
      }
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token);
  }

  private async send(key: string, cmd: GetObjectCommand) {
    try {
      return await this.client.send(cmd);
    } catch (err) {
      if (isNotFound(err)) throw new BlobNotFoundError(key);
      throw err;
    }
  }

  destroy(): void {
    this.client.destroy();
  }
}

function isNotFound(err: unknown): boolean {
  return (
    err instanceof NoSuchKey || err instanceof NotFound || (err as { name?: string }).name === "NoSuchKey" || (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404
  );
}
