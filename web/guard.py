"""Who may ask the page what: the Host check, the token (header or cookie) and same-origin writes.

- Host: a request must name the address the page is bound to (or a name in `web.names`); anything
  else gets 421, so a DNS-rebound name cannot reach a loopback page.
- Token: there always is one (configured, or generated into the fleet home on first start). Every
  `/api` route needs it, as `Authorization: Bearer` or the cookie that `/?token=...` sets (the link
  `fleetd up` prints, as Jupyter does); `/healthz` and `/metrics` need it unless listed in `web.open`.
  The HTML pages and static files carry no data and are served to anyone who passes the Host check.
- Writes: the token, a JSON body (a cross-site form cannot send one without a preflight this server
  never grants), and same-origin (`Sec-Fetch-Site`, `Origin`).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from aiohttp import web

from fleet.config import ConfigError, WebConfig

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
COOKIE = "fleet_token"
TOKEN_FILE = "web-token"  # under the fleet home, when no token is configured
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def configured_token(cfg: WebConfig, env: dict[str, str] | None = None) -> str | None:
    """The configured token: $FLEET_WEB_TOKEN, else the file web.token_file names. Binding beyond
    loopback needs one configured (a generated token is for the person at this machine)."""
    env = dict(os.environ) if env is None else env
    token = env.get("FLEET_WEB_TOKEN", "").strip()
    if not token and cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"web.token_file: cannot read {cfg.token_file}: {e.strerror}") from None
    if cfg.host not in LOOPBACK and not token:
        raise ConfigError(
            f"web.host = {cfg.host!r} serves beyond loopback: set web.token_file or FLEET_WEB_TOKEN"
        )
    return token or None


def web_token(cfg: WebConfig, home: Path, env: dict[str, str] | None = None) -> str:
    """The configured token, else the one in <home>/web-token, made (mode 0600) on first start."""
    token = configured_token(cfg, env)
    if token:
        return token
    path = home / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def allowed_hosts(cfg: WebConfig, port: int) -> frozenset[str] | None:
    """Host header values the page answers to; None when bound to every address without names."""
    names = {n.lower() for n in cfg.names}  # compared with the lower-cased Host header
    if cfg.host in ("0.0.0.0", "::", ""):
        if not names:
            return None
    elif cfg.host in LOOPBACK:
        names |= LOOPBACK
    else:
        names.add(cfg.host)
    bracketed = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    return frozenset(bracketed | {f"{n}:{port}" for n in bracketed})


class Guard:
    def __init__(self, cfg: WebConfig, token: str) -> None:
        self.cfg, self.token = cfg, token
        self.hosts: frozenset[str] | None = None  # set once the port is known

    def listening(self, port: int) -> None:
        self.hosts = allowed_hosts(self.cfg, port)

    def has_token(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        given = given or request.cookies.get(COOKIE, "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.hosts is not None and request.host.lower() not in self.hosts:
            return error(421, "misdirected", f"this page does not answer to host {request.host!r}")
        if "token" in request.query:
            return self._sign_in(request)
        path = request.path
        protected = path.startswith("/api/") or (
            path in ("/healthz", "/metrics") and path not in self.cfg.open
        )
        if protected and not self.has_token(request):
            return error(401, "unauthorized", "this needs the fleet's web token (the link fleetd up prints)")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            site = request.headers.get("Sec-Fetch-Site")
            origin = request.headers.get("Origin")
            if (site is not None and site not in ("same-origin", "none")) or (
                origin is not None and origin != f"{request.scheme}://{request.host}"
            ):
                return error(403, "refused", "write actions are taken from this page's own origin only")
            if request.content_type != "application/json":
                return error(415, "bad_request", "send the request body as application/json")
        return await handler(request)

    def _sign_in(self, request: web.Request) -> web.StreamResponse:
        """`/?token=...`: set the cookie and drop the token from the address bar."""
        if not hmac.compare_digest(request.query["token"].encode(), self.token.encode()):
            return error(401, "unauthorized", "that is not the fleet's web token")
        query = {k: v for k, v in request.query.items() if k != "token"}
        target = request.rel_url.with_query(query)
        response = web.HTTPFound(str(target))
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/")
        return response


def error(status: int, code: str, message: str) -> web.Response:
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    return web.Response(body=body, status=status, content_type="application/json")
