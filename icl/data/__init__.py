"""Data layer of icl: readers for the supported layouts, labeled subsets,
the two-stream batch sampler, augmentations and a synthetic data generator."""
from .io import Case, DataError, read_h5, read_list, read_nifti, write_h5, write_nifti
from .sources import (DATASETS, LAYOUTS, ACDCSource, BraTSSource, Item, LASource, NiftiSource, Source,
                      build_source, detect_layout, load_nifti_case)
from .splits import Splits, make_splits
from .sampler import TwoStreamBatchSampler
from .dataset import TrainDataset
from .transforms import IntensityAugment, TrainAugment
from .synthetic import make_synthetic

ACDC_PATIENTS_TO_SLICES = dict(ACDCSource.TABLE)

__all__ = [
    "ACDCSource", "ACDC_PATIENTS_TO_SLICES", "BraTSSource", "Case", "DATASETS", "DataError", "IntensityAugment",
    "Item", "LASource", "LAYOUTS", "NiftiSource", "Source", "Splits", "TrainAugment", "TrainDataset",
    "TwoStreamBatchSampler", "build_source", "detect_layout", "load_nifti_case", "make_splits",
    "make_synthetic", "read_h5", "read_list", "read_nifti", "write_h5", "write_nifti",
]
