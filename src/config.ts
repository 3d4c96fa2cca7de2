import os from "node:os";
import path from "node:path";

export interface S3Config {
  bucket: string;
  endpoint?: string;
  region: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  forcePathStyle: boolean;
}

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  /** Set when an external Postgres is used; embedded Postgres otherwise. */
  databaseUrl?: string;
  /** A statement that runs longer is cancelled, by Postgres and, should Postgres not answer at all, by the client. */
  dbStatementTimeoutSeconds: number;
  /** Longest wait for a database connection, from the pool or a new one. */
  dbAcquireTimeoutSeconds: number;
  corsOrigins: string[];
  maxQueryDepth: number;
  maxQueryCost: number;
  maxPageSize: number;
  /** Aliased fields one operation may run, fragments counted where they are spread. */
  maxQueryAliases: number;
  /** Tokens a GraphQL document may have: parsing stops there, before validation walks a huge document. */
  maxQueryTokens: number;
  maxMutationsPerRequest: number;
  /** Per project and process, refilled continuously (0: no limit); `mutationBurst` is the bucket's size. */
  mutationsPerMinute: number;
  mutationBurst: number;
  wsMaxPayloadBytes: number;
  wsMaxConnectionsPerAddress: number;
  /** A WebSocket that has not sent connection_init this long after opening is closed. */
  wsAuthTimeoutSeconds: number;
  maxDiskBytes: number;
  s3?: S3Config;
  /** Where disk blocks and vault packs live: the local filesystem or the S3 bucket. */
  volumeBackend: "fs" | "s3";
  vaultBackend: "fs" | "s3";
  jobConcurrency: number;
  /** A running job whose process has been silent this long is failed. */
  jobStaleSeconds: number;
  /** Blobs written but never committed are deleted by garbage collection once this old. */
  gcGraceSeconds: number;
  gcIntervalSeconds: number;
  /** How often compaction reclaims overwritten disk blocks and what failed jobs wrote (0: never, in this process). */
  compactIntervalSeconds: number;
  /** Worker threads compressing vault chunks beside the main thread (0: the main thread alone). */
  codecThreads: number;
  /** Decompressed vault chunks kept for backups and images read as they are (over NBD). */
  vaultCacheBytes: number;
  /** How often the policy scheduler looks for due policies (0: never, in this process). */
  schedulerIntervalSeconds: number;
  /** Largest image file POST /v1/uploads takes. */
  uploadMaxBytes: number;
  uploadTtlSeconds: number;
  exportTtlSeconds: number;
  /** Largest virtual disk an imported image may describe. */
  maxImageVirtualBytes: number;
  /** Below this much free space where local blobs live, writes and the jobs that write are refused (0: never). */
  minFreeBytes: number;
  logLevel: "debug" | "info" | "warn" | "error";
  /** When set, GET /metrics wants it as a bearer token, and shows GraphQL operation names. */
  metricsToken?: string;
  /** Where disks are served over NBD; port 0: not at all. */
  nbdHost: string;
  nbdPort: number;
  /** The host NBD URIs name (NBD_PUBLIC_HOST; else NBD_HOST, or this machine's name when that is a wildcard). */
  nbdPublicHost: string;
  /** TLS for NBD (NBD_OPT_STARTTLS): a certificate (chain) and its key, PEM. Required off loopback. */
  nbdTls?: { certFile: string; keyFile: string };
  /** Acknowledged NBD writes held in memory before their commit, over every disk of the process; a disk takes at most half. */
  nbdWriteBufferBytes: number;
  /** Acknowledged NBD writes are committed into the disk's blocks at most this long after the first of a batch. */
  nbdCommitDelayMs: number;
}

export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

function int(env: Env, name: string, fallback: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be an integer between ${min} and ${max}, got "${raw}"`);
  }
  return value;
}

function bool(env: Env, name: string, fallback: boolean): boolean {
  const raw = env[name];
  if (raw === undefined || raw === "") return fallback;
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${name} must be true or false, got "${raw}"`);
}

/** Reads and validates the configuration once; everything else receives the result. */
export function loadConfig(env: Env = process.env): Config {
  const logLevel = (env.LOG_LEVEL || "info") as Config["logLevel"];
  if (!["debug", "info", "warn", "error"].includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of debug, info, warn, error, got "${env.LOG_LEVEL}"`);
  }
  const s3 = env.S3_BUCKET
    ? {
        bucket: env.S3_BUCKET,
        endpoint: env.S3_ENDPOINT || undefined,
        region: env.S3_REGION || "us-east-1",
        accessKeyId: env.S3_ACCESS_KEY_ID || undefined,
        secretAccessKey: env.S3_SECRET_ACCESS_KEY || undefined,
        forcePathStyle: bool(env, "S3_FORCE_PATH_STYLE", Boolean(env.S3_ENDPOINT)),
      }
    : undefined;
  const backend = (name: string): "fs" | "s3" => {
    const value = env[name] || (s3 ? "s3" : "fs");
    if (value !== "fs" && value !== "s3") throw new ConfigError(`${name} must be fs or s3, got "${value}"`);
    if (value === "s3" && !s3) throw new ConfigError(`${name}=s3 needs S3_BUCKET`);
    return value;
  };
  const maxMutationsPerRequest = int(env, "MAX_MUTATIONS_PER_REQUEST", 10, 1, 1000);
  const mutationsPerMinute = int(env, "MUTATIONS_PER_MINUTE", 600, 0, 1_000_000);
  const mutationBurst = int(env, "MUTATION_BURST", Math.max(100, maxMutationsPerRequest), 1, 1_000_000);
  // A request of the largest allowed size must fit in a full bucket, or it could never run.
  if (mutationsPerMinute > 0 && mutationBurst < maxMutationsPerRequest) {
    throw new ConfigError(`MUTATION_BURST (${mutationBurst}) must be at least MAX_MUTATIONS_PER_REQUEST (${maxMutationsPerRequest})`);
  }
  const metricsToken = env.METRICS_TOKEN || undefined;
  const nbd = nbdConfig(env);
  // A header cannot carry such a token, so /metrics would refuse everyone.
  if (metricsToken && !/^[\x21-\x7e]+$/.test(metricsToken)) throw new ConfigError("METRICS_TOKEN must be printable ASCII without spaces");
  return {
    host: env.HOST || "127.0.0.1",
    port: int(env, "PORT", 4000, 0, 65535),
    dataDir: path.resolve(env.STOWAGE_DATA_DIR || ".data"),
    databaseUrl: env.DATABASE_URL || undefined,
    dbStatementTimeoutSeconds: int(env, "DB_STATEMENT_TIMEOUT_SECONDS", 300, 1, 86400),
    dbAcquireTimeoutSeconds: int(env, "DB_ACQUIRE_TIMEOUT_SECONDS", 10, 1, 3600),
    corsOrigins: (env.CORS_ORIGINS || "")
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean),
    maxQueryDepth: int(env, "MAX_QUERY_DEPTH", 12, 2, 100),
    maxQueryCost: int(env, "MAX_QUERY_COST", 50_000, 10, 100_000_000),
    maxPageSize: int(env, "MAX_PAGE_SIZE", 100, 1, 10_000),
    maxQueryAliases: int(env, "MAX_QUERY_ALIASES", 200, 1, 100_000),
    maxQueryTokens: int(env, "MAX_QUERY_TOKENS", 10_000, 100, 1_000_000),
    maxMutationsPerRequest,
    mutationsPerMinute,
    mutationBurst,
    wsMaxPayloadBytes: int(env, "WS_MAX_PAYLOAD_BYTES", 64 * 1024, 1024, 64 * 2 ** 20),
    wsMaxConnectionsPerAddress: int(env, "WS_MAX_CONNECTIONS_PER_ADDRESS", 32, 1, 100_000),
    wsAuthTimeoutSeconds: int(env, "WS_AUTH_TIMEOUT_SECONDS", 5, 1, 3600),
    maxDiskBytes: int(env, "MAX_DISK_BYTES", 64 * 2 ** 40, 2 ** 20, Number.MAX_SAFE_INTEGER),
    s3,
    volumeBackend: backend("VOLUME_BACKEND"),
    vaultBackend: backend("VAULT_BACKEND"),
    jobConcurrency: int(env, "JOB_CONCURRENCY", 2, 1, 64),
    jobStaleSeconds: int(env, "JOB_STALE_SECONDS", 30, 2, 3600),
    gcGraceSeconds: int(env, "GC_GRACE_SECONDS", 3600, 0, 30 * 86400),
    gcIntervalSeconds: int(env, "GC_INTERVAL_SECONDS", 3600, 0, 30 * 86400),
    compactIntervalSeconds: int(env, "COMPACT_INTERVAL_SECONDS", 60, 0, 86400),
    schedulerIntervalSeconds: int(env, "SCHEDULER_INTERVAL_SECONDS", 5, 0, 3600),
    codecThreads: int(env, "CODEC_THREADS", os.availableParallelism(), 0, 64),
    vaultCacheBytes: int(env, "VAULT_CACHE_BYTES", 64 * 1024 * 1024, 0, 2 ** 40),
    uploadMaxBytes: int(env, "UPLOAD_MAX_BYTES", 64 * 2 ** 30, 512, Number.MAX_SAFE_INTEGER),
    uploadTtlSeconds: int(env, "UPLOAD_TTL_SECONDS", 86400, 60, 365 * 86400),
    exportTtlSeconds: int(env, "EXPORT_TTL_SECONDS", 86400, 1, 365 * 86400),
    maxImageVirtualBytes: int(env, "MAX_IMAGE_VIRTUAL_BYTES", int(env, "MAX_DISK_BYTES", 64 * 2 ** 40, 2 ** 20, Number.MAX_SAFE_INTEGER), 2 ** 20, Number.MAX_SAFE_INTEGER),
    minFreeBytes: int(env, "MIN_FREE_BYTES", 2 ** 30, 0, Number.MAX_SAFE_INTEGER),
    logLevel,
    metricsToken,
    ...nbd,
  };
}

const LOOPBACK = /^(127\.\d+\.\d+\.\d+|::1|localhost)$/;

function nbdConfig(env: Env): Pick<Config, "nbdHost" | "nbdPort" | "nbdPublicHost" | "nbdTls" | "nbdWriteBufferBytes" | "nbdCommitDelayMs"> {
  const nbdHost = env.NBD_HOST || "127.0.0.1";
  const nbdPort = int(env, "NBD_PORT", 10809, 0, 65535);
  const certFile = env.NBD_TLS_CERT || undefined;
  const keyFile = env.NBD_TLS_KEY || undefined;
  if (Boolean(certFile) !== Boolean(keyFile)) throw new ConfigError("NBD_TLS_CERT and NBD_TLS_KEY go together");
  const nbdTls = certFile && keyFile ? { certFile, keyFile } : undefined;
  // An export name is a capability: sent in clear over a network, anyone on the path could use it.
  if (nbdPort !== 0 && !nbdTls && !LOOPBACK.test(nbdHost)) {
    throw new ConfigError(`NBD_HOST=${nbdHost} is not a loopback address: NBD needs TLS there (NBD_TLS_CERT and NBD_TLS_KEY), or NBD_PORT=0 to turn it off`);
  }
  const wildcard = nbdHost === "0.0.0.0" || nbdHost === "::";
  return {
    nbdHost,
    nbdPort,
    nbdPublicHost: env.NBD_PUBLIC_HOST || (wildcard ? os.hostname() : nbdHost),
    nbdTls,
    nbdWriteBufferBytes: int(env, "NBD_WRITE_BUFFER_BYTES", 32 * 2 ** 20, 4 * 2 ** 20, 64 * 2 ** 30),
    nbdCommitDelayMs: int(env, "NBD_COMMIT_DELAY_MS", 200, 1, 3_600_000),
  };
}
