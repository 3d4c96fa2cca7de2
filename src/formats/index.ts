import { openQcow2, writeQcow2 } from "./qcow2";
import { openRaw, writeRaw } from "./raw";
import { FormatError, type FormatLimits, type FormatName, type ImageReader, type ImageWriter, type RandomAccessSource } from "./types";
import { openVhd, writeVhd } from "./vhd";
import { openVmdk, writeVmdk } from "./vmdk";

export * from "./types";

/** Signatures of formats Stowage does not take, so they are refused by name instead of read as raw bytes. */
const REFUSED: [string, (head: Buffer) => boolean][] = [
  ["VHDX", (h) => h.subarray(0, 8).toString("latin1") === "vhdxfile"],
  ["VDI", (h) => h.subarray(0, 64).toString("latin1").includes("<<< ") && h.readUInt32LE(0x40) === 0xbeda107f],
  ["QED", (h) => h.subarray(0, 4).toString("latin1") === "QED\0"],
  ["LUKS (encrypted)", (h) => h.subarray(0, 6).equals(Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]))],
  ["a VMDK descriptor (it refers to other files)", (h) => /^\s*#\s*Disk DescriptorFile/.test(h.subarray(0, 64).toString("latin1"))],
];

/**
 * The format of a file from its own bytes: the qcow2 magic, the VMDK sparse
 * magic, the VHD footer cookie (of a 512- or 511-byte footer); a known but refused format by name; raw when
 * nothing matches.
 */
export async function detectFormat(src: RandomAccessSource): Promise<FormatName> {
  if (src.size === 0) throw new FormatError("the file is empty");
  const head = await src.read(0, Math.min(src.size, 512));
  if (head.length >= 4 && head.subarray(0, 4).equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]))) return "QCOW2";
  if (head.length >= 4 && head.subarray(0, 4).toString("latin1") === "KDMV") return "VMDK";
  if (src.size >= 512) {
    const tail = await src.read(src.size - 512, 512);
    // The footer's cookie ends the file 512 bytes before its end, or 511 (Virtual PC before 2004); a dynamic disk also starts with it.
    const cookie = (buf: Buffer, at: number) => buf.toString("latin1", at, at + 8) === "conectix";
    if (cookie(tail, 0) || cookie(tail, 1) || cookie(head, 0)) return "VHD";
  }
  for (const [name, matches] of REFUSED) {
    if (head.length >= 0x44 && matches(head)) throw new FormatError(`the file is ${name}, which cannot be imported; convert it to raw, qcow2, vmdk or vhd`);
  }
  return "RAW";
}

export async function openImage(format: FormatName, src: RandomAccessSource, limits: FormatLimits): Promise<ImageReader> {
  switch (format) {
    case "RAW":
      return openRaw(src, limits);
    case "QCOW2":
      return openQcow2(src, limits);
    case "VMDK":
      return openVmdk(src, limits);
    case "VHD":
      return openVhd(src, limits);
  }
}

export const WRITERS: Record<FormatName, ImageWriter> = { RAW: writeRaw, QCOW2: writeQcow2, VMDK: writeVmdk, VHD: writeVhd };

/** File name extension of an export. */
export const EXTENSIONS: Record<FormatName, string> = { RAW: "raw", QCOW2: "qcow2", VMDK: "vmdk", VHD: "vhd" };
