import type { EntityManager } from "typeorm";
import type { Queryable } from "../../db/sql";
import { ServerStatus, type Server } from "../../entities";

/** Every status change of a server. */

/** Started or stopped (startServer, stopServer). */
export async function switchPower(em: EntityManager, server: Server, to: ServerStatus.ACTIVE | ServerStatus.SHUTOFF): Promise<Server> {
  server.status = to;
  return em.save(server);
}

/** Its disks were restored or built: ACTIVE when asked to power on, SHUTOFF otherwise. */
export async function markRestored(q: Queryable, id: string, powerOn: boolean): Promise<void> {
  await q.query(`UPDATE servers SET status = $2, updated_at = now() WHERE id = $1`, [id, powerOn ? ServerStatus.ACTIVE : ServerStatus.SHUTOFF]);
}

/** A restore or build failed: a server being built has nothing to fall back to (ERROR); a restored one stays stopped. */
export async function failRestoring(q: Queryable, id: string): Promise<void> {
  await q.query(
    `UPDATE servers SET status = CASE WHEN status = '${ServerStatus.BUILDING}' THEN '${ServerStatus.ERROR}' ELSE '${ServerStatus.SHUTOFF}' END, updated_at = now()
      WHERE id = $1 AND status IN ('${ServerStatus.RESTORING}', '${ServerStatus.BUILDING}')`,
    [id],
  );
}
