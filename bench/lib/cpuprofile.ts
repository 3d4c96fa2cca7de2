import fs from "node:fs";
import path from "node:path";

/**
 * Summaries of a V8 .cpuprofile (node --cpu-prof) sliced by time windows. The
 * profile's timestamps are CLOCK_MONOTONIC microseconds, the clock of
 * process.hrtime() in any process of the machine, so windows recorded by the
 * benchmark select the samples the service took during each phase.
 */

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface Window {
  label: string;
  startUs: number;
  endUs: number;
}

export interface WindowSummary {
  label: string;
  sampledMs: number;
  /** ms by self time: (idle), (garbage collector), (program), functions. */
  self: [string, number][];
  /** ms by inclusive time, for functions of the project (src/). */
  inclusive: [string, number][];
}

const root = path.join(__dirname, "..", "..");

function frameName(cf: CallFrame): string {
  if (!cf.url) return cf.functionName || "(anonymous)";
  let file = cf.url.replace(/^file:\/\//, "");
  if (file.startsWith(root + "/")) file = file.slice(root.length + 1);
  file = file.replace(/^.*node_modules\//, "~/");
  return `${cf.functionName || "(anonymous)"} ${file}:${cf.lineNumber + 1}`;
}

export function summarise(profileFile: string, windows: Window[], top = 12): WindowSummary[] {
  const p = JSON.parse(fs.readFileSync(profileFile, "utf8")) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const stackCache = new Map<number, string[]>();
  const projectStack = (id: number): string[] => {
    let s = stackCache.get(id);
    if (s) return s;
    const names = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const cf = byId.get(cur)!.callFrame;
      if (cf.url.includes("/src/") && !cf.url.includes("node_modules")) names.add(frameName(cf));
    }
    s = [...names];
    stackCache.set(id, s);
    return s;
  };

  return windows.map((w) => {
    const self = new Map<string, number>();
    const incl = new Map<string, number>();
    let t = p.startTime;
    let total = 0;
    for (let i = 0; i < p.samples.length; i++) {
      t += p.timeDeltas[i];
      if (t < w.startUs || t > w.endUs) continue;
      // A sample stands for the time until the next one.
      const dt = (i + 1 < p.timeDeltas.length ? p.timeDeltas[i + 1] : 0) / 1000;
      total += dt;
      const id = p.samples[i];
      const name = frameName(byId.get(id)!.callFrame);
      self.set(name, (self.get(name) ?? 0) + dt);
      for (const f of projectStack(id)) incl.set(f, (incl.get(f) ?? 0) + dt);
    }
    const sorted = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).slice(0, top);
    return { label: w.label, sampledMs: total, self: sorted(self), inclusive: sorted(incl) };
  });
}

/** The profile report every benchmark prints: a heading, then each window's self and inclusive time. */
export function profileLines(heading: string, profileFile: string, windows: Window[]): string[] {
  const out: string[] = ["", heading];
  for (const w of summarise(profileFile, windows)) {
    out.push("", `${w.label}: ${w.sampledMs.toFixed(0)} ms sampled`, "  self time:");
    for (const [n, ms] of w.self) out.push(`    ${ms.toFixed(0).padStart(7)} ms  ${n}`);
    out.push("  inclusive, project functions (synchronous stacks only):");
    for (const [n, ms] of w.inclusive) out.push(`    ${ms.toFixed(0).padStart(7)} ms  ${n}`);
  }
  return out;
}
