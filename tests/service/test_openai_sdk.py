"""The OpenAI-compatible images route as its users call it: through the official `openai` Python SDK
(its own request building, response models, stream parser and error classes) against `ldserve serve`."""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator

import openai
import pytest
from PIL import Image
from transformers import AutoTokenizer

from model_loader.text_encoder import ensure_tiny_t5

from .conftest import API_KEY, Proc, base_env, serving


@pytest.fixture(scope="module")
def serve(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """`ldserve serve` with an API key and OpenAI's model names as aliases of the served model."""
    env = base_env(redis_url, f"sdk{uuid.uuid4().hex[:6]}", api_keys=API_KEY, max_batch_size=4,
                   model_aliases="dall-e-3,gpt-image-1")
    with serving("serve", env, tmp_path_factory.mktemp("sdk")) as p:
        yield p


@pytest.fixture(scope="module")
def client(serve: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def text_tokens(*texts: str) -> int:
    """Tokens the tiny-2b preset's encoder reads for these texts (its own tokenizer, with EOS)."""
    tok = AutoTokenizer.from_pretrained(ensure_tiny_t5())
    return sum(len(tok(t).input_ids) for t in texts)


def image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_with_extensions_and_usage(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny-2b", "dall-e-3", "gpt-image-1"]
    assert client.models.retrieve("gpt-image-1").id == "gpt-image-1"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-2")
    assert missing.value.code == "model_not_found"
    prompt, negative = "a red fox in the snow at dawn", "blurry"
    r = client.images.generate(prompt=prompt, model="gpt-image-1", size="256x256", n=2, output_format="webp",
                               extra_body={"seed": 11, "negative_prompt": negative, "pruning": "fast"})
    assert isinstance(r, openai.types.ImagesResponse) and r.size == "256x256" and r.output_format == "webp"
    assert [d.model_extra["seed"] for d in r.data] == [11, 12]
    imgs = [image(d.b64_json) for d in r.data]
    assert all(i.format == "WEBP" and i.size == (256, 256) for i in imgs) and imgs[0].tobytes() != imgs[1].tobytes()
    # usage: the request's text once (prompt + negative prompt), image tokens computed after pruning
    u = r.usage
    assert u.input_tokens == text_tokens(prompt, negative) == u.input_tokens_details.text_tokens
    assert u.input_tokens_details.image_tokens == 0
    extra = u.output_tokens_details.model_extra
    assert 0 < u.output_tokens == u.output_tokens_details.image_tokens < extra["image_tokens_full"]
    assert extra["pruned_tokens"] == extra["image_tokens_full"] - u.output_tokens
    assert u.total_tokens == u.input_tokens + u.output_tokens
    plain = client.images.generate(prompt=prompt, size="256x256", extra_body={"seed": 11})
    assert plain.usage.input_tokens == text_tokens(prompt)
    assert plain.data[0].b64_json != r.data[0].b64_json


def test_stream_of_partial_images(client: openai.OpenAI) -> None:
    events = list(client.images.generate(prompt="a lighthouse", size="256x256", stream=True, partial_images=2,
                                         extra_body={"seed": 2}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    done = events[-1]
    assert isinstance(done, openai.types.ImageGenCompletedEvent)
    assert done.usage.input_tokens == text_tokens("a lighthouse")
    assert image(done.b64_json).size == (256, 256) and image(events[0].b64_json).format == "PNG"


def test_errors_arrive_as_the_sdk_error_classes(serve: Proc, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", n=9)
    assert (bad.value.status_code, bad.value.code, bad.value.param) == (400, "invalid_value", "n")
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="1000x3")
    assert bad.value.param == "size"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", extra_body={"pruning": "no-such-preset"})
    assert bad.value.param == "pruning"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="x", model="dall-e-2")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert "'tiny-2b', 'dall-e-3', 'gpt-image-1'" in missing.value.message
    wrong = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="not-the-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.images.generate(prompt="x")
    assert auth.value.code == "invalid_api_key" and auth.value.response.headers["x-request-id"].startswith("req_")
