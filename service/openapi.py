"""The gateway's OpenAPI document, serialized stably (sorted keys) for the committed copy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from service.settings import Settings


def openapi_document() -> str:
    """The OpenAPI JSON of :func:`service.app.create_app`, independent of the environment."""
    from service.app import create_app

    with tempfile.TemporaryDirectory(prefix="camres-openapi-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp), broker_url=None, store_url=None))
        try:
            return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        finally:
            app.state.camres.close()
