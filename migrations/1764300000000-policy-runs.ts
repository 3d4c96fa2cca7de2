import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * What every policy run did: which occurrence it served, the backups it
 * started and the resources it skipped with the reason (busy, as CBR records).
 * One run per policy and occurrence, in the database too.
 */
export class PolicyRuns1764300000000 implements MigrationInterface {
  name = "PolicyRuns1764300000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE policy_runs (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        policy_id uuid NOT NULL,
        trigger text NOT NULL,
        scheduled_for timestamptz NOT NULL,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        backup_count integer NOT NULL DEFAULT 0,
        deleted_count integer NOT NULL DEFAULT 0,
        skipped jsonb NOT NULL DEFAULT '[]',
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_policy_runs PRIMARY KEY (id),
        CONSTRAINT fk_policy_runs_policy FOREIGN KEY (project_id, policy_id) REFERENCES policies (project_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_policy_runs_trigger CHECK (trigger IN ('SCHEDULE', 'MANUAL')),
        CONSTRAINT ck_policy_runs_counts CHECK (backup_count >= 0 AND deleted_count >= 0)
      )`);
    await q.query(`CREATE UNIQUE INDEX uq_policy_runs_occurrence ON policy_runs (policy_id, scheduled_for) WHERE trigger = 'SCHEDULE'`);
    await q.query(`CREATE INDEX ix_policy_runs_policy_created ON policy_runs (policy_id, created_at, id)`);
    await q.query(`CREATE INDEX ix_policy_runs_project_created ON policy_runs (project_id, created_at, id)`);
    // Retention looks at a resource's backups, newest first.
    await q.query(`CREATE INDEX ix_backups_resource_trigger ON backups (resource_id, trigger, created_at DESC) WHERE parent_id IS NULL`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP INDEX ix_backups_resource_trigger`);
    await q.query(`DROP TABLE policy_runs`);
  }
}
