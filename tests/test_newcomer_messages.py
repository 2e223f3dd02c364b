"""Refused images tell a server user which `vlmlab serve` flag to change, never a Python class
or attribute name."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from serverutil import data_url, image_message, png_bytes, running_server
from vlmlab.config import EngineSpec, ServerSettings
from vlmlab.media import MediaPolicy, load_image
from vlmlab.protocol.errors import ForbiddenMediaError

CODE_NAMES = ("MediaPolicy", "allowed_local_root", "allowed_domains", "trusted_hosts")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("allowed")
    settings = ServerSettings(
        engines=(EngineSpec(model="nano", device="cpu"),),
        allowed_local_media_path=str(root),
        allowed_media_domains=("images.example.com", "127.0.0.1"),
        max_image_bytes=4000,
        max_image_pixels=100 * 100,
        default_max_tokens=4,
    )
    with running_server(settings) as running:
        yield running


def refusal(server, url: str) -> str:
    body = {"model": "nano", "messages": image_message("What shape?", url), "max_tokens": 4}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]["message"]
    for name in CODE_NAMES:
        assert name not in message, message
    return message


def test_file_outside_the_allowed_root_names_the_flag(server, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())
    assert "--allowed-local-media-path" in refusal(server, outside.as_uri())


def test_oversize_image_names_the_flag(server) -> None:
    big = os.urandom(6000)  # over 4000 bytes before any decoding
    assert "--max-image-bytes" in refusal(server, data_url(big))


def test_too_many_pixels_names_the_flag(server) -> None:
    assert "--max-image-pixels" in refusal(server, data_url(png_bytes(200, 200)))


def test_domain_not_allowed_names_the_flag(server) -> None:
    assert "--allowed-media-domains" in refusal(server, "http://elsewhere.example.org/cat.png")


def test_private_address_names_the_trusted_hosts_flag(server) -> None:
    # Allowed by the domain list, refused by the private-address guard.
    assert "--trusted-media-hosts" in refusal(server, "http://127.0.0.1:9/cat.png")


def test_local_files_disabled_names_the_flag(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    with pytest.raises(ForbiddenMediaError) as info:
        load_image(image.as_uri(), MediaPolicy())
    assert "--allowed-local-media-path" in info.value.message
    assert not any(name in info.value.message for name in CODE_NAMES)
