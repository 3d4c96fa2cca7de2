import { badInput } from "./errors";

export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/** A resource name: 1 to 64 characters, no control characters, surrounding spaces trimmed. */
export function resourceName(value: string | null | undefined, field: string): string {
  const name = (value ?? "").trim();
  if (name.length === 0) throw badInput(field, "must not be empty");
  if (name.length > 64) throw badInput(field, "must be at most 64 characters");
  if (/[\u0000-\u001f\u007f]/.test(name)) throw badInput(field, "must not contain control characters");
  return name;
}

export function description(value: string | null | undefined, field: string): string {
  const text = (value ?? "").trim();
  if (text.length > 255) throw badInput(field, "must be at most 255 characters");
  return text;
}

export function intInRange(value: number, field: string, min: number, max: number): number {
  if (!Number.isInteger(value) || value < min || value > max) throw badInput(field, `must be an integer between ${min} and ${max}`);
  return value;
}

/** Disk sizes are whole MiB, as block devices are allocated. */
export function diskSize(value: number, field: string, maxBytes: number): number {
  if (!Number.isSafeInteger(value) || value < MiB) throw badInput(field, `must be at least ${MiB} bytes (1 MiB)`);
  if (value > maxBytes) throw badInput(field, `must be at most ${maxBytes} bytes`);
  if (value % MiB !== 0) throw badInput(field, "must be a whole number of MiB (a multiple of 1048576)");
  return value;
}
