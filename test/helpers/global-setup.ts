import "reflect-metadata";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { migrate } from "../../src/app";
import { createDataSource } from "../../src/db/data-source";
import { openEmbeddedPostgres } from "../../src/db/embedded-postgres";
import { silentLogger } from "../../src/logger";

export const TEMPLATE = "stowage_test_template";

/**
 * Starts one embedded Postgres for the run (or uses DATABASE_URL), migrates a
 * template database once; each test file then copies the template.
 */
export default async function globalSetup(): Promise<void> {
  let adminUrl = process.env.DATABASE_URL;
  if (!adminUrl) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-test-pg-"));
    fs.chmodSync(dir, 0o755);
    const pg = await openEmbeddedPostgres(dir, silentLogger);
    (globalThis as Record<string, unknown>).__STOWAGE_PG__ = { pg, dir };
    adminUrl = pg.url;
  }
  const admin = new Client({ connectionString: adminUrl });
  await admin.connect();
  await admin.query(`DROP DATABASE IF EXISTS ${TEMPLATE} WITH (FORCE)`);
  await admin.query(`CREATE DATABASE ${TEMPLATE}`);
  await admin.end();

  const url = new URL(adminUrl);
  url.pathname = `/${TEMPLATE}`;
  const ds = createDataSource({ url: url.toString(), logger: silentLogger });
  await ds.initialize();
  await migrate(ds);
  await ds.destroy();
  process.env.STOWAGE_TEST_ADMIN_URL = adminUrl;
}
