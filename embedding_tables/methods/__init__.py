"""Every compression method as one module: its options, plan, index transform, reference and
what the rest of embtab asks of it (docs/adding-a-method.md). Importing this package registers
the built-in methods."""

from embedding_tables.methods.base import Method
from embedding_tables.methods.collisionless import Collisionless
from embedding_tables.methods.full import Full
from embedding_tables.methods.graphhash import GraphHash
from embedding_tables.methods.hash import Hash
from embedding_tables.methods.qr import QR
from embedding_tables.methods.registry import method_class, method_names, register
from embedding_tables.methods.robe import ROBE
from embedding_tables.methods.ttrec import TTRec
from embedding_tables.methods.unified import Unified

__all__ = [
    "QR",
    "ROBE",
    "Collisionless",
    "Full",
    "GraphHash",
    "Hash",
    "TTRec",
    "Method",
    "Unified",
    "method_class",
    "method_names",
    "register",
]
