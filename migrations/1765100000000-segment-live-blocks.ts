import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Each volume segment counts the disk blocks that point at it (`live_blocks`),
 * so compaction finds dead and mostly dead segments without reading any block
 * map. Statement-level triggers on disk_blocks keep the count: every write,
 * overwrite, zeroing, repointing and disk deletion passes through them, one
 * aggregated update per statement. Jobs that failed or were cancelled are found
 * by when they ended, so what they wrote is reclaimed promptly.
 */
export class SegmentLiveBlocks1765100000000 implements MigrationInterface {
  name = "SegmentLiveBlocks1765100000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE volume_segments ADD COLUMN live_blocks bigint NOT NULL DEFAULT 0`);
    await q.query(`
      CREATE FUNCTION volume_segments_count_blocks() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF TG_OP = 'INSERT' THEN
          UPDATE volume_segments s SET live_blocks = s.live_blocks + d.n
            FROM (SELECT segment_id, count(*) AS n FROM new_blocks WHERE segment_id IS NOT NULL GROUP BY segment_id) d
           WHERE s.id = d.segment_id;
        ELSIF TG_OP = 'DELETE' THEN
          UPDATE volume_segments s SET live_blocks = s.live_blocks - d.n
            FROM (SELECT segment_id, count(*) AS n FROM old_blocks WHERE segment_id IS NOT NULL GROUP BY segment_id) d
           WHERE s.id = d.segment_id;
        ELSE
          UPDATE volume_segments s SET live_blocks = s.live_blocks + d.n
            FROM (SELECT segment_id, sum(n) AS n
                    FROM (SELECT segment_id, 1 AS n FROM new_blocks UNION ALL SELECT segment_id, -1 FROM old_blocks) x
                   WHERE segment_id IS NOT NULL GROUP BY segment_id HAVING sum(n) <> 0) d
           WHERE s.id = d.segment_id;
        END IF;
        RETURN NULL;
      END $$`);
    await q.query(`CREATE TRIGGER tg_disk_blocks_count_insert AFTER INSERT ON disk_blocks REFERENCING NEW TABLE AS new_blocks
      FOR EACH STATEMENT EXECUTE FUNCTION volume_segments_count_blocks()`);
    await q.query(`CREATE TRIGGER tg_disk_blocks_count_update AFTER UPDATE ON disk_blocks REFERENCING OLD TABLE AS old_blocks NEW TABLE AS new_blocks
      FOR EACH STATEMENT EXECUTE FUNCTION volume_segments_count_blocks()`);
    await q.query(`CREATE TRIGGER tg_disk_blocks_count_delete AFTER DELETE ON disk_blocks REFERENCING OLD TABLE AS old_blocks
      FOR EACH STATEMENT EXECUTE FUNCTION volume_segments_count_blocks()`);
    // The triggers hold writers back (a lock on disk_blocks) until this transaction ends, so the count starts exact.
    await q.query(`
      UPDATE volume_segments s SET live_blocks = c.n
        FROM (SELECT segment_id, count(*) AS n FROM disk_blocks WHERE segment_id IS NOT NULL GROUP BY segment_id) c
       WHERE s.id = c.segment_id`);
    // Dead segments (no live block) and sparse ones (under half live): what compaction looks for.
    await q.query(`CREATE INDEX ix_volume_segments_sparse ON volume_segments (disk_id) WHERE live_blocks * 131072 < size_bytes`);
    await q.query(`CREATE INDEX ix_jobs_failed_at ON jobs (finished_at) WHERE status IN ('FAILED', 'CANCELLED')`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP INDEX ix_jobs_failed_at`);
    await q.query(`DROP INDEX ix_volume_segments_sparse`);
    await q.query(`DROP TRIGGER tg_disk_blocks_count_delete ON disk_blocks`);
    await q.query(`DROP TRIGGER tg_disk_blocks_count_update ON disk_blocks`);
    await q.query(`DROP TRIGGER tg_disk_blocks_count_insert ON disk_blocks`);
    await q.query(`DROP FUNCTION volume_segments_count_blocks()`);
    await q.query(`ALTER TABLE volume_segments DROP COLUMN live_blocks`);
  }
}
