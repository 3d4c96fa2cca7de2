import fs from "node:fs";
import net from "node:net";
import type { Duplex } from "node:stream";
import tls from "node:tls";
import { Counter, Gauge, type Registry } from "prom-client";
import type { DataSource, QueryRunner } from "typeorm";
import type { Config } from "../config";
import type { Logger } from "../logger";
import type { Services } from "../services";
import type { OpenedExport } from "../services/nbd.service";
import { lockDisk } from "../storage/clones";
import { sourceBlocks } from "../storage/manifest";
import type { Vault } from "../storage/vault";
import { BLOCK_SIZE, type VolumeStore } from "../storage/volume-store";
import { AdvisoryLock } from "../db/locks";
import { NbdConnection, type ConnectionHost } from "./connection";
import { DiskWrites, WriteBudget, type BlockStore, type StoredBlock } from "./disk-writes";
import { DELETE_JOURNAL, postgresJournal, type WriteJournal } from "./journal";
import { VaultDevice, type ServedBytes } from "./vault-device";

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|::1|localhost)$/;

/** How often journals that no process owns are looked for. */
const JOURNAL_SWEEP_MS = 10_000;
/** How often the exports of open connections are checked (revoked in another process, or their disk deleted). */
const REVOKE_CHECK_MS = 1000;

export interface NbdServerDeps {
  config: Config;
  logger: Logger;
  ds: DataSource;
  services: Services;
  volumes: VolumeStore;
  vault: Vault;
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
    readVault: (projectId, hashes, ahead) => volumes.readVaultBlocks(projectId, hashes, ahead),
    restores: async (projectId, diskId) => (await services.nbd.writeState(ds.manager, projectId, diskId)).restores,
    // The segment is written and made durable beside the commit before it (which `after` ends); the disk's
    // lock is taken, and whether it may still be written checked, in the transaction that indexes it.
    commit: async (projectId, diskId, blocks, { journalUpTo, restores, source, after }) => {
      const stored: StoredBlock[] = [];
      await volumes.putBlocks(
        projectId,
        diskId,
        (async function* () {
          for (const [index, data] of blocks) yield { index, data };
        })(),
        {
          after,
          async begin(em) {
            await lockDisk(em, diskId);
            const state = await services.nbd.writeState(em, projectId, diskId);
            if (!state.writable) throw new Error("the disk is no longer writable (deleted, or being restored)");
            if (restores !== null && state.restores !== restores) throw new Error("the disk was restored after these writes were made: they are dropped");
          },
          finish: journalUpTo > 0 ? (em) => em.query(DELETE_JOURNAL, [diskId, journalUpTo]) : undefined,
          source,
          onStored(segmentId, indexes, offsets) {
            for (let k = 0; k < indexes.length; k++) stored.push({ index: indexes[k], segmentId: segmentId!, offset: offsets[k] });
          },
        },
      );
      return stored;
    },
  };
}

/**
 * Which disks' journals this process owns: a session-level advisory lock per disk, on
 * one connection kept for them, taken when the disk's writes start here and let go
 * when they end. A disk served by two processes at once is journaled by one; the
 * other commits on FLUSH. The locks are reentrant, so a disk whose writes end and
 * start again at once stays owned throughout.
 */
class JournalOwnership {
  private session: Promise<QueryRunner> | null = null;

  constructor(
    private readonly ds: DataSource,
    private readonly logger: Logger,
  ) {}

  private connect(): Promise<QueryRunner> {
    this.session ??= (async () => {
      const runner = this.ds.createQueryRunner();
      await runner.connect();
      return runner;
    })();
    return this.session;
  }

  /** True when this process now owns the disk's journal. */
  async take(diskId: string): Promise<boolean> {
    try {
      const [row] = await (await this.connect()).query(`SELECT pg_try_advisory_lock(${AdvisoryLock.NBD_JOURNAL}, hashtext($1)) AS ok`, [diskId]);
      return row.ok === true;
    } catch (err) {
      // Without the lock the disk's writes commit on FLUSH; a new session is tried next time.
      this.logger.warn("the NBD journal's lock could not be taken; FLUSH commits instead", { error: (err as Error).message, disk: diskId });
      this.session = null;
      return false;
    }
  }

  async release(diskId: string): Promise<void> {
    try {
      await (await this.connect()).query(`SELECT pg_advisory_unlock(${AdvisoryLock.NBD_JOURNAL}, hashtext($1))`, [diskId]);
    } catch {
      this.session = null; // the session is gone, and its locks with it
    }
  }

  /** False when the session holding the locks is gone (and the locks with it). */
  async alive(): Promise<boolean> {
    const session = this.session;
    if (!session) return false;
    try {
      await (await session).query(`SELECT 1`);
      return true;
    } catch {
      if (this.session === session) this.session = null;
      return false;
    }
  }

  async close(): Promise<void> {
    const session = this.session;
    this.session = null;
    if (session) await (await session.catch(() => null))?.release();
  }
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
  const journal: WriteJournal = postgresJournal(ds);
  const ownership = new JournalOwnership(ds, logger);
  /** Whether each disk's writes here own its journal. */
  const owned = new Map<DiskWrites, Promise<boolean>>();

  /** The shared writes of a disk in this process, started (its journal applied) the first time. */
  const acquire = (projectId: string, diskId: string, sizeBytes: number): DiskWrites => {
    let writes = disks.get(diskId);
    if (!writes) {
      writes = new DiskWrites(store, projectId, diskId, sizeBytes, budget, { diskBytes: Math.max(4 * BLOCK_SIZE, Math.floor(budget.total / 2)), delayMs: config.nbdCommitDelayMs });
      const taken = ownership.take(diskId);
      owned.set(writes, taken);
      void writes.start(taken.then((ok) => (ok ? journal : null)));
      disks.set(diskId, writes);
    }
    writes.users++;
    return writes;
  };
  /** One user fewer; the last lets the disk's writes (and its journal) go, once it has committed them. */
  const release = (writes: DiskWrites) => {
    if (--writes.users > 0 || disks.get(writes.diskId) !== writes) return;
    void writes.stop();
    disks.delete(writes.diskId);
    const taken = owned.get(writes);
    owned.delete(writes);
    void taken?.then((ok) => (ok ? ownership.release(writes.diskId) : undefined));
  };
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
    attach(conn: NbdConnection, exp: OpenedExport): ServedBytes {
      connections.add(conn);
      if (exp.diskId) return acquire(exp.projectId, exp.diskId, exp.sizeBytes);
      const source = exp.vault!;
      return new VaultDevice({
        refs: (first, last) => sourceBlocks(ds, source, first, last),
        read: (hashes, ahead) => deps.vault.blocks.read(exp.projectId, hashes, ahead),
      });
    },
    detach(conn: NbdConnection) {
      connections.delete(conn);
      if (conn.export && conn.writes instanceof DiskWrites) release(conn.writes);
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
  const unwatch = deps.volumes.onChange((diskId, source) => {
    const writes = disks.get(diskId);
    if (writes && writes !== source) writes.invalidate();
  });
  const unregister = services.backups.capture.register(<T>(capture: () => Promise<T>) => [...disks.values()].reduce<() => Promise<T>>((inner, writes) => () => writes.hold(inner), capture)());

  /** Disks whose journal this process owns stop journaling when the session holding their locks is gone: another process may take them now. */
  const checkOwnership = async () => {
    const mine = [];
    for (const [writes, taken] of owned) if (await taken) mine.push(writes);
    if (!mine.length || (await ownership.alive())) return;
    logger.warn("the NBD journal's locks were lost with their database session; FLUSH commits on these disks from now on", { disks: mine.map((w) => w.diskId) });
    for (const writes of mine) {
      writes.stopJournaling();
      owned.set(writes, Promise.resolve(false));
    }
  };
  const checkTimer = setInterval(() => {
    void checkOwnership().catch((err: Error) => logger.warn("checking the NBD journal's locks failed", { error: err.message }));
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

  // Journals no live process owns (a stopped one left them: a crash, or a commit that failed) are applied and
  // committed by whichever process takes them first: at start, then every JOURNAL_SWEEP_MS, so a disk's flushed
  // writes reach its blocks (and its backups) whether or not it is served again. A connection meanwhile waits.
  const applyLeft = async () => {
    // From the journal's side: it is nearly always empty, where the disks are many.
    const left: { id: string; project_id: string; size_bytes: string }[] = await ds.query(
      `SELECT d.id, d.project_id, d.size_bytes FROM (SELECT DISTINCT disk_id FROM nbd_journal) j JOIN disks d ON d.id = j.disk_id`,
    );
    for (const d of left) {
      if (disks.has(d.id)) continue; // served here: its own commits take the rows
      const writes = acquire(d.project_id, d.id, Number(d.size_bytes));
      try {
        const mine = await owned.get(writes);
        await writes.commitNow();
        if (mine) logger.info("nbd journal applied", { disk: d.id });
      } catch (err) {
        logger.warn("an NBD journal could not be applied; it is tried again later", { error: (err as Error).message, disk: d.id });
      } finally {
        release(writes);
      }
    }
  };
  let sweeping: Promise<void> | null = null;
  const sweep = () => {
    sweeping ??= applyLeft()
      .catch((err: Error) => logger.warn("looking for NBD journals failed", { error: err.message }))
      .finally(() => (sweeping = null));
  };
  sweep();
  const sweepTimer = setInterval(sweep, JOURNAL_SWEEP_MS);
  sweepTimer.unref();

  return {
    port,
    async close() {
      clearInterval(checkTimer);
      clearInterval(sweepTimer);
      unregister();
      unwatch();
      services.nbd.onRevoke = null;
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const c of all) c.close();
      });
      await sweeping;
      await ownership.close();
    },
  };
}
