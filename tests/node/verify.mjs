// A relying party written for Node's jose, with no code of the signer's: configured only with
// an issuer URL, it reads the issuer's OpenID configuration, then verifies tokens against its
// jwks_uri with jose's own remote key set (its own cache and cooldown).
//
//   node verify.mjs ISSUER AUDIENCE [CACHE_MAX_AGE_MS [COOLDOWN_MS]]
//
// It prints {"ready": true} once discovery is done, then reads one token per line of stdin and
// prints one JSON line for each: {"ok": true, "kid": ..., "iss": ...} or {"ok": false, "code":
// ..., "message": ...}. The dev CA comes in through NODE_EXTRA_CA_CERTS.
import { createRemoteJWKSet, jwtVerify } from "jose";
import { createInterface } from "node:readline";

const [issuer, audience, maxAge, cooldown] = process.argv.slice(2);
const meta = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
if (meta.issuer !== issuer) {
  throw new Error(`discovery names issuer ${meta.issuer}, not ${issuer}`);
}
const options = {};
if (maxAge) options.cacheMaxAge = Number(maxAge);
if (cooldown) options.cooldownDuration = Number(cooldown);
const keys = createRemoteJWKSet(new URL(meta.jwks_uri), options);
console.log(JSON.stringify({ ready: true }));
for await (const line of createInterface({ input: process.stdin })) {
  const token = line.trim();
  if (!token) continue;
  try {
    const { payload, protectedHeader } = await jwtVerify(token, keys, {
      issuer,
      audience,
      algorithms: meta.id_token_signing_alg_values_supported,
    });
    console.log(JSON.stringify({ ok: true, kid: protectedHeader.kid, iss: payload.iss }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, code: e.code ?? e.name, message: e.message }));
  }
}
