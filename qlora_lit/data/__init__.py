"""Instruction data: sources, prompts, collation and the DataModule."""

from qlora_lit.data.datamodule import KoAlpacaDataModule

__all__ = ["KoAlpacaDataModule"]
