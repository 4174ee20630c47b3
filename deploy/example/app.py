"""An example calling service: a discount endpoint that asks its sidecar, over the Unix socket
it shares with it (deploy/k8s/app-with-sidecar.yaml, deploy/compose/compose.yaml), whether the
user is in a segment.

    python deploy/example/app.py --uds /run/seg/sidecar.sock --listen 0.0.0.0:8080

`GET /offer?user=U` -> `{"user": U, "segment": S, "member": true|false|null, "discount": P}`.
A member gets the discount; a non-member or an unknown answer (the sidecar not ready and no
fallback, or the sidecar gone) gets none: the service never guesses and never fails because
of the sidecar. `GET /healthz` is the app's own liveness.
"""

from __future__ import annotations

import sys

from aiohttp import web

from sidecar.client import DEFAULT_PATH, AsyncSidecarClient, BadRequestError, SidecarError
from sidecar.cliutil import Parser, exits_on_error, host_port

CLIENT: web.AppKey[AsyncSidecarClient] = web.AppKey("client", AsyncSidecarClient)


def build_parser() -> Parser:
    p = Parser(prog="example-app", description=__doc__.split("\n\n")[0])
    p.add_argument("--uds", default=DEFAULT_PATH, metavar="PATH", help="the sidecar's socket")
    p.add_argument("--listen", type=host_port, default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where this app serves HTTP")  # fmt: skip
    p.add_argument("--segment", default="vip_buyers", help="who gets the discount")
    p.add_argument("--discount", type=int, default=15, metavar="PERCENT", help="how much")
    return p


def make_app(uds: str, segment: str, discount: int) -> web.Application:
    app = web.Application()
    app[CLIENT] = AsyncSidecarClient(uds, timeout=0.05)  # a check answers in microseconds

    async def offer(request: web.Request) -> web.Response:
        try:
            user = int(request.query["user"])
        except (KeyError, ValueError):
            return web.json_response({"error": "give ?user=<integer id>"}, status=400)
        note = None
        try:
            member = await app[CLIENT].check(user, segment)
        except BadRequestError as exc:  # e.g. an id outside 0..2**64-1
            return web.json_response({"error": str(exc)}, status=400)
        except SidecarError as exc:  # gone or too slow: no discount, and say why
            member, note = None, f"sidecar: {exc}"
        body = {"user": user, "segment": segment, "member": member,
                "discount": discount if member else 0}  # fmt: skip
        if note:
            body["note"] = note
        return web.json_response(body)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def close(_app: web.Application) -> None:
        await app[CLIENT].close()

    app.router.add_get("/offer", offer)
    app.router.add_get("/healthz", healthz)
    app.on_cleanup.append(close)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with exits_on_error(parser.prog):
        host, port = args.listen
        web.run_app(make_app(args.uds, args.segment, args.discount), host=host, port=port,
                    print=None)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
