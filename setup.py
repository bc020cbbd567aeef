"""Packaging for ish_tf: gene-expression image representations on TensorFlow/Keras 3."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.12",
    "keras-tuner>=1.4.7",
    # TF 2.21 no longer pulls TensorBoard in, and KerasTuner imports it.
    "tensorboard>=2.21,<2.22",
    "numpy>=1.26",
    "pandas>=2.1",
    "scikit-learn>=1.4",
    "pillow>=10.0",
    "absl-py>=2.1",
    "matplotlib>=3.8",
    "requests>=2.31",
    "openpyxl>=3.1",  # pandas' reader for the Zeng et al. 2012 .xlsx table
]

setup(
    name="ish_tf",
    version="0.1.0",
    description=(
        "Learn and evaluate compact representations of gene-expression (ISH) images "
        "with TensorFlow 2 / Keras 3: TFRecord pipeline, triplet ResNet50, CDAE, ISH CNN."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ish_tf", "ish_tf.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6",
                 "tensorflow-serving-api>=2.21,<2.22", "anndata>=0.10",
                 # Every optional path is tested in CI, so the test extra pulls them all in.
                 "apache-beam[tfrecord]>=2.68", "tifffile>=2024.1", "pyarrow>=15"],
        # .h5ad expression matrices (bin/ingest --expression); imported only where read.
        "expression": ["anndata>=0.10"],
        "umap": ["umap-learn>=0.5"],
        "parquet": ["pyarrow>=15"],
        # bin/extract --runner=beam and bin/embed --runner=beam. Plain apache-beam cannot
        # write TFRecords (it needs crcmod), hence the [tfrecord] extra.
        "beam": ["apache-beam[tfrecord]>=2.68"],
        # Pyramidal/tiled TIFF and OME-TIFF sections (bin/ingest, bin/extract).
        # imagecodecs: JPEG-compressed tiles (SVS, most scanner TIFFs); openslide-python is
        # optional and used for other slide formats where it is installed.
        "wsi": ["tifffile>=2024.1", "imagecodecs>=2024.1"],
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
