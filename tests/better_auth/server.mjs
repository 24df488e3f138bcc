// Minimal, real Better Auth server used by the Python test suite.
//
// It issues asymmetric JWTs through the `jwt()` plugin and publishes the public
// keys at `${BETTER_AUTH_URL}/api/auth/jwks`.
//
// Environment:
//   DATABASE_URL        PostgreSQL URL (required); the schema is created on start.
//   BETTER_AUTH_URL     public base URL, e.g. http://127.0.0.1:PORT (required)
//   BETTER_AUTH_SECRET  secret used for cookies and key encryption (required, >= 32 chars)
//   PORT                port to listen on (host is always 127.0.0.1) (required)
//   JWT_ALG             EdDSA (default), ES256, ES512, RS256 or PS256
//
// Prints one line `BETTER_AUTH_READY <url> <alg>` on stdout when it accepts requests.
import http from "node:http";

import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";
import { jwt } from "better-auth/plugins/jwt";
import pg from "pg";

const SUPPORTED_ALGS = ["EdDSA", "ES256", "ES512", "RS256", "PS256"];

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`better-auth test server: environment variable ${name} is required`);
    process.exit(2);
  }
  return value;
}

const databaseUrl = required("DATABASE_URL");
const baseURL = required("BETTER_AUTH_URL").replace(/\/+$/, "");
const secret = required("BETTER_AUTH_SECRET");
const port = Number.parseInt(required("PORT"), 10);
const alg = process.env.JWT_ALG || "EdDSA";
if (!SUPPORTED_ALGS.includes(alg)) {
  console.error(`better-auth test server: JWT_ALG must be one of ${SUPPORTED_ALGS.join(", ")}, got ${alg}`);
  process.exit(2);
}

const pool = new pg.Pool({ connectionString: databaseUrl, max: 5 });

const auth = betterAuth({
  baseURL,
  secret,
  database: pool,
  trustedOrigins: [baseURL],
  emailAndPassword: { enabled: true },
  // Tests sign up many users quickly; never throttle them.
  rateLimit: { enabled: false },
  telemetry: { enabled: false },
  plugins: [
    jwt({
      // EdDSA keys are Ed25519 (the plugin's default curve).
      jwks: { keyPairConfig: alg === "EdDSA" ? { alg, crv: "Ed25519" } : { alg } },
    }),
  ],
});

// Create (or complete) the schema: user, session, account, verification, jwks.
const { runMigrations } = await getMigrations(auth.options);
await runMigrations();

const handler = toNodeHandler(auth);
const server = http.createServer((req, res) => {
  handler(req, res).catch((err) => {
    console.error("better-auth test server: handler error", err);
    if (!res.headersSent) res.writeHead(500, { "content-type": "text/plain" });
    res.end("internal error");
  });
});

function shutdown() {
  server.close();
  server.closeAllConnections();
  pool.end().finally(() => process.exit(0));
  // Do not hang on keep-alive sockets.
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

server.listen(port, "127.0.0.1", () => {
  console.log(`BETTER_AUTH_READY ${baseURL} ${alg}`);
});
