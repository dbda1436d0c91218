"""The chat page: a small static page served by the same replicas as the API, at `/ui`.

The page is plain HTML, CSS and JavaScript with no build step and no third-party code. It talks to
the OpenAI-compatible API of the same origin (`/v1/models`, `/v1/chat/completions` with
`stream: true`), so the page gets exactly the auth, limits, validation and metrics that every other
client gets: it holds no privilege of its own, and the files it serves are public (the API key is
typed into the page and sent as a bearer token, never embedded in it).

Why not Gradio: it would add a second web server with its own queue, websocket protocol and
auth outside Ray Serve's back-pressure, and a large dependency, for one page.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

PAGE_PATH = "/ui"

# Each file the page needs, with its media type. Nothing else under chat_ui/ is reachable.
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}

# Scripts and styles only from this origin (no inline code, so injected text cannot run); images
# from data:/blob: URLs (the picked image is previewed locally); requests only to this origin.
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return resources.files("llava_platform.serving").joinpath("chat_ui", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    # Relative, so the redirect stays right under any route prefix or proxy path.
    return RedirectResponse("ui", status_code=307)


@router.get(PAGE_PATH)
async def page() -> Response:
    return _file("index.html")


@router.get(PAGE_PATH + "/chat.js")
async def script() -> Response:
    return _file("chat.js")


@router.get(PAGE_PATH + "/chat.css")
async def style() -> Response:
    return _file("chat.css")
