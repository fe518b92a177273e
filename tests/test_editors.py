"""Tests of editors.py: the two diffusion editors on tiny pipelines, the two API editors offline.

The tiny FLUX Kontext and Qwen-Image-Edit pipelines (tiny_pipelines.py) are built and saved once per module, then
loaded by the editors through the same `from_pretrained(folder)` path as the real weights. GPT-Image talks to a
small stdlib HTTP server through the real `openai` client; Nano Banana's response parsing runs on fake responses
shaped like google-genai's, and its client on a fake `google.genai` module (the SDK is not installed here).
"""

from __future__ import annotations

import base64
import email.parser
import enum
import io
import json
import shutil
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image
from safetensors.torch import load_file

import editors
import evaluate
from editors import EditError, EditorOptions, EditorSetupError
from miniature.tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_image_edit

STEPS = 2
SOURCE_SIZE = (64, 48)  # non-square on purpose: width and height must not be swapped anywhere


def tiny_options(folder: Path) -> EditorOptions:
    return EditorOptions(model=str(folder), steps=STEPS, dtype="float32", device="cpu")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def flux_editor(tmp_path_factory: pytest.TempPathFactory) -> editors.FluxKontextEditor:
    folder = save_tiny_flux_kontext(tmp_path_factory.mktemp("tiny_flux_kontext"), seed=0)
    return editors.FluxKontextEditor(tiny_options(folder))


@pytest.fixture(scope="module")
def qwen_editor(tmp_path_factory: pytest.TempPathFactory) -> editors.QwenImageEditor:
    folder = save_tiny_qwen_image_edit(tmp_path_factory.mktemp("tiny_qwen_image_edit"), seed=0)
    return editors.QwenImageEditor(tiny_options(folder))


@pytest.fixture
def transformer_calls() -> Iterator[Callable]:
    """spy(editor) -> list that receives the keyword arguments of every transformer call of that editor."""
    handles = []

    def spy(editor) -> list[dict]:
        calls: list[dict] = []
        hook = lambda module, args, kwargs, output: calls.append(kwargs)  # noqa: E731
        handles.append(editor.load().transformer.register_forward_hook(hook, with_kwargs=True))
        return calls

    yield spy
    for handle in handles:
        handle.remove()


# ------------------------------------------------------------------------------------------------------- geometry


def test_working_size_keeps_small_sources_rounds_to_multiples_and_caps_large_ones() -> None:
    assert editors.working_size(64, 48, multiple=16, max_area=1024 * 1024) == (64, 48)
    assert editors.working_size(50, 38, multiple=16, max_area=1024 * 1024) == (48, 32)  # nearest multiples
    assert editors.working_size(10, 5, multiple=16, max_area=1024 * 1024) == (16, 16)  # at least one multiple
    width, height = editors.working_size(4000, 3000, multiple=16, max_area=1024 * 1024)
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width * height - 1024 * 1024) / (1024 * 1024) < 0.03  # scaled down to the cap...
    assert abs(width / height - 4 / 3) < 0.02  # ...with the aspect ratio kept


# ---------------------------------------------------------------------------------------------------- FLUX Kontext


def test_flux_edits_at_source_size_and_is_reproducible_per_seed(flux_editor, make_image) -> None:
    source = make_image(size=SOURCE_SIZE, seed=1)
    first = flux_editor.edit(source, "make the circle blue", seed=0)
    again = flux_editor.edit(source, "make the circle blue", seed=0)
    other = flux_editor.edit(source, "make the circle blue", seed=1)
    assert first.size == SOURCE_SIZE and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_flux_runs_at_the_nearest_valid_size_with_the_official_guidance(
    flux_editor, make_image, transformer_calls
) -> None:
    calls = transformer_calls(flux_editor)
    edited = flux_editor.edit(make_image(size=(50, 38), seed=2), "add a hat", seed=0)
    assert edited.size == (50, 38)  # resized back to the source size
    assert len(calls) == STEPS  # guidance-distilled: one transformer call per step, no CFG pass
    # 50x38 -> 48x32 working size -> (48/16) x (32/16) = 6 packed tokens for the noise plus 6 for the source image
    assert calls[0]["hidden_states"].shape[1] == 12
    assert calls[0]["guidance"].tolist() == [editors.FluxKontextEditor.DEFAULT_GUIDANCE]


# ------------------------------------------------------------------------------------------------- Qwen-Image-Edit


def test_qwen_edits_at_source_size_and_is_reproducible_per_seed(qwen_editor, make_image) -> None:
    source = make_image(size=SOURCE_SIZE, seed=3)
    first = qwen_editor.edit(source, "remove the rectangle", seed=0)
    again = qwen_editor.edit(source, "remove the rectangle", seed=0)
    other = qwen_editor.edit(source, "remove the rectangle", seed=1)
    assert first.size == SOURCE_SIZE and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_qwen_really_runs_true_cfg_with_the_negative_prompt(qwen_editor, make_image, transformer_calls) -> None:
    calls = transformer_calls(qwen_editor)
    qwen_editor.edit(make_image(size=SOURCE_SIZE, seed=4), "make the background green", seed=0)
    assert len(calls) == 2 * STEPS  # conditional and unconditional pass at every step
    conditional, unconditional = calls[0]["encoder_hidden_states"], calls[1]["encoder_hidden_states"]
    # The two passes read different prompts (the instruction, then " "), so their text embeddings differ.
    assert conditional.shape != unconditional.shape or not torch.allclose(conditional, unconditional)


def test_qwen_condition_image_uses_the_working_area_not_one_megapixel(qwen_editor, make_image) -> None:
    pipe = qwen_editor.load()
    seen: list[tuple[int, ...]] = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        qwen_editor.edit(make_image(size=SOURCE_SIZE, seed=5), "add a moon", seed=0)
    finally:
        handle.remove()
    width, height = SOURCE_SIZE
    expected_width, expected_height, _ = calculate_dimensions(width * height, width / height)
    assert seen == [(1, 3, 1, expected_height, expected_width)]  # (B, C, T, H, W), vs 1024x768 in the stock pipeline


# -------------------------------------------------------------------------------------- factory and missing weights


def test_make_editor_builds_each_editor_lazily_and_rejects_unknown_names() -> None:
    for name, cls in editors.EDITORS.items():
        editor = editors.make_editor(name, EditorOptions(model="./no/such/folder"))  # loads nothing yet
        assert isinstance(editor, cls) and editor.name == name
    with pytest.raises(ValueError, match="unknown editor 'sdxl'") as info:
        editors.make_editor("sdxl")
    for name in ("flux", "qwen", "nano-banana", "gpt-image"):
        assert name in str(info.value)


def test_missing_flux_weights_name_the_model_and_the_gated_access(make_image) -> None:
    with pytest.raises(EditorSetupError) as info:
        editors.FluxKontextEditor().edit(make_image(), "anything")
    message = str(info.value)
    for expected in ("black-forest-labs/FLUX.1-Kontext-dev", "GATED", "hf auth login", "hf download", "model"):
        assert expected in message


def test_missing_qwen_weights_name_the_model(make_image) -> None:
    with pytest.raises(EditorSetupError, match=r"Qwen/Qwen-Image-Edit.*hf download Qwen/Qwen-Image-Edit"):
        editors.QwenImageEditor().edit(make_image(), "anything")


@pytest.mark.parametrize("fixture", ["flux_editor", "qwen_editor"])
def test_a_pickle_checkpoint_is_refused_with_a_clear_message(fixture, request, tmp_path, make_image, monkeypatch):
    """The transformer's weights as a pickle (.bin) instead of safetensors: refused before anything is unpickled."""
    editor = request.getfixturevalue(fixture)
    folder = tmp_path / "pickled"
    shutil.copytree(editor.model, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    unpickled, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kw: unpickled.append(args) or real_load(*args, **kw))
    with pytest.raises(EditorSetupError) as info:
        type(editor)(tiny_options(folder)).edit(make_image(), "anything")
    message = str(info.value)
    assert "transformer" in message and "diffusion_pytorch_model.bin" in message and "safetensors" in message
    assert "pickle" in message and unpickled == []
    with pytest.raises(EditorSetupError, match="pickle"):  # evaluate.py's setup stage, before any work starts
        evaluate.check_editor(type(editor)(tiny_options(folder)))


@pytest.mark.parametrize("cls", [editors.FluxKontextEditor, editors.QwenImageEditor])
def test_missing_local_folder_is_named(cls, tmp_path, make_image) -> None:
    missing = tmp_path / "not_downloaded"
    with pytest.raises(EditorSetupError, match="does not exist") as info:
        cls(EditorOptions(model=str(missing))).edit(make_image(), "anything")
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------------------------ GPT-Image over HTTP


@dataclass
class ImagesServer:
    """A stdlib HTTP server answering POST /v1/images/edits with `reply` = (status, JSON body); records requests."""

    reply: tuple[int, dict]
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, payload = server.reply if self.path == "/v1/images/edits" else (404, {"error": {}})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def form(self) -> dict[str, bytes]:
        """The multipart form fields of the last request: name -> raw value."""
        _, headers, body = self.requests[-1]
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {headers['content-type']}\r\n\r\n".encode() + body
        )
        return {
            part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.get_payload()
        }


@pytest.fixture
def images_server() -> Iterator[ImagesServer]:
    green = Image.new("RGB", (48, 32), (0, 200, 0))
    server = ImagesServer(
        reply=(200, {"created": 0, "data": [{"b64_json": base64.b64encode(editors.png_bytes(green)).decode()}]})
    )
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def gpt_editor(server: ImagesServer) -> editors.GPTImageEditor:
    return editors.GPTImageEditor(EditorOptions(base_url=server.base_url, api_key="test-key", timeout_s=10))


def test_gpt_image_sends_the_edit_request_and_returns_the_decoded_image(images_server, make_image) -> None:
    source = make_image(size=SOURCE_SIZE, seed=6)
    edited = gpt_editor(images_server).edit(source, "paint the sky orange", seed=0)
    assert edited.size == SOURCE_SIZE  # the 48x32 reply, resized to the source size
    assert np.abs(pixels(edited) - np.array([0, 200, 0])).max() <= 2  # it is the server's green image
    path, headers, _ = images_server.requests[-1]
    assert path == "/v1/images/edits" and headers["authorization"] == "Bearer test-key"
    form = images_server.form()
    assert form["model"] == b"gpt-image-1" and form["prompt"] == b"paint the sky orange"
    assert form["size"] == b"1536x1024" and form["input_fidelity"] == b"high"  # 4:3 is closest to 3:2
    assert np.array_equal(pixels(Image.open(io.BytesIO(form["image"]))), pixels(source))  # the source, lossless


def test_gpt_image_moderation_block_is_an_edit_error(images_server, make_image) -> None:
    images_server.reply = (
        400,
        {
            "error": {
                "message": "Your request was rejected",
                "type": "image_generation_user_error",
                "code": "moderation_blocked",
                "param": None,
            }
        },
    )
    with pytest.raises(EditError, match="moderation_blocked"):
        gpt_editor(images_server).edit(make_image(), "something disallowed")


def test_gpt_image_reply_without_image_data_is_an_edit_error(images_server, make_image) -> None:
    images_server.reply = (200, {"created": 0, "data": []})
    with pytest.raises(EditError, match="no image data"):
        gpt_editor(images_server).edit(make_image(), "anything")


def test_gpt_image_without_api_key_says_which_variable(monkeypatch, make_image) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EditorSetupError, match="OPENAI_API_KEY"):
        editors.GPTImageEditor().edit(make_image(), "anything")


def test_gpt_image_size_follows_the_aspect_ratio() -> None:
    assert editors.gpt_image_size(512, 512) == "1024x1024"
    assert editors.gpt_image_size(1920, 1080) == "1536x1024"
    assert editors.gpt_image_size(600, 1000) == "1024x1536"


# ----------------------------------------------------------------------------------------- Nano Banana (Gemini)


class FinishReason(enum.Enum):  # stands in for google.genai.types.FinishReason
    STOP = "STOP"
    IMAGE_SAFETY = "IMAGE_SAFETY"


def fake_response(*parts, finish_reason=FinishReason.STOP, block_reason=None, candidates=True):
    """An object shaped like google-genai's GenerateContentResponse."""
    ns = types.SimpleNamespace
    candidate = ns(content=ns(parts=list(parts)), finish_reason=finish_reason, finish_message=None)
    return ns(candidates=[candidate] if candidates else None, prompt_feedback=ns(block_reason=block_reason))


def image_part(image: Image.Image):
    return types.SimpleNamespace(
        text=None, inline_data=types.SimpleNamespace(mime_type="image/png", data=editors.png_bytes(image))
    )


def text_part(text: str):
    return types.SimpleNamespace(text=text, inline_data=None)


def test_gemini_response_with_an_image_part_gives_that_image(make_image) -> None:
    image = make_image(size=(40, 30), seed=7)
    parsed = editors.image_from_gemini_response(fake_response(text_part("Here you go"), image_part(image)))
    assert np.array_equal(pixels(parsed), pixels(image))


def test_gemini_response_without_an_image_is_an_edit_error_with_the_reason() -> None:
    refused = fake_response(text_part("I can't help with that."), finish_reason=FinishReason.IMAGE_SAFETY)
    with pytest.raises(EditError, match=r"finish_reason=IMAGE_SAFETY.*I can't help with that"):
        editors.image_from_gemini_response(refused)
    with pytest.raises(EditError, match="prompt blocked: SAFETY"):
        editors.image_from_gemini_response(fake_response(candidates=False, block_reason="SAFETY"))


def test_nano_banana_without_the_sdk_says_how_to_install_it(monkeypatch, make_image) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    monkeypatch.setitem(sys.modules, "google", None)  # makes `from google import genai` fail, installed or not
    monkeypatch.setitem(sys.modules, "google.genai", None)
    with pytest.raises(EditorSetupError, match="pip install google-genai"):
        editors.NanoBananaEditor().edit(make_image(), "anything")


def test_nano_banana_without_api_key_names_the_variables(monkeypatch, make_image) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(EditorSetupError, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        editors.NanoBananaEditor().edit(make_image(), "anything")


def test_nano_banana_calls_generate_content_and_resizes_to_the_source(monkeypatch, make_image) -> None:
    requests: list[dict] = []
    reply = make_image(size=(32, 32), seed=8)

    class Client:  # stands in for google.genai.Client
        def __init__(self, api_key: str):
            assert api_key == "test-key"
            self.models = types.SimpleNamespace(generate_content=self.generate_content)

        def generate_content(self, **request):
            requests.append(request)
            return fake_response(image_part(reply))

    genai = types.ModuleType("google.genai")
    genai.Client = Client
    google = types.ModuleType("google")
    google.genai = genai
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.genai", genai)
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    source = make_image(size=SOURCE_SIZE, seed=9)
    edited = editors.NanoBananaEditor().edit(source, "make it night", seed=0)
    assert edited.size == SOURCE_SIZE
    [request] = requests
    assert request["model"] == "gemini-2.5-flash-image"
    instruction, image = request["contents"]
    assert instruction == "make it night" and np.array_equal(pixels(image), pixels(source))
