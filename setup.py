"""Installs Parti-in-JAX as one import namespace, `parti`.

The checkout keeps the top-level layout that the project documents (`parti/`,
`tokenizer/`, `tasks/`, `gin/`), and this file maps it onto a single package:

  parti/      -> parti
  tokenizer/  -> parti.tokenizer
  tasks/      -> parti.tasks
  gin/        -> parti/gin (package data: the gin configs of every job)

so an install never puts generic names such as `tasks` or `tokenizer` into
site-packages.
"""

import pathlib

import setuptools

_ROOT = pathlib.Path(__file__).parent

# Top-level source folder -> the package it becomes.
_PACKAGE_ROOTS = {
  "parti": "parti",
  "parti.tokenizer": "tokenizer",
  "parti.tasks": "tasks",
}


def _packages_and_dirs():
  """Every package and subpackage under the mapped folders, with its folder."""
  package_dir = dict(_PACKAGE_ROOTS)
  packages = []
  for package, folder in _PACKAGE_ROOTS.items():
    packages.append(package)
    for sub in setuptools.find_packages(where=folder):
      packages.append(f"{package}.{sub}")
  return packages, package_dir


def _gin_packages():
  """The gin folders as data-only packages under `parti.gin`."""
  gin_root = _ROOT / "gin"
  names = {"parti.gin": "gin"}
  for folder in sorted(p for p in gin_root.rglob("*") if p.is_dir()):
    relative = folder.relative_to(gin_root)
    names["parti.gin." + ".".join(relative.parts)] = str(pathlib.Path("gin", relative))
  return names


_packages, _package_dir = _packages_and_dirs()
_gin = _gin_packages()
_packages += list(_gin)
_package_dir.update(_gin)

# Each lower bound is the version the test suite last ran green against; older
# releases are untested (jax and flax in particular change APIs quickly).
_INSTALL_REQUIRES = [
  "absl-py>=2.5.1",
  "clu>=0.0.12",
  "flax>=0.12.8",
  "gin-config>=0.5.0",
  # tensorflow-datasets 4.9.10 imports it when preparing a dataset but does not
  # declare it.
  "importlib-resources>=6.5.2",
  "jax>=0.10.2",
  "numpy>=2.4.6",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "pillow>=13.0.0",
  "sentencepiece>=0.2.3",
  # The input pipeline only: the model, tokenizer and sampler import without it.
  "seqio>=0.0.20",
  "tensorboard>=2.21.0",
  "tensorflow>=2.21.0",
  "tensorflow-datasets>=4.9.10",
  "tensorflow-text>=2.21.1",
]

_EXTRAS_REQUIRE = {
  # The side-by-side rating app (parti.rate): a small web framework.
  "rating": ["flask>=3.1.3"],
  # scipy: the tests check parti.evaluation.fid against its matrix square root. selenium
  # drives Debian's chromium in the rating app's browser test (make test installs it).
  # pytest-xdist: make test runs the suite on every core (its tests compile, mostly on one
  # thread each). pytest below 9.2: under 9.2 --dist loadgroup stops grouping
  # (pytest-xdist#1386; why it matters is in tests/conftest.py, which refuses such a run).
  "dev": [
    "flask>=3.1.3",
    "pytest>=9.1.1,<9.2",
    "pytest-xdist>=3.8.0",
    "ruff>=0.17.6",
    "scipy>=1.17.1",
    "selenium>=4.51.0",
    "setuptools>=69",
    "wheel",
  ],
  # The peer the speed benches measure beside us in the same run (bench/peer.py):
  # parti-pytorch imports torchvision, and these two are the pair that import together
  # from the package index (about 5.5 GB with torch's CUDA libraries; the benches use
  # its CPU path).
  "peer": ["parti-pytorch==0.2.0", "torch==2.14.1", "torchvision==0.29.1"],
}

setuptools.setup(
  name="parti-jax",
  version="0.1.0.dev0",
  description="Parti: autoregressive text-to-image generation in JAX (ViT-VQGAN + encoder-decoder).",
  long_description=(_ROOT / "README.md").read_text(encoding="utf-8"),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  packages=_packages,
  package_dir=_package_dir,
  package_data={
    **{name: ["*.gin"] for name in _gin},
    "parti.tasks": ["vocab/*.model"],
  },
  include_package_data=False,
  install_requires=_INSTALL_REQUIRES,
  extras_require=_EXTRAS_REQUIRE,
  classifiers=[
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
