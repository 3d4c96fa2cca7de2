import { MiB } from "./image";

/** Progress lines go to stderr; the report alone goes to stdout. */
export const log = (msg: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

export const mib = (b: number) => b / MiB;
export const f2 = (n: number | null | undefined) => (n === null || n === undefined || !Number.isFinite(n) ? "n/a" : n.toFixed(2));
export const fmtInt = (n: number) => n.toLocaleString("en-US");

export const ratioOf = (a: number | null | undefined, b: number | null | undefined): number | null => (a == null || b == null || !b ? null : a / b);
/** A ratio as `0.45×`. */
export const x = (v: number | null, digits = 2) => (v === null ? "n/a" : `${v.toFixed(digits)}×`);
export const verdict = (ok: boolean | null) => (ok === null ? "n/a " : ok ? "PASS" : "MISS");

export const median = (xs: (number | null)[]): number | null => {
  const v = xs.filter((n): n is number => n !== null && Number.isFinite(n)).sort((a, b) => a - b);
  if (!v.length) return null;
  return v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
};

export const maxOf = (xs: (number | null)[]): number | null => {
  const v = xs.filter((n): n is number => n !== null);
  return v.length ? Math.max(...v) : null;
};

/** A markdown table: a header row, the alignment row (first column left, the rest right), the rows. */
export function table(header: string[], rows: string[][]): string[] {
  return [`| ${header.join(" | ")} |`, `| ${header.map((_, i) => (i ? "---:" : "---")).join(" | ")} |`, ...rows.map((r) => `| ${r.join(" | ")} |`)];
}

/** Stowage's time for some work against a peer program doing the same work in the same run. */
export interface SpeedTarget {
  name: string;
  stowage: number | null;
  /** What the peer ran, e.g. "`restic restore`, then `sync`". */
  peerName: string;
  peer: number | null;
  /** The largest ratio Stowage/peer that passes. */
  max: number;
}

/** The speed targets as a table: both times, their ratio, the target and PASS/MISS. */
export function targetTable(targets: SpeedTarget[]): string[] {
  return table(
    ["speed target", "Stowage (s)", "peer", "peer (s)", "Stowage/peer", "target", ""],
    targets.map((t) => {
      const r = ratioOf(t.stowage, t.peer);
      return [t.name, f2(t.stowage), t.peerName, f2(t.peer), x(r), `≤ ${x(t.max, 1)}`, verdict(r === null ? null : r <= t.max)];
    }),
  );
}
