import fs from "node:fs";

/**
 * Outside programs some tests drive (chromium, qemu-img, restic). Missing ones fail
 * the test with the Debian package to install, unless STOWAGE_SKIP_EXTERNAL=1.
 */
export function requireProgram(paths: string[], debianPackage: string): string | null {
  const found = paths.find((p) => fs.existsSync(p));
  if (found) return found;
  if (process.env.STOWAGE_SKIP_EXTERNAL === "1") return null;
  throw new Error(`this test needs ${paths[0]}: install the Debian package "${debianPackage}" (apt-get install -y ${debianPackage}), or set STOWAGE_SKIP_EXTERNAL=1 to skip it on purpose`);
}
