import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { freePort } from "../../bench/lib/proc";
import { createDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { RawNbd } from "../helpers/nbd-client";
import { tmpDir } from "../helpers/formats";
import { MiB, startTestService, type TestService } from "../helpers/service";

/**
 * NBD over TLS (NBD_OPT_STARTTLS) with a certificate QEMU's tls-creds-x509 accepts.
 * Bound to a non-loopback address, the
 * server refuses everything but STARTTLS before TLS.
 */

const run = promisify(execFile);
const openssl = requireProgram(["/usr/bin/openssl"], "openssl");
const qemuImg = requireProgram(["/usr/bin/qemu-img"], "qemu-utils");
const nbdinfo = requireProgram(["/usr/bin/nbdinfo"], "libnbd-bin");
const ready = openssl && qemuImg && nbdinfo;
const maybe = ready ? describe : describe.skip;

/** A CA and a server certificate for 127.0.0.1, in the file names QEMU's x509 credentials directory uses. */
async function certificates(dir: string): Promise<void> {
  const o = (args: string[]) => run(openssl!, args, { cwd: dir });
  await o(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=Stowage test CA"]);
  await o(["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
  fs.writeFileSync(path.join(dir, "ext.cnf"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n");
  await o(["x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext.cnf"]);
}

maybe("NBD over TLS", () => {
  let svc: TestService;
  let work: { dir: string; cleanup(): void };
  let uri: string;
  beforeAll(async () => {
    work = tmpDir("stowage-nbd-tls-");
    await certificates(work.dir);
    svc = await startTestService({
      NBD_PORT: String(await freePort()),
      NBD_HOST: "0.0.0.0",
      NBD_PUBLIC_HOST: "127.0.0.1",
      NBD_TLS_CERT: path.join(work.dir, "server-cert.pem"),
      NBD_TLS_KEY: path.join(work.dir, "server-key.pem"),
    });
    const disk = await createDisk(svc, "secret", 4 * MiB);
    uri = (await svc.ok(`mutation ($id: ID!) { createNbdExport(input: { resourceId: $id }) { nbdExport { uri } } }`, { id: disk })).createNbdExport.nbdExport.uri;
  });
  afterAll(async () => {
    await svc?.stop();
    work?.cleanup();
  });

  it("names nbds:// and is opened by qemu-img with tls-creds-x509 and by nbdinfo with the CA", async () => {
    expect(uri).toMatch(/^nbds:\/\/127\.0\.0\.1:\d+\/[A-Za-z0-9_-]{43}$/);
    const u = new URL(uri);
    const { stdout } = await run(qemuImg!, [
      "info",
      "--output=json",
      "--object",
      `tls-creds-x509,id=tls0,endpoint=client,dir=${work.dir}`,
      "--image-opts",
      `driver=nbd,host=127.0.0.1,port=${u.port},export=${u.pathname.slice(1)},tls-creds=tls0`,
    ]);
    expect(JSON.parse(stdout)["virtual-size"]).toBe(4 * MiB);
    const info = await run(nbdinfo!, [`${uri}?tls-certificates=${work.dir}`]);
    expect(info.stdout).toMatch(/export-size: 4194304/);
    expect(info.stdout).toMatch(/with TLS/);
  });

  it("refuses a client without TLS off loopback, before any export is named", async () => {
    const plain = uri.replace(/^nbds:/, "nbd:");
    const err = await run(nbdinfo!, [plain]).then(
      () => "",
      (e: { stderr: string }) => e.stderr,
    );
    expect(err).toMatch(/server replied with error to opt_go request/);
    // On the wire: NBD_REP_ERR_TLS_REQD, for a real name as for any other, and NBD_OPT_EXPORT_NAME closes.
    const raw = await RawNbd.connect(svc.nbdPort);
    expect(await raw.go(new URL(uri).pathname.slice(1))).toEqual({ error: 0x80000005 });
    expect(await raw.go("x")).toEqual({ error: 0x80000005 });
    raw.option(1, Buffer.from(new URL(uri).pathname.slice(1)));
    expect(await raw.closedWithin(2000)).toBe(true);
  });
});
