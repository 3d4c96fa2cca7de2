import crypto from "node:crypto";
import { badInput } from "../domain/errors";

export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

export const MAX_NAME_LENGTH = 64;

// Postgres stores no NUL in text, and a UTF-16 surrogate without its pair (JSON lets a client send one as \ud800) has no UTF-8 form.
// eslint-disable-next-line no-control-regex -- NUL is what Postgres cannot store
const UNSTORABLE = /\u0000|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Any text the API takes (names, descriptions, filters, IDs): refused when Postgres could not store or compare it as given. */
export function storableText(value: string, field: string): string {
  const found = UNSTORABLE.exec(value);
  if (found) {
    const what = found[0] === "\u0000" ? "a NUL character (U+0000)" : `an unpaired UTF-16 surrogate (U+${found[0].charCodeAt(0).toString(16).toUpperCase()})`;
    throw badInput(field, `contains ${what} at position ${found.index + 1}; text must be valid Unicode without NUL`);
  }
  return value;
}

// Control characters (C0, DEL, C1), line and paragraph separators, and the bidirectional embeddings,
// overrides and isolates that make a name display as other text than it is ("invoice\u202Efdp.exe").
// eslint-disable-next-line no-control-regex -- control characters are what names refuse
const NAME_REFUSED = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

/** A resource name: 1 to 64 characters (UTF-16 code units), surrounding spaces trimmed, no control or bidirectional-override characters. */
export function resourceName(value: string | null | undefined, field: string): string {
  const name = storableText(value ?? "", field).trim();
  if (name.length === 0) throw badInput(field, "must not be empty");
  if (name.length > MAX_NAME_LENGTH) throw badInput(field, `must be at most ${MAX_NAME_LENGTH} characters`);
  const refused = NAME_REFUSED.exec(name);
  if (refused) {
    const code = `U+${refused[0].charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
    throw badInput(field, `must not contain control or bidirectional-override characters (${code} at position ${refused.index + 1})`);
  }
  return name;
}

/** A description: up to 255 characters, surrounding spaces trimmed; any text but NUL (line breaks and tabs are fine). */
export function description(value: string | null | undefined, field: string): string {
  const text = storableText(value ?? "", field).trim();
  if (text.length > 255) throw badInput(field, "must be at most 255 characters");
  return text;
}

/**
 * A name made from another (`<server>-system`, `<backup>-vdb`) that stays within the name limit:
 * a base too long is cut, never inside a surrogate pair, and marked with a short hash of the whole
 * base, so two long names that share their beginning still make different names.
 */
export function derivedName(base: string, suffix: string): string {
  if (base.length + suffix.length <= MAX_NAME_LENGTH) return base + suffix;
  const hash = `~${crypto.createHash("sha256").update(base).digest("hex").slice(0, 6)}`;
  let cut = MAX_NAME_LENGTH - suffix.length - hash.length;
  if (/[\ud800-\udbff]/.test(base[cut - 1] ?? "")) cut--;
  return base.slice(0, cut).trimEnd() + hash + suffix;
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
