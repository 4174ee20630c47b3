"""The operators' page: `GET /ui` and its two assets, static files shipped in the package
(`sidecar/server/ui/`), read once when the app is built. Nothing is fetched at run time;
the page reads the documented JSON routes. `--no-ui` leaves these routes out."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

#: asset name -> content type; only these are served (no path from the request reaches the
#: filesystem)
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}

# The page needs nothing but itself and the API: an injected script or handler would not run
# even if some text ever reached the DOM as markup.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("sidecar.server").joinpath("ui", name).read_bytes()


def add_console(app: web.Application) -> None:
    page = _read("index.html")
    assets = {name: (_read(name), ctype) for name, ctype in ASSETS.items()}

    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["asset"])
        if found is None:
            raise web.HTTPNotFound()
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=HEADERS)

    app.router.add_get("/ui", index, allow_head=False)
    app.router.add_get("/ui/{asset}", asset, allow_head=False)
