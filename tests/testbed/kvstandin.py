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

Shapes follow the Key Vault REST reference (SecretBundle, KeyVaultError). State is kept in
a JSON file so a stop/start (an outage in a test) keeps the secrets.

Test-control endpoints live on the token port under /_testbed/ (request counters, forcing
a 403 for a secret name); they are the only things Key Vault itself does not have.
"""
import argparse
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

API_VERSIONS = {"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"}
NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")

lock = threading.Lock()
state = {"secrets": {}}  # name -> [version dicts], newest last
forbidden = set()  # names that answer 403 (an RBAC denial, which Key Vault decides per identity)
counters = {"secrets_get": 0, "secrets_put": 0, "challenges": 0, "tokens": 0, "assertion_tokens": 0,
            # GETs of one secret (any version) by its name, so a test can prove who read what
            # while other tests use the vault too
            "secrets_get_by_name": {}}
args = None


def save():
    tmp = args.state + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, args.state)


def load():
    global state
    if os.path.exists(args.state):
        with open(args.state) as f:
            state = json.load(f)


def bundle(host, name, v):
    b = {
        "value": v["value"],
        "id": f"https://{host}/secrets/{name}/{v['version']}",
        "attributes": dict(v["attributes"], recoveryLevel="Recoverable+Purgeable", recoverableDays=90),
        "tags": v.get("tags") or {},
    }
    if v.get("contentType"):
        b["contentType"] = v["contentType"]
    return b


def item(host, name, v):
    b = bundle(host, name, v)
    del b["value"]
    return b


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvstandin"

    def log_message(self, fmt, *a):  # one line per request, never a value
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % a))

    def reply(self, code, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
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

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    # ---- Key Vault port -------------------------------------------------------------
    def vault(self, method):
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        parts = [p for p in u.path.split("/") if p]
        if not parts or parts[0] != "secrets":
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
        name = parts[1] if len(parts) > 1 else ""
        if name and not NAME_RE.match(name):
            return self.error(400, "BadParameter", f"The request URI contains an invalid name: {name}")
        if name in forbidden:
            return self.error(403, "Forbidden", f"Caller is not authorized to perform action on resource. Action: 'Microsoft.KeyVault/vaults/secrets/getSecret/action' Resource: secret {name}", "ForbiddenByRbac")
        with lock:
            if method == "PUT" and len(parts) == 2:
                counters["secrets_put"] += 1
                b = self.body()
                if "value" not in b:
                    return self.error(400, "BadParameter", "Property 'value' is required.")
                now = int(time.time())
                attrs = {"enabled": True, "created": now, "updated": now}
                for k in ("enabled", "exp", "nbf"):
                    if k in (b.get("attributes") or {}):
                        attrs[k] = b["attributes"][k]
                v = {"version": secrets.token_hex(16), "value": b["value"], "attributes": attrs,
                     "contentType": b.get("contentType"), "tags": b.get("tags")}
                state["secrets"].setdefault(name, []).append(v)
                save()
                return self.reply(200, bundle(host, name, v))
            versions = state["secrets"].get(name)
            if method == "GET" and len(parts) == 2 and name:
                parts.append("")
            if method in ("GET", "PATCH") and len(parts) == 3 and parts[2] != "versions":
                if method == "GET":
                    by_name = counters["secrets_get_by_name"]
                    by_name[name.lower()] = by_name.get(name.lower(), 0) + 1
                if not versions:
                    return self.error(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault. If you recently deleted this secret you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
                ver = parts[2]
                v = versions[-1] if ver == "" else next((x for x in versions if x["version"] == ver), None)
                if v is None:
                    return self.error(404, "SecretNotFound", f"A secret with (name/id) {name}/{ver} was not found in this key vault.")
                if method == "PATCH":
                    b = self.body()
                    v["attributes"].update({k: b["attributes"][k] for k in ("enabled", "exp", "nbf") if k in (b.get("attributes") or {})})
                    v["attributes"]["updated"] = int(time.time())
                    if "contentType" in b:
                        v["contentType"] = b["contentType"]
                    save()
                    return self.reply(200, item(host, name, v))
                counters["secrets_get"] += 1
                if not v["attributes"].get("enabled", True):
                    return self.error(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled")
                return self.reply(200, bundle(host, name, v))
            if method == "GET" and len(parts) == 3 and parts[2] == "versions":
                return self.reply(200, {"value": [item(host, name, x) for x in (versions or [])], "nextLink": None})
            if method == "GET" and len(parts) == 1:
                return self.reply(200, {"value": [item(host, n, vs[-1]) for n, vs in state["secrets"].items()], "nextLink": None})
        return self.error(405, "BadRequest", f"{method} {u.path} is not supported by the test bed's vault")

    # ---- token / test-control port ----------------------------------------------------
    def token(self, method):
        u = urlsplit(self.path)
        parts = [p for p in u.path.split("/") if p]
        if method == "POST" and len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            n = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(n).decode())
            if form.get("grant_type", [""])[0] not in ("client_credentials",):
                return self.reply(400, {"error": "unsupported_grant_type"})
            if not form.get("client_id") or not (form.get("client_secret") or form.get("client_assertion")):
                return self.reply(401, {"error": "invalid_client", "error_description": "client_id and a secret or assertion are required"})
            counters["tokens"] += 1
            if form.get("client_assertion"):
                counters["assertion_tokens"] += 1
            return self.reply(200, {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                                    "access_token": "testbed." + secrets.token_hex(16)})
        if parts[:1] == ["_testbed"]:
            if method == "GET" and parts[1:] == ["counters"]:
                return self.reply(200, counters)
            if method == "POST" and len(parts) == 3 and parts[1] == "forbid":
                forbidden.add(parts[2])
                return self.reply(204)
            if method == "POST" and len(parts) == 3 and parts[1] == "allow":
                forbidden.discard(parts[2])
                return self.reply(204)
        return self.reply(404, {"error": "not_found"})

    def dispatch(self, method):
        try:
            if self.server.role == "vault":
                self.vault(method)
            else:
                self.token(method)
        except (ValueError, KeyError) as e:  # malformed JSON and the like: a 400, never a crash
            self.error(400, "BadParameter", f"malformed request: {type(e).__name__}")

    def do_GET(self):
        self.dispatch("GET")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_POST(self):
        self.dispatch("POST")


def serve(port, role, ctx):
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.role = role
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
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
    args = p.parse_args()
    load()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    vault = serve(args.port, "vault", ctx)
    tok = serve(args.token_port, "token", ctx)
    threading.Thread(target=tok.serve_forever, daemon=True).start()
    print(f"kvstandin: vault on 127.0.0.1:{args.port}, token on 127.0.0.1:{args.token_port}", flush=True)
    vault.serve_forever()


if __name__ == "__main__":
    main()
