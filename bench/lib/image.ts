import crypto from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";

/**
 * The benchmark's disk image: deterministic (seeded), generated streaming.
 * The image is cut into regions of 1-8 MiB (64 KiB aligned); each region is one of
 * zeros (never written: a hole in a sparse file), random bytes (incompressible) or
 * English-like text (compressible), about a third of the image each.
 */

export const BLOCK = 64 * 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export type RegionKind = "zero" | "random" | "text";

export interface Region {
  kind: RegionKind;
  start: number;
  length: number;
}

/** mulberry32: a small, fast, seeded 32-bit PRNG; returns floats in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A deterministic stream of random bytes: AES-128-CTR over zeros, keyed by `label`. */
export function randomBytes(label: string, length: number): Buffer {
  const key = crypto.createHash("sha256").update(`key:${label}`).digest().subarray(0, 16);
  const iv = crypto.createHash("sha256").update(`iv:${label}`).digest().subarray(0, 16);
  const c = crypto.createCipheriv("aes-128-ctr", key, iv);
  return Buffer.concat([c.update(Buffer.alloc(length)), c.final()]);
}

export function layout(size: number, seed: number): Region[] {
  const rnd = prng(seed);
  const regions: Region[] = [];
  const target = size / 3;
  const totals: Record<RegionKind, number> = { zero: 0, random: 0, text: 0 };
  const kinds: RegionKind[] = ["zero", "random", "text"];
  let pos = 0;
  while (pos < size) {
    const blocks = 16 + Math.floor(rnd() * (128 - 16 + 1)); // 1-8 MiB
    const length = Math.min(blocks * BLOCK, size - pos);
    // Any kind still below its third; when all are (or none is), any kind.
    let open = kinds.filter((k) => totals[k] + length <= target + 4 * MiB);
    if (!open.length) open = kinds;
    const kind = open[Math.floor(rnd() * open.length)];
    totals[kind] += length;
    const last = regions[regions.length - 1];
    if (last && last.kind === kind) last.length += length;
    else regions.push({ kind, start: pos, length });
    pos += length;
  }
  return regions;
}

/** English-like text: words of a seeded vocabulary, Zipf-like frequencies, sentences and lines. */
export class TextGenerator {
  /** All words' bytes back to back, with where each starts and ends. */
  private readonly flat: Uint8Array;
  private readonly starts: Uint32Array;
  private readonly ends: Uint32Array;
  /** 16 random bits to a word index, frequent words first (about u^3). */
  private readonly zipf = new Uint16Array(65536);
  private state: number;
  private column = 0;
  private sentence = 0;

  constructor(seed: number) {
    const r = prng(seed ^ 0x5eed);
    const onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "st", "th", "ch", "sh", "pr", "tr", "br", "cl", "gr"];
    const vowels = ["a", "e", "i", "o", "u", "ea", "ou", "io", "ai", "ee"];
    const codas = ["", "", "n", "r", "s", "t", "nd", "ng", "ll", "st", "ck", "rt", "ts", "m"];
    const common =
      "the of and to in is it that for was on are as with his they at be this from have or by one had not but what all were when we there can an your which their said if do will each about how up out them then she many some so these would other into has more her two like him see time could no make than first been its who now people my made over did down only way find use may water long little very after words called just where most know".split(
        " ",
      );
    const words = [...common];
    const seen = new Set(common);
    while (words.length < 6000) {
      let w = "";
      const syllables = 1 + Math.floor(r() * r() * 4);
      for (let s = 0; s < syllables; s++) w += onsets[Math.floor(r() * onsets.length)] + vowels[Math.floor(r() * vowels.length)] + codas[Math.floor(r() * codas.length)];
      if (seen.has(w)) continue;
      seen.add(w);
      words.push(w);
    }
    this.flat = new TextEncoder().encode(words.join(""));
    this.starts = new Uint32Array(words.length);
    this.ends = new Uint32Array(words.length);
    let pos = 0;
    words.forEach((w, i) => {
      this.starts[i] = pos;
      pos += w.length;
      this.ends[i] = pos;
    });
    for (let u = 0; u < 65536; u++) this.zipf[u] = Math.min(words.length - 1, Math.floor(words.length * (u / 65536) ** 3));
    this.state = (seed * 2654435761) >>> 0 || 1;
  }

  /** Fills `buf` with the next bytes of text. */
  fill(buf: Buffer): void {
    const { flat, starts, ends, zipf } = this;
    let x = this.state;
    let column = this.column;
    let sentence = this.sentence;
    const len = buf.length;
    let i = 0;
    while (i < len) {
      // xorshift32
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      const w = zipf[x >>> 16];
      const from = starts[w];
      const to = ends[w];
      if (i < len) {
        const c = flat[from];
        buf[i++] = sentence === 0 && c >= 97 && c <= 122 ? c - 32 : c;
      }
      for (let k = from + 1; k < to && i < len; k++) buf[i++] = flat[k];
      column += to - from + 1;
      sentence++;
      if (i >= len) break;
      if (sentence > 4 && (x & 0xff) < 31) {
        buf[i++] = (x & 0x700) === 0 ? 63 : 46; // ? or .
        sentence = 0;
        if (i >= len) break;
      } else if (((x >>> 8) & 0xf) === 0) {
        buf[i++] = 44; // ,
        if (i >= len) break;
      }
      if (column > 60 + ((x >>> 12) & 0xf)) {
        buf[i++] = 10;
        column = 0;
      } else buf[i++] = 32;
    }
    this.state = x;
    this.column = column;
    this.sentence = sentence;
  }
}

/**
 * Writes the image to `file` (a sparse file: zero regions are holes) and returns
 * its SHA-256. Memory stays at one 1 MiB buffer.
 */
export async function writeImage(file: string, size: number, regions: Region[], seed: number): Promise<string> {
  const hash = crypto.createHash("sha256");
  const fh = await fsp.open(file, "w", 0o644);
  try {
    await fh.truncate(size);
    const text = new TextGenerator(seed);
    const zero = Buffer.alloc(MiB);
    for (const [r, region] of regions.entries()) {
      if (region.kind === "zero") {
        for (let off = 0; off < region.length; off += MiB) hash.update(zero.subarray(0, Math.min(MiB, region.length - off)));
        continue;
      }
      let off = 0;
      // One keystream per region, taken 1 MiB at a time.
      const cipher =
        region.kind === "random"
          ? crypto.createCipheriv(
              "aes-128-ctr",
              crypto.createHash("sha256").update(`region-key:${seed}:${r}`).digest().subarray(0, 16),
              crypto.createHash("sha256").update(`region-iv:${seed}:${r}`).digest().subarray(0, 16),
            )
          : null;
      while (off < region.length) {
        const n = Math.min(MiB, region.length - off);
        let buf: Buffer;
        if (cipher) buf = cipher.update(zero.subarray(0, n));
        else {
          buf = Buffer.allocUnsafe(n);
          text.fill(buf);
        }
        hash.update(buf);
        let done = 0;
        while (done < n) done += (await fh.write(buf, done, n - done, region.start + off + done)).bytesWritten;
        off += n;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return hash.digest("hex");
}

export interface Change {
  offset: number;
  data: Buffer;
}

/** `fraction` of the image in scattered, 64 KiB aligned, distinct 64 KiB writes of new random bytes. */
export function changes(size: number, fraction: number, seed: number): Change[] {
  const blocks = Math.floor(size / BLOCK);
  const count = Math.max(1, Math.round((size * fraction) / BLOCK));
  const rnd = prng(seed);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(rnd() * blocks));
  return [...chosen].sort((a, b) => a - b).map((index) => ({ offset: index * BLOCK, data: randomBytes(`change:${seed}:${index}`, BLOCK) }));
}

export async function applyChanges(file: string, list: Change[]): Promise<void> {
  const fh = await fsp.open(file, "r+");
  try {
    for (const c of list) {
      let done = 0;
      while (done < c.data.length) done += (await fh.write(c.data, done, c.data.length - done, c.offset + done)).bytesWritten;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export async function sha256File(file: string): Promise<string> {
  const hash = crypto.createHash("sha256");
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 4 * MiB })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/** Bytes of all files under `dir` (apparent sizes); 0 when it does not exist. */
export async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  let entries: fs.Dirent[];
  try {
    entries = await fsp.readdir(dir, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return 0;
    throw err;
  }
  for (const e of entries) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory()) total += await dirBytes(p);
    else if (e.isFile()) total += (await fsp.stat(p)).size;
  }
  return total;
}
