import type { DataSource } from "typeorm";
import type { Config } from "./config";
import { OsType, Server } from "./entities";
import { RequestContext } from "./services/context";
import { failedPrecondition } from "./domain/errors";
import type { Services } from "./services";
import { toGlobalId } from "./services/global-id";
import { GiB } from "./services/validate";

/**
 * Fills a project with a small graph to explore: servers, disks and policies.
 * Returns null, adding nothing, when the project already has servers (so that
 * `serve --demo` on every start, or `demo` twice, does not pile up copies).
 */
export async function seedDemo(ds: DataSource, config: Config, services: Services, projectName = "default"): Promise<{ servers: number; disks: number; policies: number } | null> {
  const project = await services.projects.findByName(projectName);
  if (!project) throw failedPrecondition(`project "${projectName}" does not exist; create it with: stowage project create ${projectName}`);
  if ((await ds.getRepository(Server).countBy({ projectId: project.id })) > 0) return null;
  const ctx = new RequestContext(project.id, ds, config);

  const web = await Promise.all(
    ["web-1", "web-2", "web-3"].map((name) =>
      services.servers.create(ctx, { name, vcpus: 2, memoryMiB: 4096, osType: OsType.LINUX, systemDiskSizeBytes: 20 * GiB, dataDisks: [{ sizeBytes: 50 * GiB }] }),
    ),
  );
  const db = await services.servers.create(ctx, {
    name: "db-primary",
    vcpus: 8,
    memoryMiB: 32768,
    osType: OsType.LINUX,
    systemDiskSizeBytes: 40 * GiB,
    dataDisks: [
      { name: "db-data", sizeBytes: 500 * GiB },
      { name: "db-wal", sizeBytes: 100 * GiB },
    ],
  });
  const win = await services.servers.create(ctx, { name: "ad-controller", vcpus: 4, memoryMiB: 8192, osType: OsType.WINDOWS, systemDiskSizeBytes: 80 * GiB });
  await services.servers.stop(ctx, toGlobalId("Server", win.server.id));
  const spare = await services.disks.create(ctx, { name: "scratch", sizeBytes: 10 * GiB });

  const nightly = await services.policies.create(ctx, {
    name: "nightly",
    schedule: ["FREQ=DAILY;BYHOUR=2;BYMINUTE=0"],
    timezone: "Europe/Berlin",
    retention: { maxBackups: 14, keepWeekly: 4, keepMonthly: 6 },
  });
  const hourly = await services.policies.create(ctx, {
    name: "database-hourly",
    schedule: ["FREQ=HOURLY;BYMINUTE=15"],
    timezone: "UTC",
    retention: { retentionDays: 3, keepDaily: 7 },
  });
  await services.policies.create(ctx, {
    name: "weekly-archive",
    enabled: false,
    schedule: ["FREQ=WEEKLY;BYDAY=SU;BYHOUR=4;BYMINUTE=0"],
    timezone: "America/New_York",
    retention: { keepWeekly: 8, keepMonthly: 12, keepYearly: 3 },
  });
  await services.policies.bind(ctx, { policyId: toGlobalId("Policy", nightly.id), resourceIds: web.map((w) => toGlobalId("Server", w.server.id)) });
  await services.policies.bind(ctx, { policyId: toGlobalId("Policy", hourly.id), resourceIds: [toGlobalId("Server", db.server.id), toGlobalId("Disk", spare.disk.id)] });

  const disks = [...web, db, win].reduce((n, s) => n + s.disks.length, 0) + 1;
  return { servers: 5, disks, policies: 3 };
}
