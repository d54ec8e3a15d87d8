"""The local model store: names, sha256 blobs, manifests, Modelfiles (docs/store.md)."""

from corral.store.create import create_model
from corral.store.manifest import Descriptor, Manifest, parse_manifest
from corral.store.modelfile import Modelfile, parse_modelfile, render_modelfile
from corral.store.names import InvalidNameError, ModelName, check_digest, parse_name
from corral.store.store import ModelEntry, ModelInfo, Store

__all__ = ["Descriptor", "InvalidNameError", "Manifest", "ModelEntry", "ModelInfo", "ModelName", "Modelfile",
           "Store", "check_digest", "create_model", "parse_manifest", "parse_modelfile", "parse_name",
           "render_modelfile"]
