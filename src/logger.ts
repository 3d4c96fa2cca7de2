import { isUuid, toGlobalId, type NodeType } from "./services/global-id";

export type LogLevel = "debug" | "info" | "warn" | "error";

const order: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
}

/**
 * Fields that name a resource. Callers pass the row's id and the line carries the
 * global ID the API takes (node(id:), cancelJob), so an operator can paste it; an
 * upload's API ID is its row id (`upload`, not encoded).
 */
const RESOURCE_KEYS: Record<string, NodeType> = { job: "Job", backup: "Backup", disk: "Disk", server: "Server", image: "Image", export: "ImageExport", policy: "Policy", project: "Project" };

function field(key: string, value: unknown): unknown {
  if (value instanceof Error) return { name: value.name, message: value.message, stack: value.stack };
  if (typeof value === "string" && Object.hasOwn(RESOURCE_KEYS, key) && isUuid(value)) return toGlobalId(RESOURCE_KEYS[key], value);
  return value;
}

/** One JSON object per line on stderr, so stdout stays free for command output (keys, schema). */
export function createLogger(level: LogLevel = "info", sink: (line: string) => void = (l) => process.stderr.write(l + "\n")): Logger {
  const emit = (lvl: LogLevel, msg: string, fields?: Record<string, unknown>) => {
    if (order[lvl] < order[level]) return;
    const extra: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(fields ?? {})) extra[k] = field(k, v);
    sink(JSON.stringify({ time: new Date().toISOString(), level: lvl, msg, ...extra }));
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
  };
}

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };
