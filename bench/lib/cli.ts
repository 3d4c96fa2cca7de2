import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { BLOCK, GiB, MiB } from "./image";

/** A size such as 1G, 512M, 4GiB; at least 16 MiB and on the 64 KiB grid. */
export function parseSize(s: string, flag = "--size"): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(s.trim());
  if (!m) throw new Error(`${flag}: cannot read "${s}" (examples: 1G, 4G, 512M)`);
  const unit = { "": GiB, K: 1024, M: MiB, G: GiB, T: 1024 * GiB }[m[2].toUpperCase() as "" | "K" | "M" | "G" | "T"];
  const bytes = Math.round(Number(m[1]) * unit);
  if (bytes < 16 * MiB || bytes % BLOCK !== 0) throw new Error(`${flag} must be at least 16 MiB and a multiple of 64 KiB, got ${s}`);
  return bytes;
}

/** An integer option's value, at least `min`. */
export function int(value: string | undefined, flag: string, fallback: number, min = 1): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < min) throw new Error(`${flag} must be an integer ≥ ${min}, got ${value}`);
  return n;
}

type Options = NonNullable<ParseArgsConfig["options"]>;

/**
 * `node:util` parseArgs, strict, with `--help` printing the header comment of
 * `file`. A flag in `bare` may be given without a value (`--dist`, `--memory`):
 * alone it stands for the value given there.
 */
export function parseFlags<O extends Options>(file: string, argv: string[], options: O, bare: Record<string, string> = {}): Flags<O> {
  const args = argv.map((a) => (a.startsWith("--") && a.slice(2) in bare ? `${a}=${bare[a.slice(2)]}` : a));
  const { values } = parseArgs({ args, options: { ...options, help: { type: "boolean", short: "h" } }, strict: true, allowPositionals: false }) as {
    values: Record<string, string | boolean | undefined>;
  };
  if (values.help) {
    process.stdout.write(fs.readFileSync(file, "utf8").split("*/")[0] + "*/\n");
    process.exit(0);
  }
  return values as Flags<O>;
}

/** The values parseArgs gives for `O`: booleans for flags, strings for the rest; undefined when absent. */
export type Flags<O extends Options> = { [K in keyof O]?: O[K] extends { type: "boolean" } ? boolean : string };

/** The options the backup and image benchmarks share. */
export const COMMON_FLAGS = {
  size: { type: "string" },
  keep: { type: "boolean" },
  dir: { type: "string" },
  seed: { type: "string" },
  runs: { type: "string" },
  "cpu-prof": { type: "boolean" },
  dist: { type: "string" },
} as const;

/** `--dist` alone: the build `npm run build` makes. */
export const BARE_DIST = { dist: path.join(__dirname, "..", "..", "dist") };

export interface CommonOptions {
  size: number;
  keep: boolean;
  dir: string;
  seed: number;
  runs: number;
  cpuProf: boolean;
  /** A compiled build's root (its src/main.js runs) instead of ts-node, or null. */
  dist: string | null;
}

/** The shared options' values, with their defaults (BENCH_SIZE_GIB sets the default size). */
export function commonOptions(v: { size?: string; keep?: boolean; dir?: string; seed?: string; runs?: string; "cpu-prof"?: boolean; dist?: string }): CommonOptions {
  const seed = v.seed === undefined ? 42 : Number(v.seed);
  if (!Number.isInteger(seed)) throw new Error("--seed must be an integer");
  return {
    size: v.size !== undefined ? parseSize(v.size) : process.env.BENCH_SIZE_GIB ? parseSize(`${process.env.BENCH_SIZE_GIB}G`) : GiB,
    keep: v.keep ?? false,
    dir: v.dir ?? os.tmpdir(),
    seed,
    runs: int(v.runs, "--runs", 1),
    cpuProf: v["cpu-prof"] ?? false,
    dist: v.dist === undefined ? null : path.resolve(v.dist),
  };
}

/** Runs a benchmark's main and exits with its code; a failure prints its stack (or message) and exits 1. */
export function runBench(main: () => Promise<number>): void {
  main().then(
    (code) => process.exit(code),
    (err) => {
      process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
