#!/usr/bin/env python3
"""A stand-in for Azure Key Vault's secrets REST API, for the kvinject test bed.

WHY THIS EXISTS: the test bed is meant to run Lowkey Vault (com.github.nagyesta.lowkey-vault:
lowkey-vault-app), but this machine's Maven registry does not serve that artifact at any
version (its POM and jar answer 404, while lowkey-vault-client resolves). Until it does,
this process plays the vault. It is NOT a mock inside kvinject: kvinject talks to it with
the real azure_security_keyvault_secrets and azure_identity crates, over TLS verified
against the test bed CA, through the real challenge flow:

  * every /secrets request without a bearer token gets 401 and
    `WWW-Authenticate: Bearer authorization="<token url>/<tenant>", resource="<resource>"`,
    so the SDK's challenge-resource verification runs as against Azure (the vault host is
    `<vault>.vault.kvinject.test`, the resource `https://vault.kvinject.test`);
  * any bearer token is accepted afterwards, like Lowkey Vault;
  * the token port serves the Entra ID client-credentials endpoint
    (POST /{tenant}/oauth2/v2.0/token) for azure_identity's ClientSecretCredential;
  * api-version is required and checked against the versions listed below.

Shapes follow the official REST API definition (api-version 2025-07-01) and recordings of
the real service; tests/e2e/conformance.rs checks both (fixtures in conformance/):
  * names are case-insensitive (one secret, one version history; ids keep the first case);
  * the vault list is sorted by name, its items carry no value and no version in their id,
    and it pages: maxresults 1..25 (default 25; anything else is a 400 BadParameter) and a
    nextLink with a $skiptoken;
  * contentType and tags appear only when set; an update (PATCH, also of the latest version
    by an empty version segment) answers without the value;
  * soft delete: DELETE answers the deleted bundle; the deletion and a recovery each take
    --transition-seconds, during which Key Vault answers 404 (reads) or 409
    ObjectIsBeingDeleted (purge, recover, set); a deleted name cannot be set again (409
    ObjectIsDeletedButRecoverable) until it is recovered or purged.
State is kept in a JSON file so a stop/start (an outage in a test) keeps the secrets.

Test-control endpoints live on the token port under /_testbed/ (request counters, forcing
a 403 for a secret name, faults); they are the only things Key Vault itself does not have.

Faults (POST /_testbed/fault with a JSON object, DELETE /_testbed/fault to end them all; they
are not saved, so a restart ends them too). Each is what a client sees of a real failure:
  {"latency": S}          every vault answer waits S seconds (a slow vault or network);
  {..., "name": S}        the fault answers only requests for secret S;
  {..., "times": N}       the fault answers only the next N (such) vault requests, then ends;
  {"status": 429, "retry_after": S}
                          every vault request is throttled, as Key Vault does past its
                          service limits (error code Throttled, Retry-After in seconds);
  {"status": 500 | 503}   every vault request fails on the server side;
  {"reset": true}         every vault answer is cut after its headers and part of its body,
                          with a TCP reset (a load balancer or the network dropping it);
  {"untrusted_cert": true}
                          the vault's TLS handshake presents a certificate the bed's CA did not
                          sign (a TLS-inspecting proxy, a DNS hijack, a wrong endpoint);
  {"token": "down" | 500} Entra ID's token endpoint resets every connection / answers 500.
"""
import argparse
import base64
import io
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

API_VERSIONS = {"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"}
NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")

lock = threading.Lock()
# Per vault (the first label of the Host: kvtest.vault.kvinject.test is vault `kvtest`; each
# vault is separate, as in Azure): lower-case name -> {"name": display name (as first set),
# "versions": [version dicts, oldest first], "visible_at": when a recovery finishes}; Key
# Vault names are case-insensitive.
state = {"vaults": {}}
forbidden = set()  # names that answer 403 (an RBAC denial, which Key Vault decides per identity)
counters = {"secrets_get": 0, "secrets_list": 0, "secrets_put": 0, "challenges": 0, "tokens": 0, "assertion_tokens": 0,
            # GETs of one secret (any version) by its name, so a test can prove who read what
            # while other tests use the vault too; and by client id, then name
            "secrets_get_by_name": {}, "secrets_get_by_client": {}}
args = None
PAGE = 25
# Entra ID: federated credentials (client id -> subjects it trusts), issued tokens (token ->
# {"client", "aud", "exp"}), and per-identity read permission on the vault (client id ->
# secret names; a client id without an entry may read everything, like kvinject's own
# identity in tests).
federation = {}
issued = {}
# Key Vault's documented limit on a secret value.
MAX_VALUE_BYTES = 25 * 1024
vault_access = {}
jwks = {}  # kid -> (n, e), loaded from --jwks once the apiserver wrote it
faults = {}  # what is failing now (see the module's doc); set and cleared by /_testbed/fault
fault_lock = threading.Lock()
untrusted_ctx = None  # a TLS context whose certificate the bed's CA did not sign
vault_server = None  # the vault port's server


def save():
    """Secrets, and Entra ID's records (an outage of the bed's vault is not a new tenant)."""
    tmp = args.state + ".tmp"
    entra = {"federation": {k: sorted(v) for k, v in federation.items()}, "issued": issued,
             "vault_access": {k: sorted(v) for k, v in vault_access.items()}}
    with open(tmp, "w") as f:
        json.dump(dict(state, entra=entra), f)
    os.replace(tmp, args.state)


def load():
    global state
    if os.path.exists(args.state):
        with open(args.state) as f:
            state = json.load(f)
        entra = state.pop("entra", {})
        if "secrets" in state:  # a state file from before vaults were separate
            state = {"vaults": {"kvtest": {"secrets": state.pop("secrets"), "deleted": state.pop("deleted", {})}}}
        federation.update({k: set(v) for k, v in entra.get("federation", {}).items()})
        # Tokens in the form this bed issues; anything else is not a token it would accept.
        issued.update({t: r for t, r in entra.get("issued", {}).items() if isinstance(r, dict)})
        vault_access.update({k: set(v) for k, v in entra.get("vault_access", {}).items()})


def attributes(v):
    return dict(v["attributes"], recoveryLevel="Recoverable+Purgeable", recoverableDays=90)


def common(v, out):
    """contentType and tags appear only when set, as in Key Vault's answers."""
    if v.get("contentType"):
        out["contentType"] = v["contentType"]
    if v.get("tags"):
        out["tags"] = v["tags"]
    return out


def bundle(host, name, v, value=True):
    b = {"id": f"https://{host}/secrets/{name}/{v['version']}", "attributes": attributes(v)}
    if value:
        b["value"] = v["value"]
    return common(v, b)


def list_item(host, name, v, versioned):
    """A list entry: never a value; the vault list names the secret, the versions list the version."""
    path = f"{name}/{v['version']}" if versioned else name
    return common(v, {"id": f"https://{host}/secrets/{path}", "attributes": attributes(v)})


def deleted_bundle(host, entry):
    v = entry["versions"][-1]
    b = bundle(host, entry["name"], v, value=False)
    b.update(recoveryId=f"https://{host}/deletedsecrets/{entry['name']}", deletedDate=entry["deletedDate"],
             scheduledPurgeDate=entry["scheduledPurgeDate"])
    return b


def deleted_item(host, entry):
    b = deleted_bundle(host, entry)
    b["id"] = f"https://{host}/secrets/{entry['name']}"
    return b


def b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def load_jwks():
    """The apiserver's service-account signing keys, as its /openid/v1/jwks serves them."""
    if not jwks and args.jwks and os.path.exists(args.jwks):
        with open(args.jwks) as f:
            for key in json.load(f).get("keys", []):
                if key.get("kty") == "RSA":
                    jwks[key.get("kid", "")] = (int.from_bytes(b64url(key["n"]), "big"), int.from_bytes(b64url(key["e"]), "big"))
    return jwks


def rs256_valid(n, e, signed, signature):
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017, 8.2.2)."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(signed).digest()
    expected = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
    return hmac.compare_digest(em, expected)


def check_assertion(client_id, assertion):
    """What Entra ID checks of a federated credential's assertion: the issuer's signature,
    iss, aud, the validity window, and that a federated identity record of `client_id` names
    the subject. Returns an AADSTS error, or None."""
    try:
        head_b64, claims_b64, sig_b64 = assertion.split(".")
        head, claims = json.loads(b64url(head_b64)), json.loads(b64url(claims_b64))
        signature = b64url(sig_b64)
    except (ValueError, KeyError):
        return "AADSTS50027: JWT token is invalid or malformed."
    key = load_jwks().get(head.get("kid", ""))
    if head.get("alg") != "RS256" or key is None or not rs256_valid(*key, f"{head_b64}.{claims_b64}".encode(), signature):
        return "AADSTS700027: Client assertion failed signature validation."
    now = time.time()
    if not claims.get("exp", 0) > now or claims.get("nbf", 0) > now + 300:
        return "AADSTS700024: Client assertion is not within its valid time range."
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    subject = claims.get("sub", "")
    if (claims.get("iss") != args.sa_issuer or "api://AzureADTokenExchange" not in auds
            or subject not in federation.get(client_id, set())):
        return (f"AADSTS70021: No matching federated identity record found for presented assertion. "
                f"Assertion Issuer: '{claims.get('iss')}'. Assertion Subject: '{subject}'. Assertion Audience: '{','.join(map(str, auds))}'.")
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvstandin"

    def setup(self):
        # The TLS handshake happens here, in the connection's own thread, not in the accept
        # loop, where one slow client would hold up every other.
        self.request.do_handshake()
        super().setup()
        # An answer goes out in two writes (headers, then body): with Nagle's algorithm the
        # second waits for the client's delayed ACK, about 40 ms. Key Vault answers at once.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.open_lock:
            self.server.open.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.open_lock:
                self.server.open.discard(self.connection)

    def log_message(self, fmt, *a):  # one line per request, never a value
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % a))

    def reply(self, code, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        # The headers Key Vault sends with every answer (values of our own).
        for k, v in (("Cache-Control", "no-cache"), ("Pragma", "no-cache"), ("Expires", "-1"),
                     ("X-Content-Type-Options", "nosniff"),
                     ("Strict-Transport-Security", "max-age=31536000;includeSubDomains"),
                     ("x-ms-keyvault-region", "testbed"), ("x-ms-keyvault-service-version", "kvstandin")):
            self.send_header(k, v)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", secrets.token_hex(8))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, kv_code, message, inner=None):
        err = {"code": kv_code, "message": message}
        if inner:
            err["innererror"] = {"code": inner}
        self.reply(code, {"error": err})

    def drain(self):
        """Reads and drops the request body."""
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    def not_found(self, name, ver=None):
        if ver:
            return self.error(404, "SecretNotFound", f"A secret with (name/id) {name}/{ver} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
        return self.error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")

    def page(self, u, q, host, items, av):
        """One page of `items` ((sort key, item) pairs, sorted) and the nextLink to the rest.
        maxresults is 1..25 (default 25). The $skiptoken is the last key served, so secrets set
        meanwhile neither repeat nor shift the next page."""
        raw = q.get("maxresults", [None])[0]
        try:
            size = PAGE if raw is None else int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= PAGE:
            return self.error(400, "BadParameter", f"The value {raw} of the 'maxresults' parameter is invalid: it must be between 1 and {PAGE}.")
        after = q.get("$skiptoken", [""])[0]
        rest = [(k, item) for k, item in items if k > after]
        chunk = rest[:size]
        next_link = None
        if len(rest) > size:
            extra = "" if raw is None else f"&maxresults={size}"
            next_link = f"https://{host}{u.path}?api-version={av}&$skiptoken={quote(chunk[-1][0])}{extra}"
        return self.reply(200, {"value": [item for _, item in chunk], "nextLink": next_link})

    def live(self, key, now):
        entry = self.vs["secrets"].get(key)
        if entry and entry.get("visible_at", 0) <= now:
            return entry
        return None

    def reset(self, status, body):
        """Sends the status line, the headers and half the body, then a TCP reset."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
        self.wfile = io.BytesIO()  # what the server still flushes goes nowhere

    def vault_fault(self):
        """Applies the vault-side faults in force; True when the request was answered by one."""
        with fault_lock:
            f = dict(faults)
            # {"name": N}: only requests for that secret; {"times": N}: the next N of them only.
            if f.get("name") and f["name"].lower() not in urlsplit(self.path).path.lower().split("/"):
                return False
            if "times" in faults:
                faults["times"] -= 1
                if faults["times"] < 0:
                    faults.clear()
                    f = {}
        if f.get("latency"):
            time.sleep(float(f["latency"]))
        if f.get("reset"):
            self.drain()
            self.reset(200, {"value": [], "nextLink": None})
            return True
        status = f.get("status")
        if status:
            self.drain()
            if status == 429:
                self.reply(429, {"error": {"code": "Throttled", "message": "Request was not allowed because we detected an unusually high number of requests to this vault. Please retry after the delay in the Retry-After header."}},
                           {"Retry-After": str(f.get("retry_after", 1))})
            elif status == 503:
                self.reply(503, {"error": {"code": "ServiceUnavailable", "message": "The service is temporarily unavailable. Please retry later."}})
            else:
                self.reply(int(status), {"error": {"code": "InternalServerError", "message": "An unexpected error occurred."}})
            return True
        return False

    # ---- Key Vault port -------------------------------------------------------------
    def vault(self, method):
        if self.vault_fault():
            return
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        parts = [p for p in u.path.split("/") if p]
        if not parts or parts[0] not in ("secrets", "deletedsecrets"):
            return self.error(404, "NotFound", f"no route for {u.path}")
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            counters["challenges"] += 1
            # a challenged request must carry no body the SDK would resend, so drain it
            self.body()
            return self.reply(401, {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}}, {
                "WWW-Authenticate": f'Bearer authorization="{args.authority}/{args.tenant}", resource="{args.resource}"'})
        av = q.get("api-version", [None])[0]
        if av is None:
            return self.error(400, "BadParameter", "The 'api-version' query parameter is missing.")
        if av not in API_VERSIONS:
            return self.error(400, "BadParameter", f"The specified version ({av}) is not recognized. Consider using the latest supported version ({sorted(API_VERSIONS)[-1]}).")
        host = self.headers.get("Host", "")
        label = host.split(":")[0].split(".")[0]
        vault_name = "kvtest" if not label or label[0].isdigit() else label.lower()
        self.vs = state["vaults"].setdefault(vault_name, {"secrets": {}, "deleted": {}})
        name = parts[1] if len(parts) > 1 else ""
        if name and not NAME_RE.match(name):
            return self.error(400, "BadParameter", f"The request URI contains an invalid name: {name}")
        key = name.lower()
        record = issued.get(auth[len("Bearer "):])
        # As Key Vault: only a token from the tenant's Entra ID, for this resource, unexpired.
        # Each refusal is a 401 with the challenge, so a client gets a new token and retries.
        challenge = {"WWW-Authenticate": f'Bearer authorization="{args.authority}/{args.tenant}", resource="{args.resource}"'}
        why = None
        if record is None:
            why = "AKV10032: Invalid issuer. The token was not issued by this vault's tenant."
        elif record["aud"].rstrip("/") != args.resource.rstrip("/"):
            why = f"AKV10022: Invalid audience. Expected {args.resource}, found: {record['aud']}."
        elif record["exp"] <= time.time():
            why = f"The access token expired at {int(record['exp'])}."
        if why:
            self.body()
            return self.reply(401, {"error": {"code": "Unauthorized", "message": why}}, challenge)
        client = record["client"]
        self.client = client
        allowed = vault_access.get(client)
        if key in forbidden or (name and allowed is not None and key not in allowed):
            return self.error(403, "Forbidden", f"Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action' Resource: secret {name}", "ForbiddenByRbac")
        with lock:
            if parts[0] == "deletedsecrets":
                return self.deleted(method, parts, q, u, host, key, name, av)
            return self.secrets_route(method, parts, q, u, host, key, name, av)

    def secrets_route(self, method, parts, q, u, host, key, name, av):
        now = time.time()
        if method == "GET" and len(parts) == 1:
            counters["secrets_list"] += 1
            live = sorted((e for k, e in self.vs["secrets"].items() if e.get("visible_at", 0) <= now), key=lambda e: e["name"].lower())
            return self.page(u, q, host, [(e["name"].lower(), list_item(host, e["name"], e["versions"][-1], False)) for e in live], av)
        if method == "PUT" and len(parts) == 2:
            counters["secrets_put"] += 1
            if key in self.vs["deleted"]:
                gone = self.vs["deleted"][key]
                if gone["ready_at"] > now:
                    return self.error(409, "Conflict", f"Secret {name} is currently being deleted.", "ObjectIsBeingDeleted")
                return self.error(409, "Conflict", f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged.", "ObjectIsDeletedButRecoverable")
            b = self.body()
            if "value" not in b:
                return self.error(400, "BadParameter", "Property 'value' is required.")
            if len(str(b["value"]).encode()) > MAX_VALUE_BYTES:
                # Key Vault's limit (25 KB a value); the wording is the bed's, not a recording.
                return self.error(400, "BadParameter", f"The secret value is {len(str(b['value']).encode())} bytes; the maximum is {MAX_VALUE_BYTES}.")
            stamp = int(now)
            attrs = {"enabled": True, "created": stamp, "updated": stamp}
            for k in ("enabled", "exp", "nbf"):
                if k in (b.get("attributes") or {}):
                    attrs[k] = b["attributes"][k]
            v = {"version": secrets.token_hex(16), "value": b["value"], "attributes": attrs,
                 "contentType": b.get("contentType"), "tags": b.get("tags")}
            entry = self.vs["secrets"].setdefault(key, {"name": name, "versions": []})
            entry["versions"].append(v)
            save()
            return self.reply(200, bundle(host, entry["name"], v))
        if method == "DELETE" and len(parts) == 2:
            entry = self.live(key, now)
            if entry is None:
                return self.not_found(name)
            del self.vs["secrets"][key]
            # Deletion takes a moment in Key Vault: meanwhile the deleted secret cannot be
            # read, recovered or purged (ObjectIsBeingDeleted).
            gone = dict(entry, deletedDate=int(now), scheduledPurgeDate=int(now) + 90 * 86400,
                        ready_at=now + args.transition_seconds)
            gone.pop("visible_at", None)
            self.vs["deleted"][key] = gone
            save()
            return self.reply(200, deleted_bundle(host, gone))
        entry = self.live(key, now)
        if method == "GET" and len(parts) == 3 and parts[2] == "versions":
            items = [(f"{i:08d}", list_item(host, entry["name"], x, True)) for i, x in enumerate(entry["versions"])] if entry else []
            return self.page(u, q, host, items, av)
        if method in ("GET", "PATCH") and len(parts) in (2, 3):
            if method == "GET":
                by_name = counters["secrets_get_by_name"]
                by_name[key] = by_name.get(key, 0) + 1
                by_client = counters["secrets_get_by_client"].setdefault(self.client or "unknown", {})
                by_client[key] = by_client.get(key, 0) + 1
            ver = parts[2] if len(parts) == 3 else ""
            if entry is None:
                return self.not_found(name, ver or None)
            versions = entry["versions"]
            v = versions[-1] if ver == "" else next((x for x in versions if x["version"] == ver), None)
            if v is None:
                return self.not_found(name, ver)
            if method == "PATCH":
                b = self.body()
                v["attributes"].update({k: b["attributes"][k] for k in ("enabled", "exp", "nbf") if k in (b.get("attributes") or {})})
                v["attributes"]["updated"] = int(now)
                for k in ("contentType", "tags"):
                    if k in b:
                        v[k] = b[k]
                save()
                return self.reply(200, bundle(host, entry["name"], v, value=False))
            counters["secrets_get"] += 1
            if not v["attributes"].get("enabled", True):
                return self.error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
            return self.reply(200, bundle(host, entry["name"], v))
        return self.error(405, "BadRequest", f"{method} {u.path} is not supported by the test bed's vault")

    def deleted(self, method, parts, q, u, host, key, name, av):
        now = time.time()
        if method == "GET" and len(parts) == 1:
            ready = sorted((e for e in self.vs["deleted"].values() if e["ready_at"] <= now), key=lambda e: e["name"].lower())
            return self.page(u, q, host, [(e["name"].lower(), deleted_item(host, e)) for e in ready], av)
        gone = self.vs["deleted"].get(key)
        if gone is None or (method == "GET" and gone["ready_at"] > now):
            return self.error(404, "SecretNotFound", f"Deleted Secret not found: {name}")
        if gone["ready_at"] > now:
            return self.error(409, "Conflict", "Secret is currently being deleted.", "ObjectIsBeingDeleted")
        if method == "GET" and len(parts) == 2:
            return self.reply(200, deleted_bundle(host, gone))
        if method == "DELETE" and len(parts) == 2:
            del self.vs["deleted"][key]
            save()
            return self.reply(204)
        if method == "POST" and len(parts) == 3 and parts[2] == "recover":
            del self.vs["deleted"][key]
            # Recovery takes a moment too: the secret answers 404 until it is back.
            entry = {"name": gone["name"], "versions": gone["versions"], "visible_at": now + args.transition_seconds}
            self.vs["secrets"][key] = entry
            save()
            return self.reply(200, bundle(host, entry["name"], entry["versions"][-1], value=False))
        return self.error(405, "BadRequest", f"{method} {u.path} is not supported by the test bed's vault")

    # ---- token / test-control port ----------------------------------------------------
    def token(self, method):
        u = urlsplit(self.path)
        parts = [p for p in u.path.split("/") if p]
        if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            token_fault = faults.get("token")
            if token_fault == "down":
                self.drain()
                return self.reset(200, {"token_type": "Bearer"})
            if token_fault:
                self.drain()
                return self.reply(int(token_fault), {"error": "temporarily_unavailable", "error_description": "AADSTS90033: A transient error has occurred. Please try again.", "error_codes": [90033]})
            n = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(n).decode())
            if form.get("grant_type", [""])[0] not in ("client_credentials",):
                return self.reply(400, {"error": "unsupported_grant_type"})
            if not form.get("client_id") or not (form.get("client_secret") or form.get("client_assertion")):
                return self.reply(401, {"error": "invalid_client", "error_description": "client_id and a secret or assertion are required"})
            client_id = form["client_id"][0]
            if parts[0] != args.tenant:
                return self.reply(400, {"error": "invalid_tenant", "error_description": f"AADSTS90002: Tenant '{parts[0]}' not found.", "error_codes": [90002]})
            scope = form.get("scope", [""])[0]
            if not scope:
                return self.reply(400, {"error": "invalid_request", "error_description": "AADSTS900144: The request body must contain the following parameter: 'scope'.", "error_codes": [900144]})
            if form.get("client_secret") and not form.get("client_assertion"):
                known = dict(c.split("=", 1) for c in args.client)
                if client_id not in known:
                    return self.reply(400, {"error": "unauthorized_client", "error_description": f"AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{args.tenant}'.", "error_codes": [700016]})
                if not hmac.compare_digest(known[client_id], form["client_secret"][0]):
                    return self.reply(401, {"error": "invalid_client", "error_description": f"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'.", "error_codes": [7000215]})
            if form.get("client_assertion"):
                why = check_assertion(client_id, form["client_assertion"][0])
                if why:
                    code = int(why[6:why.index(":")])
                    status, error = (400, "invalid_request") if code == 70021 else (401, "invalid_client")
                    return self.reply(status, {"error": error, "error_description": why, "error_codes": [code]})
                counters["assertion_tokens"] += 1
            counters["tokens"] += 1
            token = "testbed." + secrets.token_hex(16)
            aud = scope.removesuffix("/.default")
            with lock:  # every change to the saved records under the lock: save() reads them all
                issued[token] = {"client": client_id, "aud": aud, "exp": time.time() + 3599}
                save()
            return self.reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                    "access_token": token})
        if parts[:1] == ["_testbed"]:
            if method == "GET" and parts[1:] == ["counters"]:
                return self.reply(200, counters)
            if method == "POST" and parts[1:] == ["admin-token"]:
                # For scripts that seed the vault without the SDK (KVINJECT_VAULT_ADMIN_TOKEN):
                # a token of the bed's own admin identity, valid a week.
                token = "testbed." + secrets.token_hex(16)
                with lock:
                    issued[token] = {"client": "testbed-admin", "aud": args.resource, "exp": time.time() + 7 * 86400}
                    save()
                return self.reply(200, {"access_token": token})
            if method == "POST" and parts[1:] == ["fault"]:
                b = self.body()
                known = {"latency", "status", "retry_after", "reset", "untrusted_cert", "token", "times", "name"}
                if not isinstance(b, dict) or not set(b) <= known:
                    return self.reply(400, {"error": f"faults are {sorted(known)}"})
                faults.clear()
                faults.update(b)
                # A fault starts now for every client: the vault's open keep-alive
                # connections end, as when a proxy or a new endpoint comes into the path.
                with vault_server.open_lock:
                    sys.stderr.write(f"fault {sorted(b)}: ending {len(vault_server.open)} open vault connections\n")
                    for sock in list(vault_server.open):
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                return self.reply(204)
            if method == "DELETE" and parts[1:] == ["fault"]:
                faults.clear()
                return self.reply(204)
            if method == "POST" and len(parts) == 3 and parts[1] == "forbid":
                forbidden.add(parts[2].lower())
                return self.reply(204)
            if method == "POST" and len(parts) == 3 and parts[1] == "allow":
                forbidden.discard(parts[2].lower())
                return self.reply(204)
            # A federated identity credential: client id `client_id` trusts `subject`.
            if method == "POST" and parts[1:] == ["federate"]:
                b = self.body()
                with lock:
                    federation.setdefault(b["client_id"], set()).add(b["subject"])
                    save()
                return self.reply(204)
            # A role assignment: identity `client_id` may read `secrets` (and only those).
            if method == "POST" and parts[1:] == ["vault-access"]:
                b = self.body()
                with lock:
                    vault_access[b["client_id"]] = {n.lower() for n in b["secrets"]}
                    save()
                return self.reply(204)
        return self.reply(404, {"error": "not_found"})

    def dispatch(self, method):
        try:
            if self.server.role == "vault":
                self.vault(method)
            else:
                self.token(method)
        except (ValueError, KeyError, TypeError) as e:  # malformed JSON and the like: a 400, never a crash
            self.error(400, "BadParameter", f"malformed request: {type(e).__name__}")

    def do_GET(self):
        self.dispatch("GET")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")


def choose_certificate(sock, server_name, ctx):
    """The SNI callback of the vault port: the untrusted certificate while that fault is on."""
    if faults.get("untrusted_cert") and untrusted_ctx is not None:
        sock.context = untrusted_ctx
    return None


class Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a burst of new connections (16 clients at once,
    # each handshaking in turn) would find it full. A real service accepts them.
    request_queue_size = 256


def serve(port, role, ctx):
    srv = Server(("127.0.0.1", port), Handler)
    srv.role = role
    srv.open = set()  # connections being served, so that a fault can end them
    srv.open_lock = threading.Lock()
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    return srv


def main():
    global args
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token-port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--resource", required=True, help="resource named in the 401 challenge")
    p.add_argument("--authority", required=True, help="token authority named in the 401 challenge")
    p.add_argument("--tenant", default="testbed-tenant")
    p.add_argument("--client", action="append", default=[], metavar="ID=SECRET",
                   help="a client id and the secret Entra ID accepts for it (repeatable)")
    p.add_argument("--jwks", help="the apiserver's service-account keys (JWKS), for federated assertions")
    p.add_argument("--sa-issuer", default="https://kubernetes.default.svc", help="the service-account token issuer")
    p.add_argument("--untrusted-cert", help="a certificate the bed's CA did not sign (the untrusted_cert fault)")
    p.add_argument("--untrusted-key")
    p.add_argument("--transition-seconds", type=float, default=0.5,
                   help="how long a deletion or recovery takes, during which Key Vault answers 404/409")
    args = p.parse_args()
    load()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    tctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tctx.load_cert_chain(args.cert, args.key)
    if args.untrusted_cert:
        global untrusted_ctx
        untrusted_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        untrusted_ctx.load_cert_chain(args.untrusted_cert, args.untrusted_key)
        ctx.sni_callback = choose_certificate
        # No session resumption: a resumed session skips the certificate, and a client that
        # resumed would never meet the fault's (a real interceptor could not resume either).
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    global vault_server
    vault = vault_server = serve(args.port, "vault", ctx)
    tok = serve(args.token_port, "token", tctx)
    threading.Thread(target=tok.serve_forever, daemon=True).start()
    print(f"kvstandin: vault on 127.0.0.1:{args.port}, token on 127.0.0.1:{args.token_port}", flush=True)
    vault.serve_forever()


if __name__ == "__main__":
    main()
