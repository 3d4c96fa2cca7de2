"use strict";
/**
 * The CPU-heavy work of the data path: hashing, zstd compression and checked
 * decompression of 64 KiB chunks. Plain JavaScript, so worker threads load it
 * without the TypeScript loader; the pool in codec.ts runs these same functions
 * inline when it has no workers. Every operation takes one contiguous buffer and
 * returns fresh buffers, so both directions can be transferred without copies.
 */
const crypto = require("node:crypto");
const binding = require("zstd-napi/binding");

const sha256 = (b) => crypto.createHash("sha256").update(b).digest();

function isZero(b) {
  // Compare in 4 KiB steps against a zero page: memcmp speed, no allocation.
  for (let off = 0; off < b.length; off += ZERO_PAGE.length) {
    const end = Math.min(b.length, off + ZERO_PAGE.length);
    if (ZERO_PAGE.compare(b, off, end, 0, end - off) !== 0) return false;
  }
  return true;
}
const ZERO_PAGE = Buffer.alloc(4096);
const ZERO_RUN = Buffer.alloc(1024 * 1024);

/** Whether a zstd frame carries a content checksum (the Content_Checksum_flag of its header). */
function hasChecksum(frame) {
  return frame.length > 4 && frame.readUInt32LE(0) === 0xfd2fb528 && (frame[4] & 0x04) !== 0;
}

function makeOps(level) {
  const cctx = new binding.CCtx();
  cctx.setParameter(binding.CParameter.compressionLevel, level);
  // Every frame carries an XXH64 of its content, which decompression checks.
  cctx.setParameter(binding.CParameter.checksumFlag, 1);
  const dctx = new binding.DCtx();
  const hashers = new Map();

  return {
    /** SHA-256 of each `size`-byte block of `data`, and which blocks are all zeros (not hashed). */
    hash({ data, size }) {
      const n = Math.ceil(data.length / size);
      const hashes = Buffer.alloc(n * 32);
      const zero = new Uint8Array(n);
      for (let i = 0; i < n; i++) {
        const block = data.subarray(i * size, Math.min(data.length, (i + 1) * size));
        if (isZero(block)) zero[i] = 1;
        else sha256(block).copy(hashes, i * 32);
      }
      return { data, hashes, zero };
    },

    /**
     * Compresses the blocks `which` (all when absent) of `data` one by one into
     * `out` (given, or made), back to back, each as a zstd frame with a checksum.
     * Incompressible bytes cost a frame header and checksum (16 bytes); they stay
     * frames so every read can check them cheaply.
     */
    compress({ data, size, which, out: into }) {
      const picks = which ?? Array.from({ length: Math.ceil(data.length / size) }, (_, i) => i);
      const bound = binding.compressBound(size);
      const out = into && into.length >= picks.length * bound ? into : Buffer.allocUnsafe(picks.length * bound);
      const stored = new Uint32Array(picks.length);
      let pos = 0;
      for (let k = 0; k < picks.length; k++) {
        const raw = data.subarray(picks[k] * size, Math.min(data.length, (picks[k] + 1) * size));
        stored[k] = cctx.compress2(out.subarray(pos, pos + bound), raw);
        pos += stored[k];
      }
      return { data, out: out.subarray(0, pos), stored, compressed: new Uint8Array(picks.length).fill(1) };
    },

    /**
     * Turns stored chunks of `data` (at `offsets`, `stored` bytes each) back into
     * their raw bytes, back to back in `out` (given, or made), checking each: a
     * zstd frame with a checksum is checked by decompression itself (XXH64 of its
     * content); any other chunk, or every chunk when `sha256` is set, against its
     * SHA-256. Stops at the first bad chunk and names it.
     */
    decode({ data, offsets, stored, raw, compressed, hashes, out: into, sha256: always }) {
      let total = 0;
      for (let k = 0; k < raw.length; k++) total += raw[k];
      const out = into && into.length >= total ? into.subarray(0, total) : Buffer.allocUnsafe(total);
      let pos = 0;
      for (let k = 0; k < raw.length; k++) {
        const src = data.subarray(offsets[k], offsets[k] + stored[k]);
        const dst = out.subarray(pos, pos + raw[k]);
        if (src.length !== stored[k]) return { bad: k, problem: "truncated" };
        let checked = false;
        if (compressed[k]) {
          let n;
          try {
            n = dctx.decompress(dst, src);
          } catch {
            return { bad: k, problem: "undecompressable" };
          }
          if (n !== raw[k]) return { bad: k, problem: "length" };
          checked = hasChecksum(src);
        } else {
          if (stored[k] !== raw[k]) return { bad: k, problem: "length" };
          src.copy(dst);
        }
        if ((always || !checked) && !sha256(dst).equals(Buffer.from(hashes.buffer, hashes.byteOffset + k * 32, 32))) return { bad: k, problem: "hash" };
        pos += raw[k];
      }
      return { data, out };
    },

    /**
     * Feeds one sequential SHA-256 (named by `stream`): first `zeros` zero bytes, then
     * `data`; `done` finishes it and returns the digest.
     */
    digest({ stream, data, zeros, done }) {
      let h = hashers.get(stream);
      if (!h) hashers.set(stream, (h = crypto.createHash("sha256")));
      for (let left = zeros ?? 0; left > 0; left -= ZERO_RUN.length) h.update(left >= ZERO_RUN.length ? ZERO_RUN : ZERO_RUN.subarray(0, left));
      if (data) h.update(data);
      if (!done) return { data };
      hashers.delete(stream);
      return { data, digest: h.digest() };
    },
  };
}

module.exports = { makeOps, isZero };
