import fs from "node:fs";
import path from "node:path";
import type { PostgresHandle } from "../../src/db/embedded-postgres";

export default async function globalTeardown(): Promise<void> {
  const state = (globalThis as Record<string, unknown>).__STOWAGE_PG__ as { pg: PostgresHandle; dir: string } | undefined;
  if (!state) return;
  await state.pg.stop();
  // As root under a temp dir the postgres user cannot enter, the cluster lies where the link points.
  const link = path.join(state.dir, "postgres");
  if (fs.lstatSync(link, { throwIfNoEntry: false })?.isSymbolicLink()) fs.rmSync(fs.realpathSync(link), { recursive: true, force: true });
  fs.rmSync(state.dir, { recursive: true, force: true });
}
