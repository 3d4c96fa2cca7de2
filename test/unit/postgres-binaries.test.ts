/**
 * What the postgres user can reach, and the copy of the binaries made for it: on
 * real directories, with a small installation shaped like the package's
 * (bin/, lib/ with links, share/).
 */
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { blockedAt, cachedCopy, checkExecutables, EmbeddedPostgresError, type PostgresInstall } from "../../src/db/postgres-binaries";
import { silentLogger } from "../../src/logger";

let tmp: string;
let source: PostgresInstall;
let cacheRoot: string;

const sha = (file: string) => crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");

/** Replaces a file by a new one (a new inode), as a reinstall does. */
function rewrite(file: string, content: string | Buffer, mode: number) {
  fs.writeFileSync(file + ".new", content, { mode });
  fs.chmodSync(file + ".new", mode);
  fs.renameSync(file + ".new", file);
}

function makeInstall(dir: string) {
  fs.mkdirSync(path.join(dir, "bin"), { recursive: true });
  fs.mkdirSync(path.join(dir, "lib", "postgresql"), { recursive: true });
  fs.mkdirSync(path.join(dir, "share", "postgresql"), { recursive: true });
  fs.writeFileSync(path.join(dir, "bin", "postgres"), "#!/bin/sh\necho postgres\n", { mode: 0o700 });
  fs.writeFileSync(path.join(dir, "bin", "initdb"), "#!/bin/sh\necho initdb\n", { mode: 0o700 });
  fs.writeFileSync(path.join(dir, "lib", "libpq.so.5.18"), crypto.randomBytes(3000), { mode: 0o700 });
  fs.symlinkSync("libpq.so.5.18", path.join(dir, "lib", "libpq.so.5"));
  fs.writeFileSync(path.join(dir, "lib", "postgresql", "plpgsql.so"), crypto.randomBytes(2000), { mode: 0o600 });
  fs.writeFileSync(path.join(dir, "share", "postgresql", "postgresql.conf.sample"), "# sample\n", { mode: 0o600 });
}

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-pgbin-"));
  fs.chmodSync(tmp, 0o755);
  source = { dir: path.join(tmp, "home", "checkout", "native"), version: "18.4.0-test" };
  makeInstall(source.dir);
  fs.chmodSync(path.join(tmp, "home"), 0o700);
  cacheRoot = path.join(tmp, "cache");
});

afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

const files = ["bin/postgres", "bin/initdb", "lib/libpq.so.5.18", "lib/postgresql/plpgsql.so", "share/postgresql/postgresql.conf.sample"];

describe("blockedAt", () => {
  const stranger = { uid: 4242, gid: 4242 };

  it("names the first directory the user may not pass, judging a missing target by what exists", () => {
    const target = path.join(source.dir, "bin");
    expect(blockedAt(target, stranger)).toBe(fs.realpathSync(path.join(tmp, "home")));
    expect(blockedAt(path.join(target, "not", "yet"), stranger)).toBe(fs.realpathSync(path.join(tmp, "home")));
    fs.chmodSync(path.join(tmp, "home"), 0o711); // search without listing is enough
    expect(blockedAt(target, stranger)).toBeUndefined();
    fs.chmodSync(path.join(tmp, "home", "checkout"), 0o750);
    expect(blockedAt(target, stranger)).toBe(fs.realpathSync(path.join(tmp, "home", "checkout")));
  });

  it("applies the owner's bits to the owner and the group's to the group, as the kernel does", () => {
    const home = path.join(tmp, "home");
    const st = fs.statSync(home);
    fs.chmodSync(home, 0o700);
    expect(blockedAt(source.dir, { uid: st.uid, gid: 4242 })).toBeUndefined();
    expect(blockedAt(source.dir, { uid: 4242, gid: st.gid })).toBe(fs.realpathSync(home));
    fs.chmodSync(home, 0o010);
    expect(blockedAt(source.dir, { uid: 4242, gid: st.gid })).toBeUndefined();
    // The owner gets the owner's bits only, even where others have more.
    fs.chmodSync(home, 0o011);
    expect(blockedAt(source.dir, { uid: st.uid, gid: 4242 })).toBe(fs.realpathSync(home));
    fs.chmodSync(home, 0o700);
  });
});

describe("checkExecutables", () => {
  it("fails with one line naming the chmod when a program lost its executable bit", () => {
    expect(() => checkExecutables(source.dir)).not.toThrow();
    fs.chmodSync(path.join(source.dir, "bin", "initdb"), 0o644);
    expect(() => checkExecutables(source.dir)).toThrow(EmbeddedPostgresError);
    expect(() => checkExecutables(source.dir)).toThrow(`chmod +x ${path.join(source.dir, "bin")}/*`);
    fs.rmSync(path.join(source.dir, "bin", "initdb"));
    expect(() => checkExecutables(source.dir)).toThrow(/initdb is missing.*npm ci/);
  });
});

describe("cachedCopy", () => {
  it("copies the installation once, readable and runnable by anyone, links kept, the package's modes untouched", async () => {
    const dir = await cachedCopy(source, cacheRoot, silentLogger);
    expect(path.dirname(dir)).toBe(cacheRoot);
    expect(path.basename(dir)).toMatch(new RegExp(`^postgres-18\\.4\\.0-test-${process.platform}-${process.arch}-[0-9a-f]{16}$`));
    for (const f of files) expect(sha(path.join(dir, f))).toBe(sha(path.join(source.dir, f)));
    expect(fs.statSync(path.join(dir, "bin", "postgres")).mode & 0o777).toBe(0o755);
    expect(fs.statSync(path.join(dir, "lib", "libpq.so.5.18")).mode & 0o777).toBe(0o755);
    expect(fs.statSync(path.join(dir, "lib", "postgresql", "plpgsql.so")).mode & 0o777).toBe(0o644);
    expect(fs.statSync(path.join(dir, "lib", "postgresql")).mode & 0o777).toBe(0o755);
    expect(fs.readlinkSync(path.join(dir, "lib", "libpq.so.5"))).toBe("libpq.so.5.18");
    expect(fs.statSync(path.join(source.dir, "bin", "postgres")).mode & 0o777).toBe(0o700);
    expect(fs.statSync(path.join(tmp, "home")).mode & 0o777).toBe(0o700);
    expect(fs.readdirSync(cacheRoot)).toEqual([path.basename(dir)]); // no build leftovers

    // Used again as it is: nothing rewritten.
    const ino = fs.statSync(path.join(dir, "bin", "postgres")).ino;
    expect(await cachedCopy(source, cacheRoot, silentLogger)).toBe(dir);
    expect(fs.statSync(path.join(dir, "bin", "postgres")).ino).toBe(ino);
  });

  it("replaces a copy that was changed, loosened or added to", async () => {
    const dir = await cachedCopy(source, cacheRoot, silentLogger);
    const postgres = path.join(dir, "bin", "postgres");
    const tampers: [string, () => void][] = [
      ["content written in place", () => fs.appendFileSync(postgres, "rm -rf /\n")],
      ["a file writable by others", () => fs.chmodSync(path.join(dir, "share", "postgresql", "postgresql.conf.sample"), 0o666)],
      ["a directory writable by others", () => fs.chmodSync(path.join(dir, "lib", "postgresql"), 0o777)],
      ["a library added", () => fs.writeFileSync(path.join(dir, "lib", "postgresql", "evil.so"), "x", { mode: 0o644 })],
      ["a link retargeted", () => (fs.rmSync(path.join(dir, "lib", "libpq.so.5")), fs.symlinkSync("/etc/passwd", path.join(dir, "lib", "libpq.so.5")))],
      ["a file removed", () => fs.rmSync(path.join(dir, "lib", "postgresql", "plpgsql.so"))],
    ];
    for (const [what, tamper] of tampers) {
      tamper();
      expect([what, await cachedCopy(source, cacheRoot, silentLogger)]).toEqual([what, dir]);
      for (const f of files) expect([what, f, sha(path.join(dir, f))]).toEqual([what, f, sha(path.join(source.dir, f))]);
      expect(fs.existsSync(path.join(dir, "lib", "postgresql", "evil.so"))).toBe(false);
      expect(fs.statSync(path.join(dir, "share", "postgresql", "postgresql.conf.sample")).mode & 0o777).toBe(0o644);
      expect(fs.statSync(path.join(dir, "lib", "postgresql")).mode & 0o777).toBe(0o755);
      expect(fs.readlinkSync(path.join(dir, "lib", "libpq.so.5"))).toBe("libpq.so.5.18");
      expect(fs.readdirSync(cacheRoot)).toEqual([path.basename(dir)]);
    }
  });

  it("does not use a copy of other content when the package changed, and leaves that copy alone", async () => {
    const first = await cachedCopy(source, cacheRoot, silentLogger);
    const firstSha = sha(path.join(first, "bin", "postgres"));
    rewrite(path.join(source.dir, "bin", "postgres"), "#!/bin/sh\necho newer postgres\n", 0o755);
    const second = await cachedCopy(source, cacheRoot, silentLogger);
    expect(second).not.toBe(first);
    expect(sha(path.join(second, "bin", "postgres"))).toBe(sha(path.join(source.dir, "bin", "postgres")));
    // The first copy may still be running elsewhere: untouched.
    expect(sha(path.join(first, "bin", "postgres"))).toBe(firstSha);

    // An executable bit is content too.
    fs.chmodSync(path.join(source.dir, "share", "postgresql", "postgresql.conf.sample"), 0o755);
    const third = await cachedCopy(source, cacheRoot, silentLogger);
    expect(third).not.toBe(second);
    expect(fs.statSync(path.join(third, "share", "postgresql", "postgresql.conf.sample")).mode & 0o777).toBe(0o755);
  });

  it("uses the copy for another install of the same files (new inodes and times), found by content", async () => {
    const dir = await cachedCopy(source, cacheRoot, silentLogger);
    const ino = fs.statSync(path.join(dir, "bin", "initdb")).ino;
    const other: PostgresInstall = { dir: path.join(tmp, "other", "native"), version: source.version };
    fs.cpSync(source.dir, other.dir, { recursive: true, verbatimSymlinks: true });
    expect(await cachedCopy(other, cacheRoot, silentLogger)).toBe(dir);
    expect(fs.statSync(path.join(dir, "bin", "initdb")).ino).toBe(ino);
  });

  it("refuses a package with a link leading out of it, a cache directory others can write, and one that cannot be made", async () => {
    fs.symlinkSync("../../../../etc", path.join(source.dir, "lib", "etc"));
    await expect(cachedCopy(source, cacheRoot, silentLogger)).rejects.toThrow(/link leading out of it/);
    fs.rmSync(path.join(source.dir, "lib", "etc"));

    fs.chmodSync(cacheRoot, 0o777);
    await expect(cachedCopy(source, cacheRoot, silentLogger)).rejects.toThrow(/no one else can write/);
    expect(fs.readdirSync(cacheRoot)).toEqual([]);

    // Where the copy cannot go at all, the message names the way out.
    fs.writeFileSync(path.join(tmp, "a-file"), "");
    await expect(cachedCopy(source, path.join(tmp, "a-file", "cache"), silentLogger)).rejects.toThrow(/could not be created to copy them to \(ENOTDIR\).*DATABASE_URL/);
  });
});
