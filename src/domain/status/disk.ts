import type { EntityManager } from "typeorm";
import type { Queryable } from "../../db/sql";
import { Disk, DiskStatus } from "../../entities";

/** Every status change of a disk. */

/** A restore or creation published the disk's blocks: the status its plan gives it (IN_USE or AVAILABLE). */
export async function markRestored(q: Queryable, id: string, status: DiskStatus): Promise<void> {
  await q.query(`UPDATE disks SET status = $2, updated_at = now() WHERE id = $1`, [id, status]);
}

/**
 * A restore or creation failed: a restored disk keeps its bytes and goes back to
 * `before`; a disk being created had nothing (`before` null) and is ERROR. A disk
 * no longer RESTORING or CREATING was published, and its status is its own already.
 */
export async function failRestoring(q: Queryable, id: string, before: DiskStatus | null): Promise<void> {
  await q.query(`UPDATE disks SET status = $2, updated_at = now() WHERE id = $1 AND status IN ('${DiskStatus.RESTORING}', '${DiskStatus.CREATING}')`, [id, before ?? DiskStatus.ERROR]);
}

/** Attached to a server as `device`: IN_USE. */
export async function attach(em: EntityManager, disk: Disk, serverId: string, device: string): Promise<Disk> {
  disk.serverId = serverId;
  disk.device = device;
  disk.status = DiskStatus.IN_USE;
  return em.save(disk);
}

/** Detached from its server: AVAILABLE. */
export async function detach(em: EntityManager, disk: Disk): Promise<Disk> {
  disk.serverId = null;
  disk.device = null;
  disk.status = DiskStatus.AVAILABLE;
  return em.save(disk);
}

/** The data disks of a server being deleted that stay: detached and AVAILABLE. */
export async function detachAll(em: EntityManager, ids: string[]): Promise<void> {
  await em.update(Disk, ids, { serverId: null, device: null, status: DiskStatus.AVAILABLE });
}
