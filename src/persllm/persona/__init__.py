"""Persona corpora: reading the knowledge and style files of each stage into chunks with references."""

from persllm.persona.corpus import Chunk, read_stage_chunks, split_long, split_paragraphs

__all__ = ["Chunk", "read_stage_chunks", "split_long", "split_paragraphs"]
