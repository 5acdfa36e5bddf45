"""The model, tokenizer, sampler and jobs' model code import and run without TensorFlow.

Accelerator machines often have no TensorFlow; it belongs to `parti.tasks` and
the input pipeline alone. The child interpreter below fails any import of
tensorflow (or of seqio and TFDS, which import it), then imports every other module.
"""

from __future__ import annotations

import textwrap

# Modules outside parti.tasks that are part of the input pipeline and may use TF.
INPUT_PIPELINE_MODULES: tuple[str, ...] = ()

# The parts of parti.tasks that evaluation and inference use, which must work on
# machines without TensorFlow too.
TF_FREE_TASK_MODULES = (
  "parti.tasks",
  "parti.tasks.records",
  "parti.tasks.parti_prompts",
  "parti.tasks.shapes",
  "parti.tasks.shapes.spec",
  "parti.tasks.shapes.scenes",
  "parti.tasks.shapes.render",
  "parti.tasks.shapes.evaluate",
)

_CHILD = textwrap.dedent(
  """
  import importlib, importlib.abc, pkgutil, sys

  BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio")

  class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split(".")[0] in BLOCKED:
        raise ImportError(f"{name} is blocked: core modules must not need TensorFlow")

  sys.meta_path.insert(0, BlockTensorFlow())
  TF_FREE_TASK_MODULES = {tf_free!r}
  try:
    import tensorflow
  except ImportError:
    pass
  else:
    raise SystemExit("the TensorFlow block did not work")

  import parti
  skip = set(sys.argv[1:])
  imported = []
  for info in pkgutil.walk_packages(parti.__path__, "parti."):
    name = info.name
    if name == "parti.tasks" or name.startswith("parti.tasks.") or name in skip:
      continue
    importlib.import_module(name)
    imported.append(name)
  import parti.tokenizer
  for info in pkgutil.walk_packages(parti.tokenizer.__path__, "parti.tokenizer."):
    importlib.import_module(info.name)
    imported.append(info.name)
  for name in TF_FREE_TASK_MODULES:
    importlib.import_module(name)
    imported.append(name)
  assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), "TF leaked in"
  print("\\n".join(imported))
  """
).replace("{tf_free!r}", repr(TF_FREE_TASK_MODULES))


def test_core_imports_without_tensorflow(run_python, tmp_path):
  result = run_python("-c", _CHILD, *INPUT_PIPELINE_MODULES, cwd=tmp_path)
  imported = set(result.stdout.split())
  # The walk found the core: a broken walk that imports nothing must not pass.
  assert {"parti.partitioning", "parti.runtime.gin_utils", "parti.device_check"} <= imported
  assert {
    "parti.modeling.model",
    "parti.train",
    "parti.modeling.t5x_model",
    "parti.sampling.decoding",
    "parti.upsampling.model",
    "parti.upsampling.api",
    "parti.train_upsampler",
  } <= imported
  assert set(TF_FREE_TASK_MODULES) <= imported


def test_device_check_runs_without_tensorflow(run_python, tmp_path):
  code = _CHILD.replace('print("\\n".join(imported))', "") + textwrap.dedent(
    """
    from parti import device_check, partitioning
    report = device_check.device_check(mesh=partitioning.MeshConfig(data=4, model=2), matmul_size=64)
    print(report.num_devices, report.mesh["model"])
    """
  )
  result = run_python("-c", code, cwd=tmp_path)
  assert result.stdout.split()[-2:] == ["8", "2"]
