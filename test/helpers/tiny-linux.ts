import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import { requireProgram } from "./external";

/**
 * A real Linux under qemu-system-x86_64 (TCG: no KVM needed) whose only disk is an NBD
 * export, for tests where a real kernel's block layer and file system must write a
 * Stowage disk. The kernel is the host's Debian cloud kernel; the root file system is
 * an initramfs built here from a static busybox, so nothing is downloaded and no
 * root privileges are needed (the cpio archive is written by hand, device nodes included).
 */

export interface LinuxVm {
  kernel: string;
  /** The base initramfs (gzip'd newc cpio): busybox, /init and the kernel modules it loads. */
  initrd: string;
  /** A temporary directory holding initrd and each boot's files. */
  dir: string;
  cleanup(): void;
}

/** What the script's exit status is printed after on the console; bootWithNbd looks for it. */
const EXIT_MARKER = "STOWAGE-VM-EXIT=";
/** The drivers the guest needs for a virtio disk holding ext2/ext4, by module name. */
const NEEDED_MODULES = ["virtio_pci", "virtio_blk", "ext4"];
const QEMU = ["/usr/bin/qemu-system-x86_64"];
const BUSYBOX = ["/bin/busybox", "/usr/bin/busybox"];

/**
 * /init: the guest's whole userspace. It runs the boot's /stowage/script.sh (added per
 * boot as a second cpio archive, which the kernel unpacks over the first), prints its
 * exit status after EXIT_MARKER and powers off; qemu runs with -no-reboot, so the
 * power-off (or a panic, with panic=-1) ends qemu.
 */
const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load-order); do
  case $m in
    *.xz) unxz -c /lib/modules/$m > /tmp/module.ko && insmod /tmp/module.ko ;;
    *) insmod /lib/modules/$m ;;
  esac || echo "stowage-vm: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  sh /stowage/script.sh
  echo "${EXIT_MARKER}$?"
else
  echo "stowage-vm: /dev/vda did not appear"
  echo "${EXIT_MARKER}125"
fi
sync
poweroff -f
`;

/**
 * Finds the Debian cloud kernel and qemu, and builds the base initramfs. Returns null when
 * something is missing and STOWAGE_SKIP_EXTERNAL=1; otherwise a missing program throws,
 * naming the Debian package to install.
 */
export function prepareLinux(): LinuxVm | null {
  const kernel = findKernel();
  const qemu = requireProgram(QEMU, "qemu-system-x86");
  const busybox = requireProgram(BUSYBOX, "busybox-static");
  if (!kernel || !qemu || !busybox) return null;
  if (!isStaticElf(busybox)) throw new Error(`${busybox} is dynamically linked and cannot run alone in an initramfs: install the Debian package "busybox-static"`);
  const version = path.basename(kernel).slice("vmlinuz-".length);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-linux-"));
  try {
    const initrd = path.join(dir, "initrd.gz");
    fs.writeFileSync(initrd, zlib.gzipSync(newc(baseEntries(busybox, version)), { level: 1 }));
    return { kernel, initrd, dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Boots the VM with `nbdUri` (e.g. nbd://127.0.0.1:10809/export) as its virtio disk
 * /dev/vda, runs `script` with busybox sh, powers off. Resolves with the console text.
 * Rejects, with the console's tail, when qemu fails, the time runs out (qemu is killed)
 * or the script did not report exit status 0.
 */
export async function bootWithNbd(vm: LinuxVm, nbdUri: string, script: string, opts: { timeoutMs?: number } = {}): Promise<string> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const bootDir = fs.mkdtempSync(path.join(vm.dir, "boot-"));
  try {
    const initrd = path.join(bootDir, "initrd.gz");
    fs.writeFileSync(initrd, Buffer.concat([fs.readFileSync(vm.initrd), zlib.gzipSync(newc([dirEntry("stowage"), fileEntry("stowage/script.sh", Buffer.from(script), 0o755)]))]));
    const { code, signal, timedOut, console: text, stderr } = await runQemu(qemuArgs(vm.kernel, initrd, nbdUri), timeoutMs);
    const tail = () => `console (last 4000 characters):\n${text.slice(-4000)}${stderr ? `\nqemu stderr:\n${stderr}` : ""}`;
    if (timedOut) throw new Error(`the VM did not power off within ${timeoutMs} ms; ${tail()}`);
    if (code !== 0) throw new Error(`qemu exited with ${code ?? signal}; ${tail()}`);
    const status = scriptStatus(text);
    if (status === null) throw new Error(`the VM stopped without reporting the script's exit status; ${tail()}`);
    if (status !== 0) throw new Error(`the script in the VM exited with ${status}; ${tail()}`);
    return text;
  } finally {
    fs.rmSync(bootDir, { recursive: true, force: true });
  }
}

/** The exit status after the last marker on the console, or null when there is none. */
function scriptStatus(text: string): number | null {
  const all = [...text.matchAll(new RegExp(`${EXIT_MARKER}(\\d+)`, "g"))];
  return all.length ? Number(all[all.length - 1][1]) : null;
}

/**
 * A lean machine for TCG (about 2 s from start to the script): no default devices (no NIC
 * means no option ROM and no network probing), one CPU, the serial port as the console on
 * stdout. TCG always, even where /dev/kvm exists, so timings and behaviour match CI.
 * cache=none: nothing cached in qemu between the guest and the NBD server, whose
 * flushes reach it as NBD flushes.
 */
function qemuArgs(kernel: string, initrd: string, nbdUri: string): string[] {
  return [
    ...["-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "256"],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"],
    ...["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"],
    ...["-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet"],
    ...["-drive", `file=${nbdUri},format=raw,if=virtio,cache=none`],
  ];
}

interface QemuResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  console: string;
  stderr: string;
}

/** Runs qemu to its end, or kills it (SIGKILL) after timeoutMs. */
function runQemu(args: string[], timeoutMs: number): Promise<QemuResult> {
  return new Promise((resolve, reject) => {
    // stdin stays an open pipe nobody writes: an end of file there is no business of the guest's.
    const child = spawn(QEMU[0], args, { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, timedOut, console: out.replace(/\r\n/g, "\n"), stderr: err });
    });
  });
}

/** The newest /boot/vmlinuz-*-cloud-amd64, or null when it is missing and skipping was asked for. */
function findKernel(): string | null {
  const kernels = fs.existsSync("/boot") ? fs.readdirSync("/boot").filter((f) => /^vmlinuz-.+-cloud-amd64$/.test(f)) : [];
  kernels.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  const kernel = requireProgram(kernels.length ? [path.join("/boot", kernels[kernels.length - 1])] : ["/boot/vmlinuz-*-cloud-amd64"], "linux-image-cloud-amd64");
  try {
    if (kernel) fs.accessSync(kernel, fs.constants.R_OK);
  } catch {
    throw new Error(`${kernel} is not readable by this user; qemu must read it to boot it`); // some distributions make it root's only
  }
  return kernel;
}

/** Whether an ELF executable has no program interpreter, so it runs without a dynamic loader and libc. */
function isStaticElf(file: string): boolean {
  const elf = fs.readFileSync(file);
  if (elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1) return false; // 64-bit little-endian ELF
  const phoff = Number(elf.readBigUInt64LE(0x20));
  const phentsize = elf.readUInt16LE(0x36);
  const phnum = elf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) if (elf.readUInt32LE(phoff + i * phentsize) === 3) return false; // PT_INTERP
  return true;
}

/** One file system object of a cpio archive. */
interface Entry {
  name: string;
  mode: number;
  data?: Buffer;
  rdev?: [number, number];
}

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

const dirEntry = (name: string): Entry => ({ name, mode: S_IFDIR | 0o755 });
const fileEntry = (name: string, data: Buffer, perm = 0o644): Entry => ({ name, mode: S_IFREG | perm, data });

/** busybox, /init, the mount points, /dev/console (the kernel opens it for init before devtmpfs is mounted) and the modules. */
function baseEntries(busybox: string, version: string): Entry[] {
  const modules = moduleFiles(version);
  const entries: Entry[] = [
    ...["bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/modules"].map(dirEntry),
    { name: "dev/console", mode: S_IFCHR | 0o600, rdev: [5, 1] },
    fileEntry("bin/busybox", fs.readFileSync(busybox), 0o755),
    { name: "bin/sh", mode: S_IFLNK | 0o777, data: Buffer.from("busybox") },
    fileEntry("init", Buffer.from(INIT), 0o755),
    fileEntry("lib/modules/load-order", Buffer.from(modules.map((m) => `${m.name}\n`).join(""))),
  ];
  for (const m of modules) entries.push(fileEntry(`lib/modules/${m.name}`, m.data));
  return entries;
}

/**
 * The module files NEEDED_MODULES take that the kernel does not have built in, dependencies
 * first (from modules.dep). .gz and .zst are decompressed here (zst only where node:zlib
 * can); .xz is left to the guest's busybox unxz, as Node has no xz.
 */
function moduleFiles(version: string): { name: string; data: Buffer }[] {
  const dir = path.join("/lib/modules", version);
  const read = (f: string) => (fs.existsSync(path.join(dir, f)) ? fs.readFileSync(path.join(dir, f), "utf8") : "");
  const builtin = new Set(read("modules.builtin").split("\n").map(moduleName));
  const deps = new Map<string, string[]>();
  for (const line of read("modules.dep").split("\n")) {
    const [file, rest] = line.split(":");
    if (rest !== undefined) deps.set(file, rest.trim().split(/\s+/).filter(Boolean));
  }
  const byName = new Map([...deps.keys()].map((f) => [moduleName(f), f]));
  const order: string[] = [];
  const visit = (file: string) => {
    if (order.includes(file)) return;
    for (const d of deps.get(file) ?? []) visit(d);
    order.push(file);
  };
  for (const name of NEEDED_MODULES) {
    if (builtin.has(name)) continue;
    const file = byName.get(name);
    if (!file) throw new Error(`the kernel ${version} has ${name} neither built in nor as a module in ${dir}: install the Debian package "linux-image-cloud-amd64"`);
    visit(file);
  }
  return order.map((file, i) => {
    const { name, data } = decompressModule(path.basename(file), fs.readFileSync(path.join(dir, file)));
    return { name: `${i}-${name}`, data };
  });
}

/** "kernel/drivers/block/virtio_blk.ko.xz" → "virtio_blk" (the kernel treats - and _ alike). */
function moduleName(file: string): string {
  return path
    .basename(file)
    .replace(/\.ko(\..*)?$/, "")
    .replace(/-/g, "_");
}

function decompressModule(name: string, data: Buffer): { name: string; data: Buffer } {
  if (name.endsWith(".gz")) return { name: name.slice(0, -3), data: zlib.gunzipSync(data) };
  if (name.endsWith(".zst")) {
    const zstd = (zlib as unknown as { zstdDecompressSync?: (b: Buffer) => Buffer }).zstdDecompressSync;
    if (!zstd) throw new Error(`${name} is zstd-compressed and this Node has no zlib.zstdDecompressSync (Node >= 22.15 has)`);
    return { name: name.slice(0, -4), data: zstd(data) };
  }
  return { name, data };
}

/**
 * A newc ("070701") cpio archive, the format the kernel unpacks an initramfs from:
 * a 110-byte header of 13 8-digit hex fields, the NUL-terminated name, the data, each
 * padded to 4 bytes; ended by an entry named TRAILER!!!.
 */
function newc(entries: Entry[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  let ino = 1;
  for (const e of [...entries, { name: "TRAILER!!!", mode: 0 }]) {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(`${e.name}\0`);
    const fields = [ino++, e.mode, 0, 0, (e.mode & 0o170000) === S_IFDIR ? 2 : 1, 0, data.length, 0, 0, e.rdev?.[0] ?? 0, e.rdev?.[1] ?? 0, name.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, "0")).join("")}`);
    parts.push(header, name, pad(header.length + name.length), data, pad(data.length));
  }
  return Buffer.concat(parts);
}

/** A guest script that makes an ext2 file system on /dev/vda and writes `content` to /file (base64 in a here-document), then syncs and unmounts. */
export function writeFileScript(content: Buffer): string {
  const b64 = content.toString("base64").replace(/.{1,76}/g, "$&\n");
  return ["set -e", "mke2fs -q /dev/vda", "mount -t ext2 /dev/vda /mnt", "base64 -d > /mnt/file <<'EOF'", b64 + "EOF", "sync", "umount /mnt", "echo wrote the file"].join("\n") + "\n";
}
