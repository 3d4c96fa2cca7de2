import type { DataSource } from "typeorm";
import type { Config } from "../config";
import { JobType } from "../entities";
import type { Logger } from "../logger";
import { rows } from "../db/sql";
import * as exportStatus from "../domain/status/export";
import type { Storage } from "../storage";
import { compactVolumes } from "../storage/compaction";
import type { EventBus } from "./events";
import { BackupHandler } from "./handlers/backup.handler";
import { DeleteBackupHandler } from "./handlers/delete-backup.handler";
import { HydrateHandler } from "./handlers/hydrate.handler";
import { RestoreHandler } from "./handlers/restore.handler";
import { VerifyHandler } from "./handlers/verify.handler";
import { CreateImageHandler } from "./handlers/image.handler";
import { ExportImageHandler, ImportImageHandler } from "./handlers/transfer.handler";
import { JobRunner, type RunnerOptions } from "./runner";

/** The job runner with a handler for every job type; it refuses to start when one is missing or doubled. */
export function createJobRunner(
  ds: DataSource,
  storage: Storage,
  events: EventBus,
  config: Config,
  logger: Logger,
  opts: RunnerOptions = {},
  onPolicyBackup?: (projectId: string, policyId: string) => Promise<void>,
): JobRunner {
  const { volumes, vault } = storage;
  return new JobRunner(
    ds,
    events,
    logger,
    [
      new BackupHandler(ds, volumes, vault, onPolicyBackup),
      new HydrateHandler(JobType.RESTORE, ds, volumes, vault, new RestoreHandler(JobType.RESTORE, ds, volumes, vault)),
      new HydrateHandler(JobType.CREATE_DISK, ds, volumes, vault, new RestoreHandler(JobType.CREATE_DISK, ds, volumes, vault)),
      new DeleteBackupHandler(ds, vault, () => config.gcGraceSeconds * 1000, logger),
      new VerifyHandler(ds, vault),
      new CreateImageHandler(ds, volumes, vault),
      new ImportImageHandler(ds, vault, config),
      new ExportImageHandler(ds, vault, config),
    ],
    { concurrency: config.jobConcurrency, staleMs: config.jobStaleSeconds * 1000, ...opts },
  );
}

/** Deletes the files of exports and uploads past their expiry; returns how many. Cheap: both are found by index. */
async function expireTransfers(ds: DataSource, storage: Storage): Promise<number> {
  const expired = await exportStatus.expireDue(ds);
  for (const e of expired) await storage.uploads.blobs.delete(`exports/${e.project_id}/${e.id}`);
  return expired.length + (await storage.uploads.expire());
}

/**
 * The full sweep: what compactStorage reclaims, and besides unreferenced vault
 * chunks and mostly-dead packs of every project, export files whose export is
 * gone, and blobs a crash left unindexed or unfinished.
 */
export async function collectAllGarbage(ds: DataSource, storage: Storage, graceMs: number, logger: Logger): Promise<void> {
  await expireTransfers(ds, storage);
  // Export files whose export is gone (its image was deleted) or never finished.
  const cutoff = Date.now() - graceMs;
  for await (const blob of storage.uploads.blobs.list("exports/")) {
    if (blob.modifiedAt.getTime() > cutoff) continue;
    const [row] = await rows(ds, `SELECT 1 FROM image_exports WHERE id = $1 AND status IN ('READY', 'RUNNING')`, [blob.key.split("/")[2]]);
    if (!row) await storage.uploads.blobs.delete(blob.key);
  }
  const volumes = await storage.volumes.collectGarbage(graceMs);
  const projects: { id: string }[] = await ds.query(`SELECT id FROM projects`);
  let chunks = 0;
  let bytes = volumes.bytes;
  for (const p of projects) {
    const r = await storage.vault.collectGarbage(p.id, graceMs);
    chunks += r?.chunks ?? 0;
    bytes += r?.bytes ?? 0;
  }
  if (bytes > 0) logger.info("garbage collected", { segments: volumes.segments, chunks, bytes });
}

/** How far back a pass looks for jobs that failed: a few passes' worth, so one busy pass misses none. */
const FAILED_LOOKBACK = "10 minutes";
/** Slack around a failed job's run when matching packs to it (clocks of processes and database). */
const FAILED_SLACK_MS = 60_000;

/**
 * The frequent, incremental part of reclaiming space: deletes expired exports
 * and uploads, compacts volume segments (see compactVolumes; dead ones go,
 * the staged ones of ended restores too) and drops what backups and image jobs
 * that failed or were cancelled lately wrote to the vault. Cheap when there is
 * nothing to do: it reads only expired transfers, dead or sparse segments and
 * lately failed jobs.
 */
export async function compactStorage(ds: DataSource, storage: Storage, logger: Logger): Promise<void> {
  const transfers = await expireTransfers(ds, storage);
  await storage.volumes.dropEndedStaged(FAILED_LOOKBACK);
  const volumes = await compactVolumes(ds, storage.volumes, (diskId, err) => logger.error("compacting a disk failed", { disk: diskId, error: err }));
  const failed = await rows<{ project_id: string; started_at: Date; finished_at: Date }>(
    ds,
    `SELECT project_id, min(started_at) AS started_at, max(finished_at) AS finished_at FROM jobs
      WHERE status IN ('FAILED', 'CANCELLED') AND finished_at > now() - interval '${FAILED_LOOKBACK}' AND started_at IS NOT NULL
        AND type IN ('${JobType.BACKUP}', '${JobType.CREATE_IMAGE}', '${JobType.IMPORT_IMAGE}')
      GROUP BY project_id`,
  );
  let packs = 0;
  let bytes = 0;
  for (const f of failed) {
    const r = await storage.vault.dropUnreferencedPacks(f.project_id, new Date(f.started_at.getTime() - FAILED_SLACK_MS), new Date(f.finished_at.getTime() + FAILED_SLACK_MS));
    packs += r?.packs ?? 0;
    bytes += r?.bytes ?? 0;
  }
  if (volumes?.freedBytes || packs || transfers) {
    logger.info("storage compacted", {
      expired: transfers,
      segmentsDeleted: volumes?.deleted ?? 0,
      segmentsWritten: volumes?.written ?? 0,
      movedBytes: volumes?.movedBytes ?? 0,
      packs,
      bytes: (volumes?.freedBytes ?? 0) + bytes,
    });
  }
}
