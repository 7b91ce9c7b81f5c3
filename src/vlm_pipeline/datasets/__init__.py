"""Kedro datasets for vlm-pipeline. Every save is atomic: written beside the target, then renamed."""

from vlm_pipeline.datasets.arrow import ArrowDataset
from vlm_pipeline.datasets.directory import DirectoryDataset, FilePathDataset, StagingDirectoryDataset
from vlm_pipeline.datasets.jsonl import JSONDataset, JSONLinesDataset, RawLinesDataset
from vlm_pipeline.datasets.reports import FigureDataset, TextDataset

__all__ = [
    "ArrowDataset",
    "DirectoryDataset",
    "FigureDataset",
    "FilePathDataset",
    "JSONDataset",
    "JSONLinesDataset",
    "RawLinesDataset",
    "StagingDirectoryDataset",
    "TextDataset",
]
