import type { DataSource } from "typeorm";
import type { Config } from "../config";
import { JobType } from "../entities";
import type { Logger } from "../logger";
import type { Storage } from "../storage";
import type { EventBus } from "./events";
import { BackupHandler } from "./handlers/backup.handler";
import { DeleteBackupHandler } from "./handlers/delete-backup.handler";
import { RestoreHandler } from "./handlers/restore.handler";
import { VerifyHandler } from "./handlers/verify.handler";
import { JobRunner, type RunnerOptions } from "./runner";

/** The job runner with a handler for every job type this version runs. */
export function createJobRunner(ds: DataSource, storage: Storage, events: EventBus, config: Config, logger: Logger, opts: RunnerOptions = {}): JobRunner {
  const { volumes, vault } = storage;
  return new JobRunner(
    ds,
    events,
    logger,
    [
      new BackupHandler(ds, volumes, vault),
      new RestoreHandler(JobType.RESTORE, ds, volumes, vault),
      new RestoreHandler(JobType.CREATE_DISK, ds, volumes, vault),
      new DeleteBackupHandler(ds, vault, () => config.gcGraceSeconds * 1000, logger),
      new VerifyHandler(ds, vault),
    ],
    { concurrency: config.jobConcurrency, staleMs: config.jobStaleSeconds * 1000, ...opts },
  );
}

/** Reclaims unreferenced volume segments and vault chunks of every project. */
export async function collectAllGarbage(ds: DataSource, storage: Storage, graceMs: number, logger: Logger): Promise<void> {
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
