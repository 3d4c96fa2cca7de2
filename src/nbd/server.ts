import fs from "node:fs";
import net from "node:net";
import type { Duplex } from "node:stream";
import tls from "node:tls";
import { Counter, Gauge, type Registry } from "prom-client";
import type { DataSource } from "typeorm";
import type { Config } from "../config";
import type { Logger } from "../logger";
import type { Services } from "../services";
import type { OpenedExport } from "../services/nbd.service";
import { BLOCK_SIZE, type VolumeStore } from "../storage/volume-store";
import { NbdConnection, type ConnectionHost } from "./connection";
import { DiskWrites, WriteBudget, type BlockStore } from "./disk-writes";

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|::1|localhost)$/;

/** A batch of acknowledged writes is committed at most this long after its first write. */
const COMMIT_DELAY_MS = 200;
/** How often the exports of open connections are checked (revoked in another process, or their disk deleted). */
const REVOKE_CHECK_MS = 1000;

export interface NbdServerDeps {
  config: Config;
  logger: Logger;
  ds: DataSource;
  services: Services;
  volumes: VolumeStore;
  registry: Registry;
}

export interface NbdServer {
  port: number;
  close(): Promise<void>;
}

/** The volume store as the write buffer sees it: commits take the disk's write lock and refuse a disk being restored. */
function blockStore(deps: NbdServerDeps): BlockStore {
  const { volumes, ds, services } = deps;
  return {
    refs: (diskId, first, last) => volumes.blockRefs(ds, diskId, first, last),
    readRun: (diskId, segmentId, offset, into) => volumes.readSegmentInto(diskId, segmentId, offset, into),
    commit: (projectId, diskId, blocks) =>
      volumes.withDiskLock(diskId, async () => {
        if (!(await services.nbd.writable(ds.manager, projectId, diskId))) throw new Error("the disk is no longer writable (deleted, or being restored)");
        await volumes.putBlocks(
          projectId,
          diskId,
          (async function* () {
            for (const [index, data] of blocks) yield { index, data };
          })(),
        );
      }),
  };
}

/**
 * Disks over the Network Block Device protocol, in the API process. An export name
 * is a capability checked against the database at the handshake; the connections of
 * an export revoked here are dropped at once, of one revoked elsewhere (or whose disk
 * was deleted or is being restored) within a second. The writes of one disk are
 * shared by its connections in this process, so a reader sees what the writer was
 * acknowledged, and a FLUSH on any commits what all were told (multi-conn consistency).
 */
export async function startNbdServer(deps: NbdServerDeps): Promise<NbdServer> {
  const { config, logger, ds, services } = deps;
  const store = blockStore(deps);
  const budget = new WriteBudget(config.nbdWriteBufferBytes);
  const disks = new Map<string, DiskWrites>();
  const connections = new Set<NbdConnection>();

  const opened = new Gauge({ name: "stowage_nbd_connections", help: "NBD connections open now.", registers: [deps.registry] });
  const accepted = new Counter({ name: "stowage_nbd_connections_total", help: "NBD connections accepted.", registers: [deps.registry] });
  // Counted in plain numbers per request and handed to the counters when /metrics is read: a label lookup per 4 KiB read costs more than the read's own bookkeeping.
  const counted = { commands: new Map<string, number>(), read: 0, written: 0 };
  new Counter({
    name: "stowage_nbd_requests_total",
    help: "NBD requests by command.",
    labelNames: ["command"] as const,
    registers: [deps.registry],
    collect() {
      for (const [command, n] of counted.commands) this.inc({ command }, n);
      counted.commands.clear();
    },
  });
  new Counter({
    name: "stowage_nbd_bytes_total",
    help: "Bytes read and written over NBD.",
    labelNames: ["direction"] as const,
    registers: [deps.registry],
    collect() {
      this.inc({ direction: "read" }, counted.read);
      this.inc({ direction: "write" }, counted.written);
      counted.read = counted.written = 0;
    },
  });
  const buffered = new Gauge({
    name: "stowage_nbd_buffered_bytes",
    help: "Acknowledged NBD writes not yet committed.",
    registers: [deps.registry],
    collect() {
      this.set(budget.used);
    },
  });
  void buffered;

  const tlsOptions = config.nbdTls;
  const secureContext = tlsOptions ? tls.createSecureContext({ cert: fs.readFileSync(tlsOptions.certFile), key: fs.readFileSync(tlsOptions.keyFile) }) : null;

  const host: ConnectionHost = {
    open: (name) => services.nbd.open(ds.manager, name),
    attach(conn: NbdConnection, exp: OpenedExport) {
      let writes = disks.get(exp.diskId);
      if (!writes) {
        writes = new DiskWrites(store, exp.projectId, exp.diskId, exp.sizeBytes, budget, { diskBytes: Math.max(4 * BLOCK_SIZE, Math.floor(budget.total / 4)), delayMs: COMMIT_DELAY_MS });
        disks.set(exp.diskId, writes);
      }
      writes.users++;
      connections.add(conn);
      return writes;
    },
    detach(conn: NbdConnection) {
      connections.delete(conn);
      const exp = conn.export;
      if (!exp || !conn.writes) return;
      const writes = conn.writes;
      if (--writes.users === 0 && disks.get(exp.diskId) === writes) {
        writes.stop();
        disks.delete(exp.diskId);
      }
    },
    tls: secureContext
      ? {
          required: !LOOPBACK.test(config.nbdHost),
          upgrade: (socket: Duplex) =>
            new Promise<Duplex>((resolve, reject) => {
              const secure = new tls.TLSSocket(socket as net.Socket, { isServer: true, secureContext });
              secure.once("secure", () => resolve(secure));
              secure.once("error", reject);
            }),
        }
      : null,
    count(command, moved) {
      if (!moved) counted.commands.set(command, (counted.commands.get(command) ?? 0) + 1);
      else {
        counted.read += moved.read ?? 0;
        counted.written += moved.written ?? 0;
      }
    },
    log: (message, fields) => logger.warn(message, fields),
  };

  const revoke = (ids: Iterable<string>) => {
    const gone = new Set(ids);
    for (const c of connections) if (c.export && gone.has(c.export.id)) c.close();
  };
  services.nbd.onRevoke = (ids) => revoke(ids);
  // A write to a disk, from here or through the data endpoint, makes its kept block map stale.
  const unwatch = deps.volumes.onChange((diskId) => disks.get(diskId)?.invalidate());
  const unregister = services.backups.capture.register(<T>(capture: () => Promise<T>) => [...disks.values()].reduce<() => Promise<T>>((inner, writes) => () => writes.hold(inner), capture)());

  const checkTimer = setInterval(() => {
    const ids = [...new Set([...connections].flatMap((c) => (c.export ? [c.export.id] : [])))];
    if (!ids.length) return;
    services.nbd
      .live(ds.manager, ids)
      .then((live) => revoke(ids.filter((id) => !live.has(id))))
      .catch((err: Error) => logger.warn("checking NBD exports failed", { error: err.message }));
  }, REVOKE_CHECK_MS);
  checkTimer.unref();

  /** Every connection, in its handshake or not. */
  const all = new Set<NbdConnection>();
  const server = net.createServer((socket) => {
    socket.setNoDelay(true);
    accepted.inc();
    opened.inc();
    const conn = new NbdConnection(socket, host);
    all.add(conn);
    void conn.serve().finally(() => {
      opened.dec();
      all.delete(conn);
    });
  });
  await new Promise<void>((resolve, reject) => {
    // A port in use is the operator's to change: the error names the settings.
    server.once("error", (err) => reject(Object.assign(err, { settings: "NBD_HOST or NBD_PORT; NBD_PORT=0 turns NBD off" })));
    server.listen(config.nbdPort, config.nbdHost, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as net.AddressInfo).port;
  logger.info("nbd listening", { host: config.nbdHost, port, tls: Boolean(host.tls), tlsRequired: Boolean(host.tls?.required) });

  return {
    port,
    async close() {
      clearInterval(checkTimer);
      unregister();
      unwatch();
      services.nbd.onRevoke = null;
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const c of all) c.close();
      });
    },
  };
}
