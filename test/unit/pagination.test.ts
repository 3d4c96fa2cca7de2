import { DomainError } from "../../src/domain/errors";
import { decodeId, fromGlobalId, toGlobalId } from "../../src/services/global-id";
import { encodeCursor, likeSubstring, resolvePage } from "../../src/services/pagination";

describe("global IDs", () => {
  const uuid = "6f1c1f43-0d0b-4c1e-9d54-0a5a0b5c3d21";
  it("round-trip and stay opaque", () => {
    const gid = toGlobalId("Disk", uuid);
    expect(gid).not.toContain(uuid);
    expect(fromGlobalId(gid)).toEqual({ type: "Disk", id: uuid });
    expect(decodeId(gid, "Disk", "diskId")).toBe(uuid);
  });
  it("refuse another type, garbage and non-uuid payloads as bad input naming the field", () => {
    expect(() => decodeId(toGlobalId("Server", uuid), "Disk", "diskId")).toThrow(/diskId/);
    expect(fromGlobalId("garbage")).toBeNull();
    expect(fromGlobalId(Buffer.from("Disk:1 OR 1=1").toString("base64url"))).toBeNull();
    expect(fromGlobalId(Buffer.from(`Nope:${uuid}`).toString("base64url"))).toBeNull();
  });
});

describe("resolvePage", () => {
  const cursor = encodeCursor("2026-01-01 00:00:00+00", "6f1c1f43-0d0b-4c1e-9d54-0a5a0b5c3d21");
  it("defaults to the first 20, ascending by creation", () => {
    expect(resolvePage({}, 100)).toEqual({ limit: 20, backward: false, cursor: null, field: "CREATED_AT", direction: "ASC" });
  });
  it("walks backward with last or a lone before", () => {
    expect(resolvePage({ last: 5, before: cursor }, 100)).toMatchObject({ limit: 5, backward: true, cursor: { sort: "2026-01-01 00:00:00+00" } });
    expect(resolvePage({ before: cursor }, 100)).toMatchObject({ limit: 20, backward: true });
  });
  it.each([
    [{ first: 1, last: 1 }, "last"],
    [{ first: 101 }, "first"],
    [{ last: -1 }, "last"],
    [{ first: 1.5 }, "first"],
    [{ after: "bogus" }, "after"],
    [{ after: encodeCursor("x", "not-a-uuid") }, "after"],
  ])("refuses %j naming %s", (args, field) => {
    try {
      resolvePage(args as never, 100);
      throw new Error("accepted");
    } catch (err) {
      expect(err).toBeInstanceOf(DomainError);
      expect((err as DomainError).field).toBe(field);
    }
  });
});

it("escapes LIKE wildcards in name filters", () => {
  expect(likeSubstring("50%_off\\")).toBe("%50\\%\\_off\\\\%");
});
