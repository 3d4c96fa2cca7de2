import "reflect-metadata";
import crypto from "node:crypto";
import { Client } from "pg";
import type { DataSource } from "typeorm";
import { createDataSource } from "../../src/db/data-source";
import { silentLogger } from "../../src/logger";

const TEMPLATE = "stowage_test_template";

function adminUrl(): string {
  const url = process.env.STOWAGE_TEST_ADMIN_URL;
  if (!url) throw new Error("the test database is not set up (jest globalSetup did not run)");
  return url;
}

export interface TestDatabase {
  url: string;
  name: string;
  drop(): Promise<void>;
}

/** A fresh database for one test file, copied from the migrated template. */
export async function createTestDatabase(): Promise<TestDatabase> {
  const name = `stowage_test_${crypto.randomBytes(6).toString("hex")}`;
  const admin = new Client({ connectionString: adminUrl() });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name} TEMPLATE ${TEMPLATE}`);
  await admin.end();
  const url = new URL(adminUrl());
  url.pathname = `/${name}`;
  return {
    url: url.toString(),
    name,
    async drop() {
      const c = new Client({ connectionString: adminUrl() });
      await c.connect();
      await c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await c.end();
    },
  };
}

export async function openTestDataSource(url: string, onQuery?: (sql: string) => void): Promise<DataSource> {
  const ds = createDataSource({ url, logger: silentLogger, onQuery, poolSize: 10 });
  await ds.initialize();
  return ds;
}
