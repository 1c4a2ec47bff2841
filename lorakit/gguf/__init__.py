"""GGUF files for llama.cpp and Ollama: the families, tokenizers, export, an Ollama Modelfile, and checks in
llama.cpp."""

from .export import export_gguf

__all__ = ["export_gguf"]
