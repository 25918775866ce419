"""The pruned-model classes, importable without remote code.

The two modules here are also copied verbatim into every pruned model folder so that plain
``transformers`` can load it with ``trust_remote_code=True``.
"""

from pathlib import Path

from .configuration_streamprune import StreamPruneConfig
from .modeling_streamprune import StreamPruneDecoderLayer, StreamPruneForCausalLM, StreamPruneModel

REMOTE_CODE_FILES = (
    Path(__file__).with_name("configuration_streamprune.py"),
    Path(__file__).with_name("modeling_streamprune.py"),
)
# The configuration class of a DeciLM / Nemotron-NAS export (no modeling code: the engines bring their own).
DECILM_CONFIG_FILE = Path(__file__).with_name("configuration_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_streamprune.StreamPruneConfig",
    "AutoModel": "modeling_streamprune.StreamPruneModel",
    "AutoModelForCausalLM": "modeling_streamprune.StreamPruneForCausalLM",
}

__all__ = [
    "AUTO_MAP",
    "DECILM_CONFIG_FILE",
    "REMOTE_CODE_FILES",
    "StreamPruneConfig",
    "StreamPruneDecoderLayer",
    "StreamPruneForCausalLM",
    "StreamPruneModel",
]
