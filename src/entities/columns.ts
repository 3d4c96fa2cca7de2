import type { ValueTransformer } from "typeorm";

/** Postgres bigint arrives as a string; byte counts stay below 2^53, so numbers are safe. */
export const bigintNumber: ValueTransformer = {
  to: (v: number | null | undefined) => v,
  from: (v: string | null) => (v === null || v === undefined ? v : Number(v)),
};
