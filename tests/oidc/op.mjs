// A certified OpenID Provider (panva/oidc-provider) configured for the broker's tests; driven by tests/oidcop.py.
//
//   node op.mjs CONFIG.json      prints {"url": <issuer>} once listening (HTTPS), then one JSON line per command
//
// stdin, one JSON object a line: {"rotate": <private JWK>} puts that key first (it signs from now on) and keeps the
// others published, answered {"rotated": <kid>}; {"retire": <kid>} unpublishes one, answered {"retired": <kid>}.
// stdin closing ends the process, so a test that dies leaves no provider behind.
//
// What it issues (see README "Identity providers"): RFC 9068 JWT access tokens (typ at+jwt, ES256) for one
// resource, the broker's audience; DPoP-bound (RFC 9449) when the token request carries a proof; `client_id` is
// the agent's SPIFFE ID, and agents authenticate with their X.509-SVID (RFC 8705 tls_client_auth, the SAN URI
// must equal the client_id); users' claims (groups, department, approval_limit, risk_score, ...) and the login's
// `acr`/`amr` are added with extraTokenClaims; RFC 9396 `authorization_details` of type `tool_invocation` are
// granted as requested and carried in the token. ID tokens carry `sub`, `acr`, `amr` and, when the `profile` scope
// is granted (the approvals page asks for `openid profile`), the user's claims: what approver rules read.
import { readFileSync } from 'node:fs';
import * as https from 'node:https';
import { createInterface } from 'node:readline';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = config.users; // {sub: {claims...}}
const keys = [...config.keys];

function uriSans(x509) {
  // Node renders subjectAltName as 'URI:spiffe://..., DNS:...'; SPIFFE IDs contain no ', '.
  return (x509?.subjectAltName ?? '').split(', ').filter((n) => n.startsWith('URI:')).map((n) => n.slice(4));
}

function userClaims(sub) {
  return users[sub] ?? {};
}

// Claims the OP itself sets (or that would confuse a relying party) are never taken from a user's record.
const RESERVED = new Set(['sub', 'iss', 'aud', 'exp', 'iat', 'nbf', 'jti', 'acr', 'amr', 'auth_time', 'nonce', 'azp',
  'sid', 'at_hash', 'c_hash', 's_hash', 'cnf', 'client_id', 'scope', 'act', 'authorization_details']);
// The `profile` scope releases every claim some user has (ID token and userinfo).
const profileClaims = [...new Set(Object.values(users).flatMap((claims) => Object.keys(claims)))]
  .filter((name) => !RESERVED.has(name));

// acr/amr of the login that produced the grant: the authorization code (or the refresh token) carries them.
function loginContext(ctx) {
  const source = ctx.oidc.entities.AuthorizationCode ?? ctx.oidc.entities.RefreshToken;
  if (!source) return {};
  return { ...(source.acr ? { acr: source.acr } : {}), ...(source.amr ? { amr: source.amr } : {}) };
}

function toolInvocation(detail) {
  const ok = typeof detail.tool === 'string' && detail.tool.length > 0
    && (detail.arguments === undefined || (typeof detail.arguments === 'object' && !Array.isArray(detail.arguments)))
    && (detail.constraints === undefined || (typeof detail.constraints === 'object' && !Array.isArray(detail.constraints)));
  if (!ok) throw new errors.InvalidAuthorizationDetails('tool_invocation needs a tool name and object arguments/constraints');
}

function buildProvider(issuer) {
  const ttl = config.access_token_ttl ?? 600;
  const audience = config.audience;
  return new Provider(issuer, {
    clients: config.clients,
    jwks: { keys },
    cookies: { keys: [config.cookie_secret] },
    acrValues: ['pwd', 'mfa'],
    clientAuthMethods: ['none', 'client_secret_basic', 'tls_client_auth'],
    // every ID token says how the person signed in (acr/amr), as identity providers commonly do
    claims: { openid: ['sub', 'acr', 'amr'], profile: profileClaims, acr: null, amr: null },
    // scope claims go into the ID token even beside an access token (the relying party reads groups there)
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      AuthorizationCode: 60,
      IdToken: ttl,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(ctx, sub) {
      if (!Object.hasOwn(users, sub)) return undefined;
      const released = Object.fromEntries(
        Object.entries(userClaims(sub)).filter(([name]) => profileClaims.includes(name)),
      );
      return { accountId: sub, claims: async () => ({ ...released, sub }) };
    },
    async extraTokenClaims(ctx, token) {
      if (token.kind !== 'AccessToken' || !token.accountId) return undefined; // client credentials: the client alone
      return { ...userClaims(token.accountId), ...loginContext(ctx) };
    },
    features: {
      devInteractions: { enabled: false },
      dPoP: { enabled: true },
      clientCredentials: { enabled: true },
      mTLS: {
        enabled: true,
        tlsClientAuth: true,
        getCertificate: (ctx) => ctx.socket.getPeerX509Certificate?.()?.toString(),
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches(ctx, property, expected) {
          if (property !== 'tls_client_auth_san_uri') return false;
          const sans = uriSans(ctx.socket.getPeerX509Certificate?.());
          return sans.length === 1 && sans[0] === expected; // an X.509-SVID has exactly one URI SAN
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => audience,
        useGrantedResource: () => true,
        async getResourceServerInfo(ctx, indicator) {
          if (indicator !== audience) throw new errors.InvalidTarget();
          return { scope: 'tools', audience, accessTokenTTL: ttl, accessTokenFormat: 'jwt', jwt: { sign: { alg: 'ES256' } } };
        },
      },
      richAuthorizationRequests: {
        enabled: true,
        types: { tool_invocation: { validate: (ctx, detail) => toolInvocation(detail) } },
        // First-party demo clients: what was requested is granted (the consent step below grants all of it).
        authorizationDetailsForGrantSource: (ctx) => ctx.oidc.grant.rar,
        authorizationDetailsForAccessToken(ctx, token, source) {
          if (source?.rar) return source.rar;
          const requested = ctx.oidc.params.authorization_details;
          return requested === undefined ? undefined : JSON.parse(requested);
        },
        authorizationDetailsForIntrospection: (ctx, token) => token.rar,
      },
    },
  });
}

// --- interactions: a login form a test can drive with plain HTTP; consent is granted without asking ------------

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 16384) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

function send(res, status, type, body) {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(body);
}

async function interaction(provider, req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, 'text/plain', 'interaction mismatch\n');
  const { prompt, params, session } = details;
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
    if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
    for (const [indicator, scope] of Object.entries(prompt.details.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scope.join(' '));
    }
    for (const detail of prompt.details.rar ?? []) grant.addRar(detail);
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
  }
  if (prompt.name !== 'login') return send(res, 501, 'text/plain', `prompt ${prompt.name} not supported\n`);
  if (action === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const user = form.get('user');
    if (!user || !Object.hasOwn(users, user)) return send(res, 400, 'text/plain', 'unknown user\n');
    const mfa = form.get('mfa') === 'on' || form.get('mfa') === '1';
    const login = { accountId: user, acr: mfa ? 'mfa' : 'pwd', amr: mfa ? ['pwd', 'otp', 'mfa'] : ['pwd'] };
    return provider.interactionFinished(req, res, { login }, { mergeWithLastSubmission: false });
  }
  const mfaAsked = String(params.acr_values ?? '').split(' ').includes('mfa');
  const options = Object.keys(users).map((u) => `<option>${escapeHtml(u)}</option>`).join('');
  return send(res, 200, 'text/html; charset=utf-8', `<!doctype html><title>Sign in</title>
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>User <select name="user">${options}</select></label>
<label><input type="checkbox" name="mfa"${mfaAsked ? ' checked' : ''}> second factor (acr=mfa)</label>
<button>Sign in</button></form>\n`);
}

// --- the server ------------------------------------------------------------------------------------------------

let provider;
let callback;
const server = https.createServer({
  cert: readFileSync(config.tls.cert),
  key: readFileSync(config.tls.key),
  ca: readFileSync(config.tls.ca),
  requestCert: true, // browsers come without a certificate; agents present their SVID (tls_client_auth)
  rejectUnauthorized: false,
}, async (req, res) => {
  const match = /^\/interaction\/([\w-]+)(?:\/(login))?$/.exec(req.url.split('?')[0]);
  if (!match) return callback(req, res);
  try {
    await interaction(provider, req, res, match[1], match[2]);
  } catch (err) {
    if (!res.headersSent) send(res, 400, 'text/plain', `${err.name}: ${err.message}\n`);
  }
});

function install(issuer) {
  provider = buildProvider(issuer);
  provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  callback = provider.callback();
}

server.listen(config.port ?? 0, '127.0.0.1', () => {
  const issuer = `https://${config.hostname ?? 'localhost'}:${server.address().port}`;
  install(issuer);
  process.stdout.write(`${JSON.stringify({ url: issuer })}\n`);

  const commands = createInterface({ input: process.stdin });
  commands.on('line', (line) => {
    const command = JSON.parse(line);
    if (command.rotate) {
      keys.unshift(command.rotate);
      install(issuer);
      process.stdout.write(`${JSON.stringify({ rotated: command.rotate.kid })}\n`);
    } else if (command.retire) {
      const index = keys.findIndex((k) => k.kid === command.retire);
      if (index >= 0) keys.splice(index, 1);
      install(issuer);
      process.stdout.write(`${JSON.stringify({ retired: command.retire })}\n`);
    }
  });
  commands.on('close', () => process.exit(0));
});
