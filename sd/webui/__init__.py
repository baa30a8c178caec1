"""The browser UI of `sd serve`: static files (plain JS modules, no build step, nothing from a CDN) and
the two routes they need that A1111's API lacks.

The server (sd.server.app) serves `INDEX_HTML` at `/` and the folder's files at `/static/<name>` (the page
loads `static/app.js`, which imports its siblings by relative URLs). The page talks to A1111's `/sdapi/v1`
routes like any other client, plus the routes of `router(get_pipe)`, which the server includes
(`app.include_router(router(lambda: service.pipe))`); without them the page still works, with an estimated
token count ("~43/75") and A1111's 512 px default size:

    POST /sd/tokens  {"text": ..., "steps": 20, "negative": false} -> {"token_count": 43, "max_length": 75}
                     the prompt token counter, counted as A1111's UI counts (there a Gradio callback, not
                     an API route)
    GET  /sd/model   {"native_size": 512, ...}: the loaded model's own image size, the form's default
                     (the built-in shapes model makes 64 px images; A1111's fixed 512 would be wrong there)
"""

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..conditioning import CHUNK_LENGTH, tokenize_prompt
from ..prompts import extract_networks, prompt_schedule, split_and

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ..embeddings import Embeddings

STATIC_DIR = Path(__file__).parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"
MAX_TOKEN_TEXT = 100_000  # characters: a counter request is per keystroke, a novel is a mistake


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    from ..tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def token_count(
    text: str,
    steps: int = 20,
    *,
    negative: bool = False,
    tokenizer: Any = None,
    embeddings: "Embeddings | None" = None,
    emphasis: str = "Original",
) -> tuple[int, int]:
    """(tokens, capacity) as A1111's counter shows them ("43/75", "80/150"): LoRA tags taken out, the
    positive prompt split at AND, every text of the prompt-editing schedule counted, and the longest shown;
    the capacity is the next multiple of 75 (at least 75). Mirrors A1111 v1.10.1 ui.update_token_counter."""
    tokenizer = tokenizer or _default_tokenizer()
    text, _ = extract_networks(text)
    parts = [part for part, _ in split_and(text)] if not negative else [text]
    variants = [variant for part in parts for _, variant in prompt_schedule(part, max(steps, 1))]
    count = max(tokenize_prompt(v, tokenizer, embeddings, emphasis).token_count for v in variants)
    return count, -(-max(count, 1) // CHUNK_LENGTH) * CHUNK_LENGTH


def router(get_pipe: Callable[[], Any]) -> "APIRouter":
    """The web UI's own routes (see the module docstring). `get_pipe()` gives the loaded Pipeline (its
    tokenizer and embeddings, so an embedding's vectors count as A1111 counts them; its size), or None
    while none is loaded."""
    # (No `from __future__ import annotations` in this module: FastAPI reads these local classes from the
    # route functions' annotations, which must therefore be real classes, not strings.)
    from fastapi import APIRouter
    from pydantic import BaseModel, Field

    class TokensRequest(BaseModel):
        text: str = Field("", max_length=MAX_TOKEN_TEXT)
        steps: int = Field(20, ge=1, le=10_000)
        negative: bool = False

    class TokensResponse(BaseModel):
        token_count: int
        max_length: int

    class ModelResponse(BaseModel):
        native_size: int | None
        model_name: str | None

    routes = APIRouter(tags=["sd web UI"])

    @routes.post("/sd/tokens", response_model=TokensResponse)
    def tokens(request: TokensRequest) -> TokensResponse:
        """Prompt tokens as A1111's UI counts them (not an A1111 route: its counter is internal to its UI)."""
        pipe = get_pipe()
        count, capacity = token_count(
            request.text,
            request.steps,
            negative=request.negative,
            tokenizer=getattr(pipe, "tokenizer", None),
            embeddings=getattr(pipe, "embeddings", None),
        )
        return TokensResponse(token_count=count, max_length=capacity)

    @routes.get("/sd/model", response_model=ModelResponse)
    def model() -> ModelResponse:
        """The loaded model's own image size (the UI's default width and height) and name."""
        pipe = get_pipe()
        return ModelResponse(
            native_size=getattr(pipe, "native_size", None), model_name=getattr(pipe, "model_name", None)
        )

    return routes
