import { HASH_BYTES } from "../db/sql";

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

  /** Whether hash `k` equals the hash at byte `at` of `other`. */
  equalsAt(k: number, other: Uint8Array, at = 0): boolean {
    return this.buf.compare(other, at, at + HASH_BYTES, k * HASH_BYTES, (k + 1) * HASH_BYTES) === 0;
  }

  /** The hashes back to back, a view into the list (valid until the next push). */
  get bytes(): Buffer {
    return this.buf.subarray(0, this.length * HASH_BYTES);
  }
}

/**
 * A set of SHA-256 hashes kept in a HashList, with an open-addressing table over
 * the hashes' first bytes (already uniform): members cost 36 bytes each and no
 * object of their own. `list` holds them in the order they were added.
 */
export class HashSet {
  readonly list: HashList;
  /** Slot → 1 + the member's place in `list`; 0 is empty. */
  private table: Int32Array;

  constructor(capacity = 256) {
    this.list = new HashList(capacity);
    this.table = new Int32Array(tableSize(capacity));
  }

  get size(): number {
    return this.list.length;
  }

  /** Whether the hash at byte `at` of `hash` is a member. */
  has(hash: Uint8Array, at = 0): boolean {
    return this.table[this.slot(this.table, hash, at)] !== 0;
  }

  /** Adds the hash at byte `at` of `hash`; false when it was a member already. */
  add(hash: Uint8Array, at = 0): boolean {
    let slot = this.slot(this.table, hash, at);
    if (this.table[slot] !== 0) return false;
    if ((this.list.length + 1) * 2 > this.table.length) {
      this.grow();
      slot = this.slot(this.table, hash, at);
    }
    this.list.push(hash, at);
    this.table[slot] = this.list.length;
    return true;
  }

  /** The slot holding the hash, or the empty slot where it would go. */
  private slot(table: Int32Array, hash: Uint8Array, at: number): number {
    const mask = table.length - 1;
    let slot = (hash[at] | (hash[at + 1] << 8) | (hash[at + 2] << 16) | (hash[at + 3] << 24)) & mask;
    for (;;) {
      const member = table[slot];
      if (member === 0 || this.list.equalsAt(member - 1, hash, at)) return slot;
      slot = (slot + 1) & mask;
    }
  }

  private grow(): void {
    const table = new Int32Array(this.table.length * 2);
    const bytes = this.list.bytes;
    for (let k = 0; k < this.list.length; k++) table[this.slot(table, bytes, k * HASH_BYTES)] = k + 1;
    this.table = table;
  }
}

/** A power of two with room for `members` at half load. */
const tableSize = (members: number) => 2 ** Math.ceil(Math.log2(Math.max(16, members * 2)));
