"""The docs pages and their assets come from the service itself (the browser suite loads them for real)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api.docs import REDOC_LOGO


def test_pages_reference_only_their_own_origin(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        addresses = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]?([^'")\s>]+)""", page.text)
        assert addresses, page.text
        for address in addresses:
            assert address.startswith("/"), f"{path} refers to {address}"
            assert client.get(address).status_code == 200, address


def test_redoc_bundle_is_served_without_its_cdn_logo(client: TestClient) -> None:
    bundle = client.get("/docs-assets/redoc.standalone.js")
    assert bundle.status_code == 200
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert len(bundle.content) > 500_000
    assert REDOC_LOGO not in bundle.content
    assert b"cdn.redoc.ly" not in bundle.content
