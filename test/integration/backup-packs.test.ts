import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { BLOCK, backupNow, bytes, createDisk, readDisk, restoreNow, sha, succeed, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";
import { packedHashes } from "../../src/db/sql";
import { ChunkError, PACK_BYTES, packKey } from "../../src/storage/vault";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const uuidOf = (id: string) => Buffer.from(id, "base64url").toString().split(":")[1];

/** The files of the project's vault: pack id → size, and any temporary files left. */
function vaultFiles(projectId: string): { packs: Map<string, number>; temporary: string[] } {
  const packs = new Map<string, number>();
  const temporary: string[] = [];
  const walk = (dir: string) => {
    if (!fs.existsSync(dir)) return;
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.startsWith(".tmp")) temporary.push(p);
      else packs.set(e.name, fs.statSync(p).size);
    }
  };
  walk(path.join(svc.dataDir, "blobs", "vault", projectId, "packs"));
  return { packs, temporary };
}

async function storedInIndex(projectId: string): Promise<{ chunks: number; stored: number; packs: number; packBytes: number }> {
  const [c] = await svc.ds.query(`SELECT count(*)::int AS chunks, coalesce(sum(stored_size), 0)::bigint AS stored FROM vault_chunks WHERE project_id = $1`, [projectId]);
  const [p] = await svc.ds.query(`SELECT count(*)::int AS packs, coalesce(sum(size_bytes), 0)::bigint AS bytes FROM vault_packs WHERE project_id = $1`, [projectId]);
  return { chunks: c.chunks, stored: Number(c.stored), packs: p.packs, packBytes: Number(p.bytes) };
}

describe("a backup spanning several vault packs", () => {
  it("stores exactly what the vault grew by, in full packs that tile their chunks, and restores and verifies", async () => {
    const project = svc.projectIds.alpha;
    const size = 64 * MiB;
    const written = 56 * MiB;
    const offset = 4 * MiB;
    const disk = await createDisk(svc, "packs", size);
    const content = bytes(written, 4242); // incompressible: each chunk is a stored frame of a little over 64 KiB
    await writeDisk(svc, disk, content, offset);
    const image = await readDisk(svc, disk);
    expect(image.subarray(offset, offset + written).equals(content)).toBe(true);

    const indexBefore = await storedInIndex(project);
    const filesBefore = vaultFiles(project);
    const backupId = await backupNow(svc, disk, "packs-backup");

    const b = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status sizeBytes storedBytes } } }`, { id: backupId })).node;
    expect(b.status).toBe("AVAILABLE");
    expect(b.sizeBytes).toBe(written);

    // The backup's storedBytes is the vault's growth, by the index and by the files.
    const indexAfter = await storedInIndex(project);
    const filesAfter = vaultFiles(project);
    const newPacks = [...filesAfter.packs].filter(([id]) => !filesBefore.packs.has(id));
    const fileGrowth = newPacks.reduce((n, [, s]) => n + s, 0);
    expect(indexAfter.chunks - indexBefore.chunks).toBe(written / BLOCK);
    expect(b.storedBytes).toBe(indexAfter.stored - indexBefore.stored);
    expect(b.storedBytes).toBe(indexAfter.packBytes - indexBefore.packBytes);
    expect(b.storedBytes).toBe(fileGrowth);
    expect(filesAfter.temporary).toEqual([]);
    // Incompressible chunks cost only their frame's header and checksum.
    expect(b.storedBytes).toBeGreaterThan(written);
    expect(b.storedBytes).toBeLessThanOrEqual(written + (written / BLOCK) * 16);

    // Several packs: all but the last reach PACK_BYTES; each is indexed at its file's size.
    expect(newPacks.length).toBe(Math.ceil(b.storedBytes / PACK_BYTES));
    expect(indexAfter.packs - indexBefore.packs).toBe(newPacks.length);
    const packRows: { id: string; size_bytes: string }[] = await svc.ds.query(`SELECT id, size_bytes FROM vault_packs WHERE id = ANY($1)`, [newPacks.map(([id]) => id)]);
    expect(new Map(packRows.map((r) => [r.id, Number(r.size_bytes)]))).toEqual(new Map(newPacks));
    const full = newPacks.filter(([, s]) => s >= PACK_BYTES);
    expect(full.length).toBeGreaterThanOrEqual(newPacks.length - 1);
    for (const [, s] of newPacks) expect(s).toBeLessThan(PACK_BYTES + BLOCK + 64); // a pack closes at the first chunk past PACK_BYTES

    // Within each pack, the backup's chunks sit back to back from offset 0 to the end of the file.
    const chunks: { pack_id: string; pack_offset: string; stored_size: number; raw_size: number; compressed: boolean }[] = await svc.ds.query(
      `SELECT c.pack_id, c.pack_offset, c.stored_size, c.raw_size, c.compressed FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash AND c.project_id = $2
        WHERE bb.backup_id = $1 ORDER BY c.pack_id, c.pack_offset`,
      [uuidOf(backupId), project],
    );
    expect(chunks).toHaveLength(written / BLOCK);
    expect(chunks.reduce((n, c) => n + c.stored_size, 0)).toBe(b.storedBytes);
    const end = new Map<string, number>();
    for (const c of chunks) {
      expect(c.raw_size).toBe(BLOCK);
      expect(c.compressed).toBe(true);
      expect(Number(c.pack_offset)).toBe(end.get(c.pack_id) ?? 0);
      end.set(c.pack_id, Number(c.pack_offset) + c.stored_size);
    }
    expect(end).toEqual(new Map(newPacks));

    // Restores byte for byte into a new disk.
    const target = await createDisk(svc, "packs-restored", size);
    await restoreNow(svc, { backupId, targetDiskId: target });
    const restored = await readDisk(svc, target);
    expect(restored.length).toBe(size);
    expect(sha(restored)).toBe(sha(image));

    // Verification re-reads every chunk against its SHA-256 and finds the backup healthy.
    const verify = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: backupId })).verifyBackup.job.id;
    const job = await succeed(svc, verify);
    expect(job).toMatchObject({ status: "SUCCEEDED", error: null });
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status } } }`, { id: backupId })).node.status).toBe("AVAILABLE");

    // A second backup of the unchanged disk adds nothing to the vault.
    const again = await backupNow(svc, disk);
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { storedBytes } } }`, { id: again })).node.storedBytes).toBe(0);
    expect(vaultFiles(project).packs).toEqual(filesAfter.packs);
  });

  it("rewrites a mostly dead pack through the pack writer: the live chunks move to a new pack that tiles them, and restore and verify read them there", async () => {
    const project = svc.projectIds.alpha;
    const disk = await createDisk(svc, "repacked", 4 * MiB);
    await writeDisk(svc, disk, bytes(40 * BLOCK, 7001));
    const before = vaultFiles(project).packs;
    const first = await backupNow(svc, disk, "repack-first");
    const [old] = [...vaultFiles(project).packs.keys()].filter((id) => !before.has(id));
    // Three quarters of the blocks change: once the first backup goes, its pack is a quarter live.
    await writeDisk(svc, disk, bytes(30 * BLOCK, 7002));
    const image = await readDisk(svc, disk);
    const second = await backupNow(svc, disk, "repack-second");
    const del = (await svc.ok(`mutation ($b: ID!) { deleteBackup(input: { id: $b }) { job { id } } }`, { b: first })).deleteBackup;
    await succeed(svc, del.job.id);
    await svc.storage.vault.collectGarbage(project, 3_600_000); // in case the deletion's collection met another collector

    const files = vaultFiles(project);
    expect(files.packs.has(old)).toBe(false);
    expect(await svc.ds.query(`SELECT id FROM vault_packs WHERE id = $1`, [old])).toEqual([]);
    expect(files.temporary).toEqual([]);
    // The ten blocks left unchanged now sit in one new pack, back to back from its start to its end.
    const moved: { pack_id: string; pack_offset: string; stored_size: number }[] = await svc.ds.query(
      `SELECT c.pack_id, c.pack_offset, c.stored_size FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash AND c.project_id = $2
        WHERE bb.backup_id = $1 AND bb.block_index >= 30 ORDER BY c.pack_offset`,
      [uuidOf(second), project],
    );
    expect(moved).toHaveLength(10);
    const packId = moved[0].pack_id;
    expect(packId).not.toBe(old);
    expect(moved.every((c) => c.pack_id === packId)).toBe(true);
    let at = 0;
    for (const c of moved) {
      expect(Number(c.pack_offset)).toBe(at);
      at += c.stored_size;
    }
    expect(files.packs.get(packId)).toBe(at);
    const [row] = await svc.ds.query(`SELECT size_bytes FROM vault_packs WHERE id = $1`, [packId]);
    expect(Number(row.size_bytes)).toBe(at);
    const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM vault_chunks WHERE pack_id = $1`, [packId]);
    expect(n).toBe(10);

    const target = await createDisk(svc, "repacked-restored", 4 * MiB);
    await restoreNow(svc, { backupId: second, targetDiskId: target });
    expect(sha(await readDisk(svc, target))).toBe(sha(image));
    const verify = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: second })).verifyBackup.job.id;
    expect(await succeed(svc, verify)).toMatchObject({ status: "SUCCEEDED", error: null });
  });

  it("reads on from a pack that garbage collection rewrote meanwhile, each chunk where the reader expects it", async () => {
    const project = svc.projectIds.beta;
    const vault = svc.storage.vault;
    const blocks = Array.from({ length: 6 }, (_, k) => bytes(BLOCK, 900 + k));
    const hashes = blocks.map((b) => crypto.createHash("sha256").update(b).digest());
    const writer = vault.writer(project);
    await writer.addBlocks(
      Buffer.concat(blocks),
      hashes.map((hash, slot) => ({ hash, slot })),
    );
    await writer.flush();
    // A reader locates the chunks, then the pack is rewritten with its chunks in the reverse order.
    const [stale] = await vault.locate(project, packedHashes(hashes));
    expect(stale.raw.length).toBe(blocks.length);
    const stored = await Promise.all(hashes.map(async (_, k) => Buffer.from(await vault.blobs.getRange(packKey(project, stale.packId), stale.offsets[k], stale.stored[k]))));
    const moved = "f".repeat(64);
    const parts = stored.slice().reverse();
    await vault.blobs.put(packKey(project, moved), parts);
    await svc.ds.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3)`, [moved, project, parts.reduce((n, p) => n + p.length, 0)]);
    for (let k = 0, at = 0; k < parts.length; at += parts[k].length, k++) {
      const chunk = stale.hashes.subarray((parts.length - 1 - k) * 32, (parts.length - k) * 32);
      await svc.ds.query(`UPDATE vault_chunks SET pack_id = $3, pack_offset = $4 WHERE project_id = $1 AND hash = $2`, [project, chunk, moved, at]);
    }
    await svc.ds.query(`DELETE FROM vault_packs WHERE id = $1`, [stale.packId]);
    await vault.blobs.delete(packKey(project, stale.packId));

    const read: Buffer[] = [];
    for await (const run of vault.readPacks(project, [{ packs: [stale] }])) {
      if (!run.pack) continue;
      for (let k = run.from; k < run.to; k++) read[k] = Buffer.from(run.data.subarray((k - run.from) * BLOCK, (k - run.from + 1) * BLOCK));
      vault.codec.buffers.give(run.data);
    }
    expect(read).toHaveLength(blocks.length);
    for (let k = 0; k < blocks.length; k++) {
      const expected = blocks[hashes.findIndex((h) => h.equals(stale.hashes.subarray(k * 32, k * 32 + 32)))];
      expect(read[k].equals(expected)).toBe(true);
    }

    // A chunk the index does not hold is named, before anything is read.
    const unknown = crypto.createHash("sha256").update("not in the vault").digest();
    const err = await vault.locate(project, packedHashes([hashes[0], unknown])).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChunkError);
    expect(err).toMatchObject({ problem: "missing", hash: unknown.toString("hex") });
  });
});
