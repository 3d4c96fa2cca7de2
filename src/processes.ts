import fs from "node:fs";

/**
 * True when process `pid` runs. A process killed a moment ago stays a zombie until
 * its parent reaps it, and signal 0 still reaches a zombie: where /proc tells, a
 * zombie counts as dead.
 */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch (err) {
    // Gone meanwhile; or no /proc (macOS), where signal 0 is all there is to go by.
    return (err as NodeJS.ErrnoException).code !== "ENOENT" || !fs.existsSync("/proc/self/stat");
  }
  // "pid (comm) state …": comm may hold spaces and parentheses, the state follows the last ")".
  const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  return state !== "Z" && state !== "X";
}
