/** SHA-256 hashes are 32 bytes. */
export const HASH_BYTES = 32;

/**
 * SHA-256 hashes back to back in one growing buffer: a list of thousands of
 * hashes costs one allocation now and then instead of an object per hash, and
 * `bytes` goes to Postgres as it is (see packedHashes).
 */
export class HashList {
  private buf: Buffer;
  length = 0;

  constructor(capacity = 256) {
    this.buf = Buffer.allocUnsafeSlow(Math.max(1, capacity) * HASH_BYTES);
  }

  /** Appends the hash at byte `at` of `from`. */
  push(from: Uint8Array, at = 0): void {
    if ((this.length + 1) * HASH_BYTES > this.buf.length) {
      const grown = Buffer.allocUnsafeSlow(this.buf.length * 2);
      this.buf.copy(grown, 0, 0, this.length * HASH_BYTES);
      this.buf = grown;
    }
    this.buf.set(from.subarray(at, at + HASH_BYTES), this.length * HASH_BYTES);
    this.length++;
  }

  /** Hash `k`, a view into the list (valid until the next push). */
  at(k: number): Buffer {
    return this.buf.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES);
  }

  /** The hashes back to back, a view into the list (valid until the next push). */
  get bytes(): Buffer {
    return this.buf.subarray(0, this.length * HASH_BYTES);
  }
}
