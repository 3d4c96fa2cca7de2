import fs from "node:fs";
import type { PostgresHandle } from "../../src/db/embedded-postgres";

export default async function globalTeardown(): Promise<void> {
  const state = (globalThis as Record<string, unknown>).__STOWAGE_PG__ as { pg: PostgresHandle; dir: string } | undefined;
  if (!state) return;
  await state.pg.stop();
  fs.rmSync(state.dir, { recursive: true, force: true });
}
