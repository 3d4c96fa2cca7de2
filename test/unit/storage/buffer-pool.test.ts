import { BufferPool } from "../../../src/storage/buffer-pool";

const MiB = 1024 * 1024;

describe("BufferPool", () => {
  it("hands out buffers of exactly the size asked, in power-of-two capacities of at least 1 MiB", () => {
    const pool = new BufferPool();
    for (const [size, capacity] of [
      [0, MiB],
      [1, MiB],
      [4097, MiB],
      [MiB, MiB],
      [MiB + 1, 2 * MiB],
      [3 * MiB, 4 * MiB],
      [4 * MiB, 4 * MiB],
      [4 * MiB + 17, 8 * MiB],
    ]) {
      const b = pool.take(size);
      expect(b.length).toBe(size);
      expect(b.byteOffset).toBe(0);
      expect(b.buffer.byteLength).toBe(capacity);
    }
  });

  it("keeps at most its byte budget of idle buffers over all capacities, the latest given taking the room of others", () => {
    const pool = new BufferPool(64, false, 8 * MiB);
    const small = Array.from({ length: 10 }, () => pool.take(MiB));
    const large = Array.from({ length: 3 }, () => pool.take(4 * MiB));
    const again = (n: number, size: number) => Array.from({ length: n }, () => pool.take(size).buffer);
    for (const b of small) pool.give(b);
    // Eight 1 MiB buffers fit; then each 4 MiB buffer takes the room of four of them, and the third finds none.
    for (const b of large) pool.give(b);
    expect(again(3, 4 * MiB).filter((ab) => large.some((b) => b.buffer === ab))).toHaveLength(2);
    expect(again(10, MiB).filter((ab) => small.some((b) => b.buffer === ab))).toHaveLength(0);
  });

  it("takes room from the capacity holding the most idle bytes", () => {
    const pool = new BufferPool(64, false, 8 * MiB);
    const ones = Array.from({ length: 4 }, () => pool.take(MiB));
    const two = pool.take(2 * MiB);
    const four = pool.take(4 * MiB);
    for (const b of [...ones, two, four]) pool.give(b);
    // 4 MiB of 1 MiB buffers and 2 MiB of one 2 MiB buffer were idle: the 4 MiB buffer took two of the 1 MiB ones.
    expect(pool.take(4 * MiB).buffer).toBe(four.buffer);
    expect(pool.take(2 * MiB).buffer).toBe(two.buffer);
    const back = Array.from({ length: 4 }, () => pool.take(MiB).buffer);
    expect(back.filter((ab) => ones.some((b) => b.buffer === ab))).toHaveLength(2);
  });

  it("hands out shared memory when asked, and takes back only its own kind", () => {
    const shared = new BufferPool(16, true);
    const a = shared.take(3 * MiB);
    expect(a.buffer).toBeInstanceOf(SharedArrayBuffer);
    const memory = a.buffer;
    shared.give(a);
    expect(shared.take(4 * MiB).buffer).toBe(memory);
    // A plain buffer of the right capacity is not taken into a shared pool, nor the reverse.
    const plain = new BufferPool().take(4 * MiB);
    shared.give(plain);
    expect(shared.take(4 * MiB).buffer).toBeInstanceOf(SharedArrayBuffer);
    const other = new BufferPool();
    other.give(shared.take(MiB));
    expect(other.take(MiB).buffer).toBeInstanceOf(ArrayBuffer);
  });

  it("hands a given buffer out again for any size of the same capacity class", () => {
    const pool = new BufferPool();
    const a = pool.take(3 * MiB);
    a.fill(7);
    const memory = a.buffer;
    pool.give(a);
    const b = pool.take(2 * MiB + 1); // also the 4 MiB class
    expect(b.buffer).toBe(memory);
    expect(b.length).toBe(2 * MiB + 1);
    // Usable at its new size: it writes and reads back.
    b.fill(0x5a);
    expect(b[b.length - 1]).toBe(0x5a);
    // A different class does not get it.
    pool.give(b);
    expect(pool.take(MiB).buffer).not.toBe(memory);
    expect(pool.take(8 * MiB).buffer).not.toBe(memory);
    expect(pool.take(4 * MiB).buffer).toBe(memory);
  });

  it("takes back a subarray of a buffer it handed out", () => {
    const pool = new BufferPool();
    const a = pool.take(2 * MiB);
    pool.give(a.subarray(1000, 5000));
    expect(pool.take(2 * MiB).buffer).toBe(a.buffer);
  });

  it("hands out each given buffer once, even when given twice", () => {
    const pool = new BufferPool();
    const a = pool.take(MiB);
    pool.give(a);
    pool.give(a);
    const x = pool.take(MiB);
    const y = pool.take(MiB);
    expect(x.buffer).toBe(a.buffer);
    expect(y.buffer).not.toBe(a.buffer);
  });

  it("keeps at most `keep` idle buffers of a class", () => {
    const pool = new BufferPool(2);
    const taken = [pool.take(MiB), pool.take(MiB), pool.take(MiB)];
    for (const b of taken) pool.give(b);
    const again = [pool.take(MiB), pool.take(MiB), pool.take(MiB)].map((b) => b.buffer);
    expect(again.filter((m) => taken.some((t) => t.buffer === m))).toHaveLength(2);
  });

  it("takes back only buffers it handed out: never a slice of Node's shared slab, though its capacity fits a class", () => {
    const pool = new BufferPool(Infinity, false, Infinity, 8 * 1024);
    const slice = Buffer.allocUnsafe(512); // a slice of Node's 8 KiB slab, which later small buffers are cut from too
    expect(slice.buffer.byteLength).toBe(Buffer.poolSize);
    pool.give(slice);
    const foreign = Buffer.allocUnsafeSlow(16 * 1024);
    pool.give(foreign);
    expect(pool.take(8 * 1024).buffer).not.toBe(slice.buffer);
    expect(pool.take(16 * 1024).buffer).not.toBe(foreign.buffer);
    // Its own come back, once each.
    const own = pool.take(8 * 1024);
    pool.give(own);
    pool.give(own);
    expect(pool.take(8 * 1024).buffer).toBe(own.buffer);
    expect(pool.take(8 * 1024).buffer).not.toBe(own.buffer);
  });

  it("ignores small buffers, buffers of Node's shared pool, odd capacities, shared memory and nothing", () => {
    const pool = new BufferPool();
    const small = Buffer.allocUnsafeSlow(64 * 1024);
    const shared = Buffer.from("in node's pool");
    const odd = Buffer.allocUnsafeSlow(3 * MiB);
    const sab = Buffer.from(new SharedArrayBuffer(2 * MiB));
    const detached = Buffer.allocUnsafeSlow(2 * MiB);
    structuredClone(detached.buffer, { transfer: [detached.buffer] });
    for (const b of [small, shared, odd, sab, detached, null, undefined]) pool.give(b);
    for (const size of [1, 64 * 1024, MiB, 2 * MiB, 3 * MiB, 4 * MiB]) {
      const t = pool.take(size);
      expect([small.buffer, shared.buffer, odd.buffer, sab.buffer]).not.toContain(t.buffer);
      expect(t.length).toBe(size);
    }
  });
});
