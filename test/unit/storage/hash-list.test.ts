import crypto from "node:crypto";
import { HashList, HashSet } from "../../../src/storage/hash-list";

const hash = (n: number) => crypto.createHash("sha256").update(String(n)).digest();

describe("HashList", () => {
  it("keeps hashes back to back as it grows, copied from any place in a buffer", () => {
    const list = new HashList(2);
    const all = Array.from({ length: 100 }, (_, n) => hash(n));
    const packed = Buffer.concat(all);
    for (let k = 0; k < all.length; k++) list.push(packed, k * 32);
    expect(list.length).toBe(100);
    expect(list.bytes.equals(packed)).toBe(true);
    expect(list.at(57).equals(all[57])).toBe(true);
    expect(list.equalsAt(3, packed, 3 * 32)).toBe(true);
    expect(list.equalsAt(3, packed, 4 * 32)).toBe(false);
  });
});

describe("HashSet", () => {
  it("holds thousands of hashes, each once, in the order they were added", () => {
    const set = new HashSet(4);
    const all = Array.from({ length: 5000 }, (_, n) => hash(n));
    for (const h of all) expect(set.add(h)).toBe(true);
    for (const h of all) expect(set.add(Buffer.from(h))).toBe(false);
    expect(set.size).toBe(5000);
    for (const h of all) expect(set.has(h)).toBe(true);
    for (let n = 5000; n < 6000; n++) expect(set.has(hash(n))).toBe(false);
    expect(set.list.bytes.equals(Buffer.concat(all))).toBe(true);
  });

  it("tells apart hashes that share the bytes it places them by", () => {
    const set = new HashSet();
    const a = hash(1);
    const b = Buffer.from(a);
    b[31] ^= 1; // same first bytes, so the same slot
    const c = Buffer.from(a);
    c[4] ^= 0x80;
    expect(set.add(a)).toBe(true);
    expect(set.has(b)).toBe(false);
    expect(set.add(b)).toBe(true);
    expect(set.has(c)).toBe(false);
    expect(set.add(c)).toBe(true);
    expect([a, b, c].every((h) => set.has(h))).toBe(true);
    expect(set.size).toBe(3);
  });

  it("finds a hash at any place in a larger buffer", () => {
    const set = new HashSet();
    const packed = Buffer.concat([hash(7), hash(8), hash(9)]);
    expect(set.add(packed, 32)).toBe(true);
    expect(set.has(hash(8))).toBe(true);
    expect(set.has(packed, 32)).toBe(true);
    expect(set.has(packed, 0)).toBe(false);
    expect(set.has(packed, 64)).toBe(false);
  });
});
