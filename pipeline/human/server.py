"""The annotation web app: a Starlette app over one study database, served by uvicorn on 127.0.0.1.

Annotator routes (the token in the path is the annotator's identity; it sees only its own items):

    GET  /annotate/{token}                 the page (static HTML + /static/annotate.js; nothing item-specific)
    GET  /annotate/{token}/next            the next unvoted item: prompt, two image URLs, progress
    GET  /annotate/{token}/image/{key}     a PNG of one of this annotator's items (random key, no metadata)
    POST /annotate/{token}/vote            {"item": key, "choice": "left" | "right" | "tie" | "skip"}

Admin routes need ``Authorization: Bearer <admin token>``: ``GET /admin/status`` (progress per annotator) and
``GET /admin/results`` (the two-stage majority, system names included).

A vote is answered ``200`` only after its transaction is committed (store.py), so an acknowledged vote survives
a SIGKILL. Every bad request gets a 4xx with ``{"error": message}`` and writes nothing: unknown link or item
(404), a second vote on an item (409), a body that is not a small JSON object (400 / 413 / 415).
"""

from __future__ import annotations

import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from .store import StudyError, StudyStore

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1024  # bytes: a vote is about 60

_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never send it elsewhere
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'",
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_HEADERS)


def _json(data, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=_HEADERS)


async def _vote_body(request: Request) -> dict:
    """The vote's JSON object, read with a size cap; raises StudyError with the status to answer."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise StudyError("expected Content-Type: application/json", status=415)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise StudyError(f"request body over {MAX_BODY} bytes", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise StudyError(f"request body over {MAX_BODY} bytes", status=413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StudyError("body is not valid JSON; expected {\"item\": ..., \"choice\": ...}") from None
    if not isinstance(data, dict) or set(data) != {"item", "choice"} or not all(isinstance(v, str) for v in data.values()):
        raise StudyError("expected a JSON object with exactly the string fields \"item\" and \"choice\"")
    return data


def create_app(db: str | Path) -> Starlette:
    """The app for one study database (opened once; every request uses its own short connection)."""
    store = StudyStore(db)
    meta = store.meta()

    async def annotator(request: Request):
        return await run_in_threadpool(store.annotator, request.path_params["token"])

    async def page(request: Request) -> Response:
        await annotator(request)  # unknown links get the 404 below, not an empty page
        return FileResponse(STATIC / "annotate.html", headers=_HEADERS)

    async def next_item(request: Request) -> Response:
        nxt = await run_in_threadpool(store.next_item, await annotator(request))
        base = f"/annotate/{request.path_params['token']}/image/"
        if nxt["item"] is not None:
            nxt["left"], nxt["right"] = base + nxt["left"], base + nxt["right"]
        return _json({**nxt, "study": meta["name"]})

    async def image(request: Request) -> Response:
        png = await run_in_threadpool(store.image, await annotator(request), request.path_params["key"])
        return Response(png, media_type="image/png", headers={**_HEADERS, "Cache-Control": "private, max-age=3600"})

    async def vote(request: Request) -> Response:
        a = await annotator(request)
        body = await _vote_body(request)
        # SQLite commits (fsync) run in the thread pool: concurrent votes queue on the database, not the event loop
        progress = await run_in_threadpool(store.record_vote, a, body["item"], body["choice"])  # once committed
        return _json({"ok": True, "progress": progress})

    def admin(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if not store.check_admin(token):
            raise StudyError("admin routes need 'Authorization: Bearer <admin token>' (the study's admin_token.txt)",
                             status=401 if token is None else 403)

    async def status(request: Request) -> Response:
        admin(request)
        return _json({"study": meta, "annotators": await run_in_threadpool(store.annotators)})

    async def results(request: Request) -> Response:
        admin(request)
        from .aggregate import aggregate_study

        result = await run_in_threadpool(aggregate_study, store)
        return _json({"systems": meta["systems"], **result})

    async def home(request: Request) -> Response:
        return HTMLResponse("<!doctype html><title>Study</title><p>Open the link you were given.</p>", headers=_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("annotate.js", "annotate.css"):
            return _error(404, f"no static file {name!r}")
        return FileResponse(STATIC / name, headers={**_HEADERS, "Cache-Control": "no-cache"})

    async def on_study_error(request: Request, exc: StudyError) -> Response:
        return _error(exc.status, str(exc))

    async def on_http_error(request: Request, exc) -> Response:
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")

    from starlette.exceptions import HTTPException

    routes = [
        Route("/", home),
        Route("/static/{name}", static),
        Route("/annotate/{token}", page),
        Route("/annotate/{token}/next", next_item),
        Route("/annotate/{token}/image/{key}", image),
        Route("/annotate/{token}/vote", vote, methods=["POST"]),
        Route("/admin/status", status),
        Route("/admin/results", results),
    ]
    return Starlette(routes=routes, exception_handlers={StudyError: on_study_error, HTTPException: on_http_error})


def serve(db: str | Path, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted. Access logs are off: request paths carry annotators' tokens."""
    import uvicorn

    uvicorn.run(create_app(db), host=host, port=port, log_level="warning", access_log=False)
